"""Side-by-side speed and memory of our Faster R-CNN vs torchvision's, same weights, same inputs.

    python tools/benchmark.py                 # every case, 5 alternating repeats each
    python tools/benchmark.py --cases infer_r50 train_mbv2 --repeats 3
    python tools/benchmark.py --cases train_r50 --regime plain   # identity frozen BN, 2 small boxes
    python tools/benchmark.py --cases data    # data loading per --augment policy vs training throughput
    python tools/benchmark.py --cases checkpoint  # cost of one R50-FPN training checkpoint
    python tools/benchmark.py --cases epoch_end   # what blocks every rank at an epoch end (2 gloo ranks)
    python tools/benchmark.py --cases predict_mbv2 predict_r50  # predict.py on 100 JPEGs vs a plain loop
    python tools/benchmark.py --cases report  # validation.py --report on 1000 images x 100 detections
    python tools/benchmark.py --device cuda   # the model cases on a GPU, float32/bf16/fp16 (tools/bench_cuda.py)

Each case builds torchvision's model with random weights, copies its state dict into ours, then
times the two alternately (ours, theirs, ours, ...) and reports medians and the ratio
ours / torchvision (< 1 means we are faster). ``--memory`` also measures each model's peak
resident memory growth during a step in a fresh subprocess (median of 3 warm steps, each from a
heap trimmed with glibc's malloc_trim; Linux only).
"""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402
from tools.bench_models import (REGIMES, VOC_SIZE, build_pair, demo_inputs, infer_step, make_inputs,  # noqa: E402
                                 train_step, trained_pair)

CASES: Dict[str, Tuple[str, str, int, Tuple[int, int], str]] = {
    "infer_r50": ("r50", "infer", 1, VOC_SIZE, "inference, ResNet50-FPN, 1 VOC image (800x1066 inside)"),
    "infer_mbv2": ("mbv2", "infer", 1, VOC_SIZE, "inference, MobileNetV2, 1 VOC image"),
    "train_r50": ("r50", "train", 2, VOC_SIZE, "training step, ResNet50-FPN, batch 2 VOC images (800x1066 inside)"),
    "train_r50_480": ("r50", "train", 2, (480, 640), "training step, ResNet50-FPN, batch 2 480x640 (not resized)"),
    "train_mbv2": ("mbv2", "train", 4, (600, 600), "training step, MobileNetV2, batch 4 600x600, 512 RoIs/img"),
}

RESIZE = {"train_r50_480": (480, 640)}  # case -> (min_size, max_size)


def build_case(name: str, regime: str, weights: str = ""):
    """(ours, torchvision's, images, targets) of a CASES entry."""
    arch, _, batch, size, _ = CASES[name]
    ours, theirs = trained_pair(arch, weights) if regime == "trained" else build_pair(arch, regime)
    if name in RESIZE:
        for model in (ours, theirs):
            model.transform.min_size, model.transform.max_size = (RESIZE[name][0],), RESIZE[name][1]
    if regime == "trained":
        images, targets = demo_inputs(batch, size, ours.roi_heads.box_predictor.cls_score.out_features)
    else:
        images, targets = make_inputs(batch, size, regime=regime)
    return ours, theirs, images, targets


def time_case(name: str, repeats: int, regime: str = "random", weights: str = "") -> Dict[str, float]:
    kind = CASES[name][1]
    ours, theirs, images, targets = build_case(name, regime, weights)
    make = infer_step if kind == "infer" else train_step
    steps = {"ours": make(ours, images, targets), "torchvision": make(theirs, images, targets)}
    for step in steps.values():  # warm-up (allocator, kernels, anchor caches)
        step()
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["torchvision"])
    return {"ours_s": ours_s, "torchvision_s": theirs_s, "ratio": ours_s / theirs_s}


def _proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _release_free_heap() -> None:
    """Hand memory that glibc's malloc keeps after frees back to the system (no-op elsewhere), so
    the next step's peak is measured from what is really in use, not from allocator leftovers."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_child(name: str, which: str, regime: str, weights: str, steps: int = 3) -> None:
    """In a fresh process: peak RSS growth (MiB) during a warm step of one model, median of
    ``steps`` steps, each measured from a trimmed heap."""
    kind = CASES[name][1]
    ours, theirs, images, targets = build_case(name, regime, weights)
    model = ours if which == "ours" else theirs
    del theirs, ours
    step = (infer_step if kind == "infer" else train_step)(model, images, targets)
    step()
    peaks = []
    for _ in range(steps):
        _release_free_heap()
        with open("/proc/self/clear_refs", "w") as handle:  # reset the high-water mark
            handle.write("5")
        baseline = _proc_status_kib("VmRSS")
        step()
        peaks.append((_proc_status_kib("VmHWM") - baseline) / 1024)
    print(json.dumps({"peak_mib": statistics.median(peaks)}))


def memory_case(name: str, regime: str, weights: str) -> Dict[str, float]:
    result = {}
    for which in ("ours", "torchvision"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", name, which, regime, weights],
                             capture_output=True, text=True, check=True)
        result[f"{which}_peak_mib"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    result["memory_ratio"] = result["ours_peak_mib"] / max(result["torchvision_peak_mib"], 1e-9)
    return result


DATA_POLICIES = ("hflip", "photometric", "full", "lsj,hflip", "photometric,lsj,hflip", "mosaic,hflip",
                 "photometric,mosaic,hflip")
DATA_SIZE = 192  # demo images and training size of the data case


def _images_per_second(samples, keys: List[List[tuple]], workers: int, epochs: int) -> float:
    """Images/s of reading ``keys`` (batches of (epoch, index)) through a DataLoader, after one
    warm-up epoch (workers started); ``workers`` 0 reads in this process."""
    from torch.utils.data import DataLoader
    from train_utils.data.dataset import DetectionDataSet

    loader = DataLoader(samples, batch_sampler=keys, num_workers=workers, persistent_workers=workers > 0,
                        collate_fn=DetectionDataSet.collate_fn)
    for _ in loader:
        pass
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in loader:
            pass
    return epochs * sum(map(len, keys)) / (time.perf_counter() - start)


def data_case(repeats: int) -> Dict[str, object]:
    """Per augmentation policy, images/s of loading (decode + transforms, SeededSamples as
    training reads them) in the main process and through a DataLoader with workers, next to the
    images/s of training steps of the demo detector (batch 8 of 192x192 images)."""
    from my_dataset import VOCDataSet
    from tools.make_demo_voc import make_demo_voc
    from train_utils.data.mosaic import policy_dataset
    from train_utils.data.samplers import SeededSamples
    from train_utils.data.transforms import get_transforms
    from train_utils.model.builder import build_model
    from train_utils.model.config import ModelConfig

    workers = min(4, os.cpu_count() or 1)
    result: Dict[str, object] = {"workers": workers, "policies": {}}
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_voc(Path(tmp), num_images=64, seed=0, size=DATA_SIZE)
        for policy in DATA_POLICIES:
            dataset = VOCDataSet(tmp, transforms=get_transforms(True, policy, DATA_SIZE), txt_name="train.txt",
                                 classes_json=Path(tmp) / "classes.json")
            keys = [[(0, i) for i in range(start, start + 8)] for start in range(0, len(dataset) - 7, 8)]
            samples = SeededSamples(policy_dataset(dataset, policy, DATA_SIZE), seed=0)
            result["policies"][policy] = {"load_img_s": _images_per_second(samples, keys, 0, repeats),
                                          "loader_img_s": _images_per_second(samples, keys, workers, repeats)}
        model = build_model(ModelConfig(num_classes=dataset.num_classes + 1, backbone="mobilenet_v2",
                                        backbone_options={"feature_stride": 16}, min_size=(DATA_SIZE,),
                                        max_size=DATA_SIZE, representation_size=256, box_batch_size_per_image=64,
                                        anchor_sizes=(32, 64, 128)))
        batch = [samples[(0, i)] for i in range(8)]  # the last policy's 192x192 mosaics
        step = train_step(model, [b[0] for b in batch], [b[1] for b in batch])
        step()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        result["train_img_s"] = 8 * repeats / (time.perf_counter() - start)
    return result


def print_data_case(result: Dict[str, object]) -> None:
    """The data case as a table: per policy, loading vs training images/s."""
    train_rate = result["train_img_s"]
    print(f"data      training {train_rate:.1f} img/s (demo detector, batch 8, {DATA_SIZE} px); loading per policy:")
    print(f"  {'policy':<26} {'1 process':>10} {'DataLoader x' + str(result['workers']):>15} {'loader/training':>16}")
    for policy, rates in result["policies"].items():
        print(f"  {policy:<26} {rates['load_img_s']:>6.0f} img/s {rates['loader_img_s']:>9.0f} img/s "
              f"{rates['loader_img_s'] / train_rate:>15.1f}x", flush=True)


def checkpoint_case(repeats: int) -> Dict[str, float]:
    """Seconds to write one training checkpoint of ResNet50-FPN (21 classes, SGD momentum state)
    atomically with fsync, into save_weights/ (the disk a run writes to), and its size."""
    from train_utils.checkpoint import Checkpoint, save_checkpoint
    from train_utils.engine import rng
    from train_utils.model.builder import build_model
    from train_utils.model.config import ModelConfig

    config = ModelConfig(num_classes=21, backbone="resnet50_fpn")
    model = build_model(config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()  # momentum buffers exist, as in a running training
    checkpoint = Checkpoint(model=model.state_dict(), config=config, class_names=[f"c{i}" for i in range(20)],
                            epoch=0, optimizer=optimizer.state_dict(), lr_scheduler={"last_epoch": 1},
                            rng_state=[rng.capture()], progress={"iteration": 1, "loss_sums": {}})
    folder = ROOT / "save_weights"
    folder.mkdir(exist_ok=True)
    path = folder / "benchmark-checkpoint.pth"
    times = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            save_checkpoint(checkpoint, str(path))
            times.append(time.perf_counter() - start)
        size = path.stat().st_size
    finally:
        path.unlink(missing_ok=True)
    seconds = statistics.median(times)
    return {"save_s": seconds, "size_mib": size / 2 ** 20,
            "share_at_15m": seconds / (15 * 60 + seconds)}


def _synthetic_evaluation(num_images: int, num_classes: int, seed: int = 0):
    """A COCO ground truth of ``num_images`` 500x375 images (about 2.4 objects each, VOC's
    average) and 100 detections per image near the objects, as ``{image_id: prediction}``."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    g = torch.Generator().manual_seed(seed)
    images, annotations, predictions = [], [], {}
    for image_id in range(num_images):
        images.append({"id": image_id, "width": 500, "height": 375})
        count = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(count, 2, generator=g) * torch.tensor([400.0, 275.0])
        boxes = torch.cat([xy, xy + 20 + torch.rand(count, 2, generator=g) * 80], dim=1)
        labels = torch.randint(1, num_classes + 1, (count,), generator=g)
        for box, label in zip(boxes.tolist(), labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0})
        picks = torch.randint(0, count, (100,), generator=g)
        jitter = torch.randn(100, 4, generator=g) * 8
        predictions[image_id] = {"boxes": (boxes[picks] + jitter).clamp(min=0),
                                 "scores": torch.rand(100, generator=g),
                                 "labels": torch.where(torch.rand(100, generator=g) < 0.7, labels[picks],
                                                       torch.randint(1, num_classes + 1, (100,), generator=g))}
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c, "name": f"c{c}"} for c in range(1, num_classes + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, predictions


def report_case(num_images: int = 1000) -> Dict[str, float]:
    """Seconds for ``validation.py --report`` on ``num_images`` synthetic VOC-sized images with 100
    detections each (20 classes; plain grey pictures): COCO scoring (done by every evaluation)
    and the report alone (matching, F1, confusion, TIDE, figures, 16 drawn images, HTML)."""
    from dataclasses import asdict

    from PIL import Image

    from train_utils.evaluation.coco_eval import CocoEvaluator
    from train_utils.evaluation.per_class import per_class_results
    from train_utils.vis.report import ReportInputs, write_report

    coco_gt, predictions = _synthetic_evaluation(num_images, num_classes=20)
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(predictions)
    start = time.perf_counter()
    evaluator.accumulate()
    stats = evaluator.stats
    coco_s = time.perf_counter() - start
    names = [f"c{i}" for i in range(1, 21)]
    rows = per_class_results(evaluator.coco_eval["bbox"], evaluator.coco_gt, names, None)
    record = {"weights": "synthetic", "data_path": "synthetic", "split": "synthetic", "num_images": num_images,
              "coco_stats": stats, "voc_metric": "none", "voc_map": None, "per_class": [asdict(r) for r in rows]}
    inputs = ReportInputs(record, evaluator.coco_eval["bbox"], evaluator.detections, names,
                          lambda image_id: Image.new("RGB", (500, 375), (110, 120, 130)), {})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_report(Path(tmp), inputs)
        report_s = time.perf_counter() - start
    return {"coco_s": coco_s, "report_s": report_s}


def _epoch_end_worker(rank: int, world_size: int, port: int, num_images: int, result_file: str) -> None:
    """The end of an epoch on ``world_size`` gloo ranks: COCO scoring of the validation set, the
    way of the previous version (rank 0 matches every image) and now (shared), then the
    checkpoint files (three full writes before, one write and two links now)."""
    import torch.distributed as dist

    from train_utils.evaluation.coco_eval import CocoEvaluator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    coco_gt, predictions = _synthetic_evaluation(num_images, num_classes=20)
    mine = {i: p for i, p in predictions.items() if i % world_size == rank}
    times = {}
    for mode in ("rank0_alone", "shared"):
        evaluator = CocoEvaluator(coco_gt)
        evaluator.update(mine)
        dist.barrier()
        start = time.perf_counter()
        evaluator.synchronize_between_processes()
        if mode == "rank0_alone":
            evaluator.world_size, evaluator.rank = 1, 0  # the previous version's path
            if rank == 0:
                evaluator.accumulate()
        else:
            evaluator.accumulate()
        busy = time.perf_counter() - start
        dist.barrier()  # the other ranks wait here for rank 0
        times[mode] = {"busy_s": busy, "wall_s": time.perf_counter() - start}
    parts = [None] * world_size
    dist.all_gather_object(parts, times)
    if rank == 0:
        Path(result_file).write_text(json.dumps(parts))
    dist.destroy_process_group()


def epoch_end_case(num_images: int = 4952) -> Dict[str, float]:
    """Seconds of the epoch end that block every rank (2 gloo processes, a VOC07-test-sized
    validation set): COCO scoring before/after sharing it, and the checkpoint writes before
    (model-<epoch>, last and best written in full) and after (one write, two links)."""
    import socket

    import torch.multiprocessing as mp

    from train_utils.checkpoint import copy_checkpoint

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "times.json"
        mp.start_processes(_epoch_end_worker, args=(2, port, num_images, str(result)), nprocs=2, start_method="fork")
        parts = json.loads(result.read_text())
    write = checkpoint_case(1)["save_s"]
    folder = ROOT / "save_weights"
    start = time.perf_counter()
    try:
        (folder / "benchmark-a.pth").write_bytes(b"x")
        copy_checkpoint(str(folder / "benchmark-a.pth"), str(folder / "benchmark-b.pth"))
    finally:
        for name in ("benchmark-a.pth", "benchmark-b.pth"):
            (folder / name).unlink(missing_ok=True)
    link = time.perf_counter() - start
    return {"score_before_wall_s": parts[0]["rank0_alone"]["wall_s"],
            "score_before_rank1_busy_s": parts[1]["rank0_alone"]["busy_s"],
            "score_after_wall_s": parts[0]["shared"]["wall_s"],
            "score_after_rank1_busy_s": parts[1]["shared"]["busy_s"],
            "checkpoints_before_s": 3 * write, "checkpoints_after_s": write + 2 * link}


def _write_photos(folder: Path, count: int, seed: int = 0) -> List[Path]:
    """``count`` VOC-sized (500x375) JPEGs of coloured rectangles and ellipses on a gradient."""
    from PIL import Image, ImageDraw
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(40, 200, VOC_SIZE[1]).expand(VOC_SIZE[0], -1)
    files = []
    for index in range(count):
        background = torch.stack([ramp, ramp.flip(1), ramp * 0.5 + 60], dim=2).to(torch.uint8)
        image = Image.fromarray(background.numpy())
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = (torch.rand(2, generator=generator) * torch.tensor([350.0, 250.0])).tolist()
            w, h = (torch.rand(2, generator=generator) * 100 + 40).tolist()
            colour = tuple(torch.randint(0, 256, (3,), generator=generator).tolist())
            (draw.ellipse if index % 2 else draw.rectangle)([x, y, x + w, y + h], fill=colour)
        files.append(folder / f"photo{index:03d}.jpg")
        image.save(files[-1], quality=90)
    return files


def _plain_torchvision_loop(model: torch.nn.Module, files: List[Path], out: Path, names: List[str]) -> float:
    """Seconds for the loop users write around torchvision's detector: decode, detect, draw, save."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor
    from train_utils.vis.draw import draw_detections
    start = time.perf_counter()
    with torch.inference_mode():
        for file in files:
            image = Image.open(file).convert("RGB")
            output = model([to_tensor(image)])[0]
            keep = output["scores"] >= 0.5
            drawn = draw_detections(image, output["boxes"][keep].tolist(), output["labels"][keep].tolist(),
                                    output["scores"][keep].tolist(), names)
            drawn.save(out / file.name, quality=95)
    return time.perf_counter() - start


def predict_case(arch: str, count: int = 100) -> Dict[str, float]:
    """Images/s of ``predict.py`` on a folder of ``count`` VOC-sized JPEGs vs a plain loop over
    torchvision's model with the same weights (both draw and save every image)."""
    import contextlib
    import io
    import predict
    from train_utils.checkpoint import Checkpoint, save_checkpoint
    from train_utils.model.builder import build_model
    from train_utils.model.config import ModelConfig

    _, theirs = build_pair(arch)
    config = ModelConfig(num_classes=91 if arch == "r50" else 21,
                         backbone="resnet50_fpn" if arch == "r50" else "mobilenet_v2")
    ours = build_model(config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    names = [f"class{i}" for i in range(1, config.num_classes)]
    with tempfile.TemporaryDirectory() as tmp:
        folder, weights = Path(tmp) / "photos", str(Path(tmp) / "model.pth")
        folder.mkdir()
        files = _write_photos(folder, count)
        save_checkpoint(Checkpoint(model=ours.state_dict(), config=config, class_names=names), weights)
        del ours
        theirs_s = _plain_torchvision_loop(theirs.eval(), files, Path(tmp), names)
        log = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):
            predict.main(["--weights", weights, str(folder), "--output-dir", str(Path(tmp) / "ours"),
                          "--device", "cpu"])
        ours_s = time.perf_counter() - start
    stages = next(line for line in log.getvalue().splitlines() if line.startswith("throughput"))
    return {"ours_img_s": count / ours_s, "torchvision_img_s": count / theirs_s,
            "speedup": theirs_s / ours_s, "stages": stages.split("; ", 1)[1]}


def main() -> None:
    if any(arg == "--device" or arg.startswith("--device=") for arg in sys.argv[1:]):
        from tools.bench_cuda import main as device_main  # its own options: see --device cuda --help
        sys.exit(device_main(sys.argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    extra = ["data", "checkpoint", "epoch_end", "predict_mbv2", "predict_r50", "report"]
    parser.add_argument("--cases", nargs="+", default=list(CASES) + extra, choices=list(CASES) + extra)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (subprocess per model)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--regime", choices=list(REGIMES), default="random",
                        help="frozen statistics and targets of the model cases: " +
                             "; ".join(f"{k}: {v}" for k, v in REGIMES.items()).replace("%", "%%"))
    parser.add_argument("--weights", default="", help="--regime trained: a resnet50_fpn checkpoint of this project")
    parser.add_argument("--memory-child", nargs=4, metavar=("CASE", "WHICH", "REGIME", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.regime == "trained" and not args.weights:
        parser.error("--regime trained needs --weights (a resnet50_fpn checkpoint of this project)")
    if args.memory_child:
        memory_child(*args.memory_child)
        return

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; regime {args.regime}: {REGIMES[args.regime]}")
    results = {}
    for name in args.cases:
        if name == "data":
            r = data_case(args.repeats)
            print_data_case(r)
        elif name == "epoch_end":
            r = epoch_end_case()
            print(f"epoch end (2 ranks, 4952 val images): COCO scoring {r['score_before_wall_s']:.1f}s -> "
                  f"{r['score_after_wall_s']:.1f}s (rank 1 busy {r['score_before_rank1_busy_s']:.1f}s -> "
                  f"{r['score_after_rank1_busy_s']:.1f}s); checkpoint files {r['checkpoints_before_s']:.1f}s -> "
                  f"{r['checkpoints_after_s']:.1f}s")
        elif name == "report":
            r = report_case()
            print(f"report    validation.py --report, 1000 images x 100 detections: {r['report_s']:.1f}s "
                  f"(COCO scoring before it {r['coco_s']:.1f}s)", flush=True)
        elif name.startswith("predict_"):
            r = predict_case(name.split("_")[1])
            print(f"{name:<12} predict.py {r['ours_img_s']:.2f} img/s vs a torchvision loop "
                  f"{r['torchvision_img_s']:.2f} img/s -> {r['speedup']:.2f}x (100 VOC-sized JPEGs, drawn and "
                  f"saved; {r['stages']})", flush=True)
        elif name == "checkpoint":
            r = checkpoint_case(args.repeats)
            print(f"checkpoint R50-FPN with optimizer state: {r['size_mib']:.0f} MiB written in {r['save_s']:.2f}s "
                  f"-> {100 * r['share_at_15m']:.2f}% of training time at --checkpoint-every 15m")
        else:
            r = time_case(name, args.repeats, args.regime, args.weights)
            if args.memory:
                r.update(memory_case(name, args.regime, args.weights))
            line = (f"{name:<13} ours {r['ours_s']:.3f}s  torchvision {r['torchvision_s']:.3f}s  "
                    f"ratio {r['ratio']:.2f}   ({CASES[name][4]})")
            if args.memory:
                line += (f"\n{'':<13} peak memory ours {r['ours_peak_mib']:.0f} MiB  torchvision "
                         f"{r['torchvision_peak_mib']:.0f} MiB  ratio {r['memory_ratio']:.2f}")
            print(line, flush=True)
        results[name] = r
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
