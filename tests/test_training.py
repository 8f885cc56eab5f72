"""End-to-end runs of the training scripts on a tiny generated VOC folder: outputs, exact resume,
and recovery after the process is killed mid-epoch."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SCHEDULE, TINY_TRAIN_FLAGS, load, metrics, train

def test_outputs_of_a_run(uninterrupted, demo_voc):
    out = uninterrupted
    for name in ("model-0.pth", "model-1.pth", "last.pth", "best.pth", "metrics.jsonl", "loss_and_lr.png", "mAP.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp")), "atomic writes leave no temporary files"

    ckpt = load(out / "last.pth")
    assert ckpt["epoch"] == 1
    assert ckpt["class_names"] == ["circle", "square", "triangle"]
    assert ckpt["model_config"]["backbone"] == "mobilenet_v2"
    assert ckpt["model_config"]["num_classes"] == 4
    assert ckpt["model_config"]["min_size"] == [128] and ckpt["model_config"]["max_size"] == 128
    assert ckpt["args"]["epochs"] == 2 and ckpt["args"]["lr"] == 0.01
    assert ckpt["format_version"] == 4
    assert ckpt["data"] == {"format": "voc", "path": str(demo_voc), "year": None, "train_split": "train.txt",
                            "val_split": "val.txt", "classes_json": str(demo_voc / "classes.json")}
    assert len(ckpt["metrics"]["coco_stats"]) == 12
    assert ckpt["lr_scheduler"]["last_epoch"] == 8  # 2 epochs x 4 iterations

    records = metrics(out)
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(len(r["coco"]) == 12 for r in records)
    # LR of the last step of each epoch: warmup factor at iteration 3 is 1e-3 (1 - 3/7) + 3/7; epoch 1
    # is past the warmup and halved by the step.
    assert records[0]["lr"] == pytest.approx(0.01 * (1e-3 * (1 - 3 / 7) + 3 / 7), rel=1e-9)
    assert records[1]["lr"] == pytest.approx(0.005, rel=1e-9)

    results = list(out.glob("results*.txt"))
    assert len(results) == 1
    lines = results[0].read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["epoch:0", "epoch:1"]
    values = [float(v) for v in lines[1].split()[1:]]
    assert len(values) == 14  # 12 COCO numbers, mean loss, lr
    assert values[:12] == pytest.approx(records[1]["coco"], abs=1e-4)
    assert values[13] == pytest.approx(0.005)

    best = load(out / "best.pth")
    assert best["metrics"]["coco_stats"][1] == best["metrics"]["best_ap50"] == max(r["coco"][1] for r in records)


@pytest.mark.parametrize("script", ["train_mobilenet.py", "train_resnet50_fpn.py", "train_multi_GPU.py"])
def test_resume_continues_exactly(script, demo_voc, trained_run, uninterrupted, tmp_path):
    backbone = {"train_multi_GPU.py": ["--backbone", "mobilenet_v2"],
                "train_resnet50_fpn.py": ["--anchor-sizes", "16,32,64,128,256"]}.get(script, [])
    if script == "train_mobilenet.py":  # trained_run is this first epoch: same script, flags and schedule
        shutil.copytree(trained_run, tmp_path, dirs_exist_ok=True)
    else:
        train(script, demo_voc, tmp_path, "--epochs", "1", *backbone)
    assert load(tmp_path / "last.pth")["epoch"] == 0
    train(script, demo_voc, tmp_path, "--epochs", "2", "--resume", "auto", *backbone)

    resumed, reference = load(tmp_path / "model-1.pth"), load(uninterrupted / "model-1.pth")
    assert resumed["epoch"] == 1
    assert resumed["lr_scheduler"]["last_epoch"] == reference["lr_scheduler"]["last_epoch"] == 8
    assert resumed["lr_scheduler"]["_last_lr"] == reference["lr_scheduler"]["_last_lr"]
    assert [r["lr"] for r in metrics(tmp_path)] == [r["lr"] for r in metrics(uninterrupted)]
    assert [r["epoch"] for r in metrics(tmp_path)] == [0, 1]
    assert len(list(tmp_path.glob("results*.txt"))) >= 1
    if script != "train_resnet50_fpn.py":
        # Same model, data order and random state: the resumed weights are the uninterrupted ones.
        for key, value in reference["model"].items():
            assert torch.allclose(resumed["model"][key].float(), value.float(), atol=1e-6), key
    else:
        assert resumed["model_config"]["backbone"] == "resnet50_fpn"


# The detector keywords the first checkpoint layout stored (None: FasterRCNN's default).
LEGACY_DETECTOR_KEYS = ("rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
                        "rpn_post_nms_top_n_test", "box_batch_size_per_image", "box_detections_per_img",
                        "box_score_thresh")


def legacy_checkpoint(current: dict) -> dict:
    """``current`` (format 2) in the layout the training scripts wrote before the checkpoint
    schema: no format_version, the metrics at the top level, and a flat model_config holding
    MobileNetV2's and the tv: options for any backbone, a bare int for one min_size, None for
    defaults."""
    config, options = current["model_config"], current["model_config"]["backbone_options"]
    flat = {
        "backbone": config["backbone"], "num_classes": config["num_classes"],
        "min_size": config["min_size"][0] if len(config["min_size"]) == 1 else config["min_size"],
        "max_size": config["max_size"], "trainable_layers": config["trainable_layers"],
        "width_mult": options.get("width_mult", 1.0), "feature_stride": options.get("feature_stride", 32),
        "representation_size": config["representation_size"], "anchor_sizes": config["anchor_sizes"],
        "aspect_ratios": None, "roi_op": config["roi_op"], "return_nodes": None, "fpn": None,
        **{key: current["args"][key] for key in LEGACY_DETECTOR_KEYS},
    }
    kept = ("model", "optimizer", "lr_scheduler", "scaler", "epoch", "args", "class_names", "rng_state")
    return {**{key: current[key] for key in kept}, "model_config": flat, **current["metrics"]}


def test_checkpoint_of_the_first_layout_evaluates_predicts_and_resumes(demo_voc, uninterrupted, tmp_path):
    import predict
    import validation

    legacy = legacy_checkpoint(load(uninterrupted / "model-0.pth"))
    assert "format_version" not in legacy and legacy["model_config"]["min_size"] == 128
    out = tmp_path / "run"
    out.mkdir()
    torch.save(legacy, out / "last.pth")

    records = []
    for weights in (uninterrupted / "model-0.pth", out / "last.pth"):
        report = tmp_path / f"{weights.parent.name}.txt"
        assert validation.main(["--weights-path", str(weights), "--workers", "0", "--output", str(report)]) == 0
        records.append(json.loads(report.with_suffix(".json").read_text()))
    assert records[1]["coco_stats"] == records[0]["coco_stats"] == pytest.approx(legacy["coco_stats"], abs=1e-9)

    voc = demo_voc / "VOCdevkit" / "VOC2012"
    image = str(voc / "JPEGImages" / f"{(voc / 'ImageSets' / 'Main' / 'val.txt').read_text().split()[0]}.jpg")
    for weights, name in ((uninterrupted / "model-0.pth", "new.json"), (out / "last.pth", "old.json")):
        assert predict.main(["--weights", str(weights), "--no-draw", "--workers", "1", "--score-thresh", "0",
                             "--save-json", str(tmp_path / name), image]) == 0
    assert json.loads((tmp_path / "old.json").read_text()) == json.loads((tmp_path / "new.json").read_text())

    train("train_mobilenet.py", demo_voc, out, "--epochs", "2", "--resume", "auto")
    resumed, reference = load(out / "model-1.pth"), load(uninterrupted / "model-1.pth")
    assert resumed["format_version"] == 4 and resumed["epoch"] == 1
    for key, value in reference["model"].items():
        assert torch.allclose(resumed["model"][key].float(), value.float(), atol=1e-6), key


@pytest.mark.slow
def test_killed_mid_epoch_resumes_from_last_checkpoint(demo_voc, tmp_path):
    cmd = [sys.executable, str(ROOT / "train_mobilenet.py"), "--data-path", str(demo_voc),
           "--classes-json", str(demo_voc / "classes.json"), "--output-dir", str(tmp_path),
           *TINY_TRAIN_FLAGS, *SCHEDULE, "--epochs", "3", "--print-freq", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("Epoch 1 [2/"):
                proc.send_signal(signal.SIGKILL)  # no chance to clean up
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])

    ckpt = load(tmp_path / "last.pth")
    assert ckpt["epoch"] == 0
    assert not list(tmp_path.glob("*.tmp"))

    train("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "3", "--resume", "auto")
    assert load(tmp_path / "last.pth")["epoch"] == 2
    assert [r["epoch"] for r in metrics(tmp_path)] == [0, 1, 2]


@pytest.mark.slow
def test_missing_default_backbone_weights_names_the_url_and_path(demo_voc, tmp_path):
    cmd = [sys.executable, str(ROOT / "train_mobilenet.py"), "--data-path", str(demo_voc),
           "--classes-json", str(demo_voc / "classes.json"), "--output-dir", str(tmp_path)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()
    assert len(message) == 1, done.stderr
    assert message[0].startswith("error: backbone weights '")
    assert str(ROOT / "backbone" / "mobilenet_v2.pth") in message[0]
    assert "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth" in message[0]
    assert "--backbone-weights none" in message[0]
    assert not list(tmp_path.glob("*.pth"))


@pytest.mark.slow
def test_freeze_backbone_epochs(demo_voc, tmp_path):
    """--freeze-backbone-epochs N trains only the RPN and heads for the first N epochs."""
    def backbone_params(ckpt: dict) -> dict:
        return {k: v for k, v in ckpt["model"].items() if k.startswith("backbone.") and "running_" not in k
                and "num_batches" not in k}

    frozen, thawed = tmp_path / "frozen", tmp_path / "thawed"
    train("train_mobilenet.py", demo_voc, frozen, "--epochs", "2", "--freeze-backbone-epochs", "2")
    train("train_mobilenet.py", demo_voc, thawed, "--epochs", "2", "--freeze-backbone-epochs", "1")
    for out, backbone_changes in ((frozen, False), (thawed, True)):
        first, second = load(out / "model-0.pth"), load(out / "model-1.pth")
        changed = [k for k, v in backbone_params(first).items() if not torch.equal(v, second["model"][k])]
        assert bool(changed) == backbone_changes, out.name
        head = "roi_heads.box_predictor.cls_score.weight"
        assert not torch.equal(first["model"][head], second["model"][head])


def test_fine_tune_from_a_detector_file_with_another_class_count(trained_run, demo_voc, tmp_path):
    """--weights: a WZ-style {"model": ..., "optimizer": ...} file whose predictor has 91 classes.
    Everything but the predictor is loaded; with lr 0 the loaded weights are still there after
    training, and the predictor is sized for the 3 classes of the data."""
    source = load(trained_run / "last.pth")["model"]
    width = source["roi_heads.box_predictor.cls_score.weight"].shape[1]
    source["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(91, width)
    source["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(91)
    source["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(91 * 4, width)
    source["roi_heads.box_predictor.bbox_pred.bias"] = torch.zeros(91 * 4)
    weights = tmp_path / "wz_style.pth"
    torch.save({"model": source, "optimizer": {}, "epoch": 7}, weights)

    out = tmp_path / "run"
    train("train_mobilenet.py", demo_voc, out, "--epochs", "1", "--weights", str(weights), "--lr", "0")
    tuned = load(out / "model-0.pth")["model"]
    assert tuned["roi_heads.box_predictor.cls_score.weight"].shape == (4, width)
    for key, value in source.items():
        if key.startswith("roi_heads.box_predictor.") or "running_" in key or "num_batches" in key:
            continue  # a new predictor; BatchNorm statistics move even with lr 0
        assert torch.equal(tuned[key], value), key


@pytest.mark.slow
def test_missing_detector_weights_names_the_url(demo_voc, tmp_path):
    cmd = [sys.executable, str(ROOT / "train_resnet50_fpn.py"), "--data-path", str(demo_voc),
           "--classes-json", str(demo_voc / "classes.json"), "--output-dir", str(tmp_path),
           "--weights", str(tmp_path / "fasterrcnn_resnet50_fpn_coco.pth")]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: detector weights '{tmp_path / 'fasterrcnn_resnet50_fpn_coco.pth'}' not found; the COCO detector is at "
        "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"]


def test_atomic_writes_get_the_usual_file_mode_and_leave_nothing_on_failure(tmp_path):
    from backbone import read_weight_file
    from train_utils.checkpoint import save_atomic, temporary_path

    target = tmp_path / "out" / "last.pth"
    save_atomic({"epoch": 3}, str(target))
    assert read_weight_file(str(target)) == {"epoch": 3}
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600

    with pytest.raises(RuntimeError):
        with temporary_path(str(target)) as tmp:
            tmp.write_bytes(b"half written")
            raise RuntimeError("interrupted")
    assert read_weight_file(str(target)) == {"epoch": 3}  # the old file is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.pth"]


@pytest.mark.slow
def test_trainer_steps_and_extra_hooks(demo_voc, tmp_path):
    """The Trainer in-process: an extra hook sees the run after the default hooks (checkpoint and
    run log written), and an overridden build step replaces only that step."""
    from train_utils.engine.args import parse_training_args
    from train_utils.engine.hooks import Hook
    from train_utils.engine.trainer import Trainer

    class Recorder(Hook):
        def __init__(self) -> None:
            self.calls = []

        def before_train(self, trainer) -> None:
            self.calls.append(("before_train", trainer.start_epoch))

        def before_epoch(self, trainer, epoch) -> None:
            self.calls.append(("before_epoch", epoch))

        def after_epoch(self, trainer, record) -> None:
            self.calls.append(("after_epoch", record["epoch"], (Path(trainer.args.output_dir) / "last.pth").is_file()))

    class AdamWTrainer(Trainer):
        def build_optimizer(self) -> None:
            super().build_optimizer()
            self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)

    args = parse_training_args("test", {"backbone": "mobilenet_v2"}, argv=[
        "--data-path", str(demo_voc), "--classes-json", str(demo_voc / "classes.json"), "--output-dir", str(tmp_path),
        "--epochs", "1", *TINY_TRAIN_FLAGS])
    recorder = Recorder()
    trainer = AdamWTrainer(args, extra_hooks=[recorder])
    record = trainer.train()
    assert recorder.calls == [("before_train", 0), ("before_epoch", 0), ("after_epoch", 0, True)]
    assert type(trainer.optimizer) is torch.optim.AdamW and record["epoch"] == 0 and len(record["coco"]) == 12
    assert load(tmp_path / "last.pth")["optimizer"]["param_groups"][0]["initial_lr"] == 1e-4
