"""Augmentation policies: parsing and canonical order, the presets' unchanged draws, the large-scale
jitter and mosaic kernels on crafted cases, a property test of every policy over random images and
boxes, determinism with DataLoader workers, and the dropped-box count reaching the epoch record."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from train_utils.data.mosaic import Mosaic, mosaic, policy_dataset
from train_utils.data.samplers import SeededSamples
from train_utils.data.transforms import (
    AUGMENT_ELEMENTS, AUGMENT_PRESETS, DROPPED_KEY, IMAGENET_MEAN, Compose, RandomHorizontalFlip, RandomIoUCrop,
    RandomPhotometricDistort, RandomScaleJitter, RandomZoomOut, ToTensor, augment_policy, get_transforms, parse_policy,
    place, resize, training_size,
)
from train_utils.engine.loop import EpochState, dropped_boxes

# Every preset, every element alone, and some mixes (typed out of order on purpose).
POLICIES = list(dict.fromkeys([*AUGMENT_PRESETS, *AUGMENT_ELEMENTS, "hflip,lsj,photometric", "lsj,full",
                                "mosaic,hflip", "hflip,mosaic,lsj,photometric", "full,mosaic"]))
ODD_SIZES = [(1, 500), (500, 1), (37, 23), (1, 1), (2, 3)]


def random_sample(generator: torch.Generator, height: int, width: int, with_difficult: bool):
    """(PIL image, target) with up to 6 boxes inside the image, some touching the border, some of zero
    width or height. Per-box entries encode the box number k: labels k + 1, iscrowd k % 2,
    difficult (k // 2) % 2, so alignment can be checked after any transform."""
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
    count = int(torch.randint(0, 7, (), generator=generator))
    xs = torch.rand(count, 2, generator=generator) * width
    ys = torch.rand(count, 2, generator=generator) * height
    boxes = torch.stack([xs.min(1).values, ys.min(1).values, xs.max(1).values, ys.max(1).values], dim=1)
    for k in range(count):
        kind = int(torch.randint(0, 5, (), generator=generator))
        if kind == 0:  # touching the border
            boxes[k, 0], boxes[k, 3] = 0.0, float(height)
        elif kind == 1:
            boxes[k, 2], boxes[k, 1] = float(width), 0.0
        elif kind == 2:  # degenerate: zero width
            boxes[k, 2] = boxes[k, 0]
        elif kind == 3:  # degenerate: zero height
            boxes[k, 3] = boxes[k, 1]
    ids = torch.arange(count)
    target = {"boxes": boxes, "labels": ids + 1, "image_id": torch.tensor(0),
              "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), "iscrowd": ids % 2}
    if with_difficult:
        target["difficult"] = (ids // 2) % 2
    return Image.fromarray(pixels), target


class RandomImages(Dataset):
    """``count`` random samples (odd sizes first; a ``difficult`` entry for even seeds), made from
    their index with a private generator;
    ``transforms`` applied; the indices read are logged (what a mosaic took)."""

    def __init__(self, count: int, transforms=None, seed: int = 0) -> None:
        self.count, self.transforms, self.seed = count, transforms, seed
        self.read: list = []

    def __len__(self) -> int:
        return self.count

    def raw(self, index: int):
        generator = torch.Generator().manual_seed(self.seed * 1000 + index)
        if index < len(ODD_SIZES):
            height, width = ODD_SIZES[index]
        else:
            height, width = (int(v) for v in torch.randint(4, 70, (2,), generator=generator))
        image, target = random_sample(generator, height, width, with_difficult=self.seed % 2 == 0)
        target["image_id"] = torch.tensor(index)
        return image, target

    def __getitem__(self, index: int):
        self.read.append(index)
        image, target = self.raw(index)
        return self.transforms(image, target) if self.transforms else (image, target)


def policy_data(policy: str, size: int, count: int = 12, seed: int = 0) -> tuple[Dataset, RandomImages]:
    """(what training reads under ``policy``, the underlying RandomImages)."""
    images = RandomImages(count, get_transforms(True, policy, size), seed)
    return policy_dataset(images, policy, size), images


# ---------------------------------------------------------------------------- policies
def test_parse_policy_canonical_order_presets_and_errors():
    assert parse_policy("hflip,lsj,photometric") == ("photometric", "lsj", "hflip")
    assert parse_policy("lsj, full") == ("photometric", "zoomout", "ioucrop", "lsj", "hflip")
    assert parse_policy("none") == () and parse_policy("none,hflip") == ("hflip",)
    assert parse_policy("mosaic,hflip,mosaic") == ("mosaic", "hflip")
    for name, elements in AUGMENT_PRESETS.items():
        assert parse_policy(name) == elements
    with pytest.raises(ValueError, match=r"unknown augmentation element 'flip' in 'lsj,flip'; choose a comma list "
                                         r"of photometric, zoomout, ioucrop, lsj, mosaic, hflip or a preset "
                                         r"\(none, hflip, photometric, full\)"):
        parse_policy("lsj,flip")
    with pytest.raises(ValueError, match="'lsj' needs the training size"):
        get_transforms(True, "lsj")
    with pytest.raises(ValueError, match="'mosaic' needs the training size"):
        policy_dataset(RandomImages(2), "mosaic", None)
    assert training_size([480, 512, 800], 1333) == 800 and training_size([800], 600) == 600


def test_augment_flag_is_one_argparse_line_and_stored_in_canonical_form(capsys):
    from train_utils.engine.args import parse_training_args

    args = parse_training_args("t", {"backbone": "mobilenet_v2"}, argv=["--augment", "hflip,lsj"])
    assert args.augment == "lsj,hflip"
    canonical = {"lsj,hflip": "lsj,hflip", " hflip, lsj": "lsj,hflip", "hflip,photometric": "photometric",
                 "none,none": "none", "full": "full", "lsj,full": "photometric,zoomout,ioucrop,lsj,hflip",
                 "hflip,mosaic,photometric,lsj": "photometric,lsj,mosaic,hflip"}
    assert {text: augment_policy(text) for text in canonical} == canonical
    with pytest.raises(SystemExit):
        parse_training_args("t", {"backbone": "mobilenet_v2"}, argv=["--augment", "hflip,cutout"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("error: argument --augment: unknown augmentation element 'cutout' in 'hflip,cutout'; "
                         "choose a comma list of photometric, zoomout, ioucrop, lsj, mosaic, hflip or a preset "
                         "(none, hflip, photometric, full)")
    assert "photometric, zoomout, ioucrop, lsj, mosaic, hflip" in last


# Today's presets as they were composed before policies existed: their samples and random draws
# must not change (old runs resume exactly).
OLD_PRESETS = {
    "none": lambda: [ToTensor()],
    "hflip": lambda: [ToTensor(), RandomHorizontalFlip(0.5)],
    "photometric": lambda: [RandomPhotometricDistort(), ToTensor(), RandomHorizontalFlip(0.5)],
    "full": lambda: [RandomPhotometricDistort(), RandomZoomOut(), RandomIoUCrop(), RandomHorizontalFlip(0.5),
                     ToTensor()],
}


@pytest.mark.parametrize("preset", list(OLD_PRESETS))
def test_presets_keep_their_samples_and_draws(preset):
    old, new = Compose(OLD_PRESETS[preset]()), get_transforms(True, preset)
    generator = torch.Generator().manual_seed(5)
    for seed in range(12):
        image, target = random_sample(generator, 40, 56, with_difficult=False)
        keep = (target["boxes"][:, 2] > target["boxes"][:, 0]) & (target["boxes"][:, 3] > target["boxes"][:, 1])
        target = {k: v[keep] if k != "image_id" else v for k, v in target.items()}  # as datasets give them
        torch.manual_seed(seed)
        old_image, old_target = old(image, target)
        old_next = torch.rand(4)
        torch.manual_seed(seed)
        new_image, new_target = new(image, target)
        assert torch.equal(new_image, old_image)
        assert torch.equal(torch.rand(4), old_next)
        assert new_target.pop(DROPPED_KEY).dtype == torch.int64
        old_target.pop(DROPPED_KEY, None)  # the crop of full already counted what it removed
        assert new_target.keys() == old_target.keys()
        assert all(torch.equal(new_target[k], old_target[k]) for k in old_target)


# ---------------------------------------------------------------------------- kernels
def coordinate_image(height: int, width: int) -> torch.Tensor:
    """[3, H, W] float image: channel 0 holds x + 1, channel 1 holds y + 1 (0 marks the canvas)."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([xs + 1, ys + 1, torch.ones_like(xs)])


def test_place_crops_and_pads_and_drops_small_boxes():
    image = coordinate_image(10, 20)
    target = {"boxes": torch.tensor([[0.0, 0.0, 20.0, 10.0], [2.0, 2.0, 4.5, 9.0], [15.0, 1.0, 19.0, 3.0]]),
              "labels": torch.tensor([1, 2, 3]), "area": torch.zeros(3), "iscrowd": torch.tensor([0, 1, 0])}
    canvas, out = place(image, target, 16, 12, -4, 3, fill=(0.0, 0.0, 0.0))
    assert canvas.shape == (3, 12, 16)
    assert torch.equal(canvas[:, 3:13, :16], image[:, :9, 4:20])  # x 4..19 -> 0..15, y 0..8 -> 3..11
    assert canvas[:, :3].abs().sum() == 0  # padding above
    # box 2 (x 2..4.5 -> -2..0.5) is 0.5 px wide after clipping: dropped; boxes 1 and 3 clipped to x < 16
    assert out["boxes"].tolist() == [[0.0, 3.0, 16.0, 12.0], [11.0, 4.0, 15.0, 6.0]]
    assert out["labels"].tolist() == [1, 3] and out["iscrowd"].tolist() == [0, 0]
    assert out["area"].tolist() == [144.0, 8.0] and int(out[DROPPED_KEY]) == 1
    pil_canvas, pil_out = place(Image.fromarray(np.full((10, 20, 3), 200, np.uint8)), target, 16, 12, -4, 3)
    array = np.asarray(pil_canvas)
    assert pil_canvas.size == (16, 12) and (array[3:] == 200).all()
    assert (array[:3] == [round(255 * v) for v in IMAGENET_MEAN]).all()
    assert torch.equal(pil_out["boxes"], out["boxes"])


def test_resize_scales_boxes_and_area():
    target = {"boxes": torch.tensor([[2.0, 4.0, 10.0, 8.0]]), "area": torch.tensor([32.0])}
    image, out = resize(Image.new("RGB", (20, 10)), target, 25, 30)
    assert image.size == (30, 25)
    assert out["boxes"].tolist() == [[3.0, 10.0, 15.0, 20.0]] and out["area"].tolist() == [120.0]


def test_scale_jitter_is_resize_then_place_with_its_draws():
    image = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint32).reshape(40, 60, 3).astype(np.uint8))
    target = {"boxes": torch.tensor([[5.0, 5.0, 50.0, 30.0], [58.0, 0.0, 60.0, 40.0]]), "labels": torch.tensor([1, 2]),
              "area": torch.tensor([1125.0, 80.0]), "iscrowd": torch.tensor([0, 0])}
    jitter = RandomScaleJitter(48)
    for seed in range(20):
        torch.manual_seed(seed)
        factor = 0.1 + 1.9 * torch.rand(()).item()
        new_h, new_w = max(1, round(40 * 0.8 * factor)), max(1, round(60 * 0.8 * factor))  # fit: 48 / 60
        left, top = int((48 - new_w) * torch.rand(()).item()), int((48 - new_h) * torch.rand(()).item())
        expected = place(*resize(image, target, new_h, new_w), 48, 48, left, top)
        torch.manual_seed(seed)
        got = jitter(image, target)
        assert got[0].size == (48, 48) and np.array_equal(np.asarray(got[0]), np.asarray(expected[0]))
        assert all(torch.equal(got[1][k], expected[1][k]) for k in expected[1])


def test_mosaic_places_four_images_around_the_centre():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    sizes = [(20, 40), (40, 40), (10, 20), (40, 20)]  # (height, width); each resized to longer side 40
    samples = []
    for k, ((height, width), colour) in enumerate(zip(sizes, colours)):
        box = torch.tensor([[0.0, 0.0, width / 2, height / 2]])  # its top-left quarter
        samples.append((Image.new("RGB", (width, height), colour),
                        {"boxes": box, "labels": torch.tensor([k + 1]), "area": torch.tensor([width * height / 4]),
                         "iscrowd": torch.tensor([0]), "image_id": torch.tensor(k)}))
    canvas, target = mosaic(samples, 40, (15, 25), fill=(0.0, 0.0, 0.0))
    array = np.asarray(canvas)
    assert canvas.size == (40, 40)
    # top-left 40x20 image at (-25, 5): visible x 0..14, y 5..24; top-right 40x40 at (15, -15): x 15..39, y 0..24
    assert (array[5:25, :15] == colours[0]).all() and (array[:5, :15] == 0).all()
    assert (array[:25, 15:] == colours[1]).all()
    # bottom-left 20x40 (resized from 10x20) at (-25, 25); bottom-right 20x40 (from 40x20) at (15, 25)
    assert (array[25:40, :15] == colours[2]).all() and (array[25:40, 15:35] == colours[3]).all()
    assert (array[25:40, 35:] == 0).all()
    # The quarter boxes, moved: top-left (-25, 5, -5, 15) and bottom-left (-25, 25, -5, 35) lie left
    # of the canvas (0 px wide once clipped): dropped; top-right and bottom-right are clipped.
    assert target["boxes"].tolist() == [[15.0, 0.0, 35.0, 5.0], [15.0, 25.0, 25.0, 40.0]]
    assert target["labels"].tolist() == [2, 4] and int(target[DROPPED_KEY]) == 2
    assert target["area"].tolist() == [100.0, 150.0] and int(target["image_id"]) == 0


def test_mosaic_dataset_draws_from_the_seeded_generator():
    images = RandomImages(10, get_transforms(True, "photometric,mosaic", 32))
    data = Mosaic(images, 32, get_transforms(True, "none"))
    seeded = SeededSamples(data, seed=3)
    first = seeded[(2, 7)]
    images.read.clear()
    again = seeded[(2, 7)]
    assert len(images.read) == 4 and images.read[0] == 7
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    assert first[0].shape == (3, 32, 32) and int(first[1]["image_id"]) == 7
    assert data.get_height_and_width(0) == (32, 32)
    others = [seeded[(epoch, 7)][0] for epoch in range(4)]
    assert any(not torch.equal(image, first[0]) for image in others)


# ---------------------------------------------------------------------------- properties
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_keeps_boxes_inside_and_counts_the_dropped(policy):
    """Over random images (odd sizes included) and boxes: output boxes inside the output image,
    width and height > 0, per-box entries aligned, area recomputed, dropped = boxes in - boxes out."""
    has_mosaic = "mosaic" in parse_policy(policy)
    for seed in range(3):
        size = (16, 37, 64)[seed]
        data, images = policy_data(policy, size, count=14, seed=seed)
        torch.manual_seed(seed)
        for index in range(len(data)):
            images.read.clear()
            image, target = data[index]
            boxes_in = sum(len(images.raw(i)[1]["boxes"]) for i in images.read)
            assert len(images.read) == (4 if has_mosaic else 1)
            assert image.dtype == torch.float32 and image.shape[0] == 3
            height, width = image.shape[-2:]
            if has_mosaic or "lsj" in parse_policy(policy):
                assert (height, width) == (size, size)
            boxes = target["boxes"]
            n = len(boxes)
            assert boxes.dtype == torch.float32 and boxes.shape == (n, 4)
            assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all())
            assert bool((boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all())
            assert bool((boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all())
            ids = target["labels"] - 1
            assert target["iscrowd"].tolist() == (ids % 2).tolist() and len(target["area"]) == n
            if "difficult" in target:
                assert target["difficult"].tolist() == ((ids // 2) % 2).tolist()
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            assert torch.allclose(target["area"], area, rtol=1e-5, atol=1e-3)
            assert int(target[DROPPED_KEY]) == boxes_in - n


def test_same_seed_same_samples_with_dataloader_workers():
    """Every policy under SeededSamples: the samples read in the main process equal those two
    DataLoader worker processes produce, and a second pass repeats them."""
    parts = [policy_data(policy, 24, count=4, seed=k)[0] for k, policy in enumerate(POLICIES)]
    samples = SeededSamples(ConcatDataset(parts), seed=11)
    keys = [[(1, index)] for index in range(len(samples))]
    direct = [samples[key[0]] for key in keys]
    loader = DataLoader(samples, batch_sampler=keys, num_workers=2, collate_fn=lambda batch: batch[0])
    for _ in range(2):
        for (image, target), (want_image, want_target) in zip(loader, direct, strict=True):
            assert torch.equal(image, want_image)
            assert target.keys() == want_target.keys() and all(torch.equal(target[k], want_target[k]) for k in target)


def test_browse_dataset_draws_any_policy(demo_voc, tmp_path, capsys):
    from tools import browse_dataset

    common = [str(demo_voc), "--classes-json", str(demo_voc / "classes.json"), "--max-images", "4", "--cell-size", "64",
              "--per-grid", "4"]
    code = browse_dataset.main([*common, "--augment", "hflip,mosaic,lsj", "--size", "96",
                                "--output-dir", str(tmp_path)])
    assert code == 0
    grid = Image.open(tmp_path / "grid_000.png")
    gap = browse_dataset.GAP  # 4 cells, 2 x 2
    assert grid.size == (gap + 2 * (64 + gap), gap + 2 * (64 + browse_dataset.caption_height() + gap))
    with pytest.raises(SystemExit):
        browse_dataset.main([*common, "--augment", "hflip,blur"])
    assert "argument --augment: unknown augmentation element 'blur'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the count in training
def test_dropped_counts_leave_the_targets_and_survive_an_iteration_checkpoint():
    targets = [{"boxes": torch.zeros(0, 4), DROPPED_KEY: torch.tensor(3)}, {"boxes": torch.zeros(0, 4)},
               {"boxes": torch.zeros(0, 4), DROPPED_KEY: torch.tensor(2)}]
    assert dropped_boxes(targets) == 5
    assert all(DROPPED_KEY not in target for target in targets)
    state = EpochState(2, iteration=3, dropped_boxes=7, dropped_here=5)
    assert state.sync_dropped(torch.device("cpu")) == 12 and state.dropped_here == 0
    restored = EpochState.from_dict(2, state.to_dict())
    assert (restored.dropped_boxes, restored.dropped_here) == (12, 0)
    assert EpochState.from_dict(2, {"iteration": 1, "loss_sums": {}, "lr": None}).dropped_boxes == 0


def _sync_two_ranks(rank: int, port: int, result_dir: str) -> None:
    """One rank of a 2-process gloo group: a resumed epoch (total 10 so far) where rank 0 drops 3
    boxes and rank 1 drops 4, synced twice (an iteration checkpoint, then the epoch's end)."""
    import json
    import os
    from pathlib import Path

    import torch.distributed as dist

    from train_utils import distributed as dist_utils

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    dist_utils.init_distributed_mode("cpu", timeout_minutes=1)
    try:
        state = EpochState.from_dict(0, {"iteration": 2, "loss_sums": {}, "lr": None, "dropped_boxes": 10})
        state.dropped_here += 3 + rank
        first = state.sync_dropped(torch.device("cpu"))
        stored = state.to_dict()["dropped_boxes"]
        second = state.sync_dropped(torch.device("cpu"))
        Path(result_dir, f"{rank}.json").write_text(json.dumps([first, stored, second, state.dropped_here]))
    finally:
        dist.destroy_process_group()


def test_the_ranks_dropped_counts_are_summed_once_when_synced(tmp_path):
    """Under DDP each rank counts its own samples; sync_dropped (every rank, at an iteration
    checkpoint and at the epoch's end) adds all ranks' counts since the last sync to the total."""
    import json

    import torch.multiprocessing as mp

    from conftest import free_port

    mp.start_processes(_sync_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [17, 17, 17, 0]  # 10 + 3 + 4, once


@pytest.mark.slow
def test_training_with_lsj_and_mosaic_logs_the_dropped_boxes_and_resumes_exactly(demo_voc, tmp_path):
    """Two epochs of lsj + mosaic with 2 loader workers and weight EMA: metrics.jsonl's
    ``augment_dropped_boxes`` equals the sum of the counts of the epoch's samples read again
    independently (batch 4, 16 images: each once), and one epoch then a resume gives the same
    weights, EMA weights and counts."""
    import shutil

    from conftest import load, metrics, train
    from my_dataset import VOCDataSet

    policy, data = "lsj,mosaic,hflip", tmp_path / "data"
    shutil.copytree(demo_voc, data)
    split = data / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main"
    (split / "first16.txt").write_text("\n".join(split.joinpath("train.txt").read_text().split()[:16]) + "\n")
    flags = ["--augment", policy, "--train-split", "first16.txt", "--aspect-ratio-group-factor", "-1", "--workers", "2",
             "--ema", "0.9", "--ema-warmup", "2"]
    train("train_mobilenet.py", data, tmp_path / "whole", "--epochs", "2", *flags)
    train("train_mobilenet.py", data, tmp_path / "resumed", "--epochs", "1", *flags)
    train("train_mobilenet.py", data, tmp_path / "resumed", "--epochs", "2", "--resume", "auto", *flags)

    dataset = VOCDataSet(data, transforms=get_transforms(True, policy, 128), txt_name="first16.txt",
                         classes_json=str(data / "classes.json"))
    samples = SeededSamples(policy_dataset(dataset, policy, 128), seed=0)  # --min-size 128, --seed 0
    expected = [sum(int(samples[(epoch, index)][1][DROPPED_KEY]) for index in range(16)) for epoch in (0, 1)]
    assert all(count > 0 for count in expected)
    for run in ("whole", "resumed"):
        assert [record[DROPPED_KEY] for record in metrics(tmp_path / run)] == expected
    whole, resumed = load(tmp_path / "whole" / "model-1.pth"), load(tmp_path / "resumed" / "model-1.pth")
    assert load(tmp_path / "resumed" / "model-0.pth")["args"]["augment"] == policy
    for key, value in whole["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert whole["ema"]["updates"] == resumed["ema"]["updates"] == 8
    for key, value in whole["ema"]["model"].items():
        assert torch.equal(resumed["ema"]["model"][key], value), key
