"""Anchor coverage (train_utils/model/anchor_coverage.py, tools/check_dataset.py --anchors,
--anchor-sizes auto) against anchors generated here with loops and a brute-force IoU over every
anchor, and tools/browse_dataset.py's grids checked pixel by pixel."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MOBILENET_OPTIONS, TINY_COMMON_FLAGS
from tools import browse_dataset, check_dataset
from train_utils.cli import add_model_flags
from train_utils.data.catalog import build_dataset
from train_utils.model import anchor_coverage
from train_utils.model.anchor_coverage import (DetectorAnchors, best_anchor_iou, coverage_table, dataset_boxes,
                                               describe_auto_anchors, fit_anchor_sizes, larger_inputs,
                                               low_coverage_hint, resize_boxes, score_layout, suggest_anchors)
from train_utils.model.builder import build_model
from train_utils.model.config import ModelConfig
from train_utils.vis.draw import class_colour, outline_pixels
from voc_factory import VocItem, VocObject, write_classes_json, write_voc

FPN_STRIDES = (4, 8, 16, 32, 64)
SMALL_ANCHORS = (8, 16, 32, 64, 128)


# ---------------------------------------------------------------------------- the reference, with loops
def loop_anchors(strides, sizes_per_map, ratios, padded_h: int, padded_w: int) -> np.ndarray:
    """Every anchor [A, 4] of a padded image: per map, per grid row and column, per ratio and size."""
    rows = []
    for stride, sizes in zip(strides, sizes_per_map):
        grid_h, grid_w = math.ceil(padded_h / stride), math.ceil(padded_w / stride)
        step_y, step_x = padded_h // grid_h, padded_w // grid_w
        cells = []
        for ratio in ratios:
            for size in sizes:
                half_w, half_h = size / math.sqrt(ratio) / 2, size * math.sqrt(ratio) / 2
                cells.append((round(-half_w), round(-half_h), round(half_w), round(half_h)))
        for i in range(grid_h):
            for j in range(grid_w):
                for x1, y1, x2, y2 in cells:
                    rows.append((j * step_x + x1, i * step_y + y1, j * step_x + x2, i * step_y + y2))
    return np.array(rows, dtype=np.float64)


def brute_force_best(images, min_sizes, max_size, strides, sizes_per_map, ratios):
    """(best IoU of every resized box over every anchor of its image, labels)."""
    best, labels = [], []
    for min_size in min_sizes:
        for height, width, boxes, image_labels in images:
            scale = min(min_size / min(height, width), max_size / max(height, width))
            new_h, new_w = math.floor(height * scale), math.floor(width * scale)
            anchors = loop_anchors(strides, sizes_per_map, ratios, math.ceil(new_h / 32) * 32,
                                   math.ceil(new_w / 32) * 32)
            anchor_area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
            for box, label in zip(boxes, image_labels):
                x1, y1, x2, y2 = np.asarray(box, dtype=np.float64) * ([new_w / width, new_h / height] * 2)
                inter_w = (np.minimum(anchors[:, 2], x2) - np.maximum(anchors[:, 0], x1)).clip(min=0)
                inter_h = (np.minimum(anchors[:, 3], y2) - np.maximum(anchors[:, 1], y1)).clip(min=0)
                inter = inter_w * inter_h
                best.append((inter / ((x2 - x1) * (y2 - y1) + anchor_area - inter)).max())
                labels.append(label)
    return np.array(best), np.array(labels)


def random_images(seed: int, sizes, per_image: int, side_range=(3.0, 0.9)):
    """[(height, width, boxes [n, 4], labels [n])] with log-uniform box sizes from side_range[0]
    pixels to side_range[1] of the shorter side, random aspect ratios and 3 classes."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in sizes:
        side = np.exp(rng.uniform(np.log(side_range[0]), np.log(side_range[1] * min(height, width)), per_image))
        aspect = np.exp(rng.uniform(-1.0, 1.0, per_image))
        w, h = side / np.sqrt(aspect), side * np.sqrt(aspect)
        cx, cy = rng.uniform(0, width, per_image), rng.uniform(0, height, per_image)
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = (boxes[:, 2] - boxes[:, 0] > 0.5) & (boxes[:, 3] - boxes[:, 1] > 0.5)
        images.append((height, width, boxes[keep], rng.integers(1, 4, int(keep.sum()))))
    return images


IMAGE_SIZES = [(90, 150), (128, 128), (200, 97), (61, 300), (150, 151)]


@pytest.fixture(scope="module")
def fpn_anchors() -> DetectorAnchors:
    return DetectorAnchors(ModelConfig(num_classes=2, backbone="resnet50_fpn", anchor_sizes=SMALL_ANCHORS,
                                       min_size=(128,), max_size=200))


# ---------------------------------------------------------------------------- tests
def test_loop_anchors_are_the_models_anchors():
    """The reference anchors equal AnchorsGenerator's on a real FPN, at a padded size (96 x 160)
    that is not a multiple of the 64-pixel stride of the last level."""
    config = ModelConfig(num_classes=2, backbone="resnet50_fpn", anchor_sizes=SMALL_ANCHORS, min_size=(96,),
                         max_size=160)
    model = build_model(config).eval()
    with torch.no_grad():
        image_list, _ = model.transform([torch.rand(3, 90, 150)])
        features = list(model.backbone(image_list.tensors).values())
        generated = model.rpn.anchor_generator(image_list, features)[0].double().numpy()
    assert tuple(image_list.tensors.shape[-2:]) == (96, 160)
    expected = loop_anchors(FPN_STRIDES, [(s,) for s in SMALL_ANCHORS], (0.5, 1.0, 2.0), 96, 160)
    assert generated.shape == expected.shape == (3 * sum(math.ceil(96 / s) * math.ceil(160 / s)
                                                         for s in FPN_STRIDES), 4)
    np.testing.assert_array_equal(generated, expected)


@pytest.mark.parametrize("multi_scale", [False, True])
def test_fpn_coverage_equals_brute_force(fpn_anchors, multi_scale):
    images = random_images(0, IMAGE_SIZES, 40)
    min_sizes = (96, 128) if multi_scale else (128,)
    box_set = resize_boxes(images, min_sizes, 200)
    assert fpn_anchors.strides == FPN_STRIDES
    best = best_anchor_iou(box_set, fpn_anchors.default)
    want, labels = brute_force_best(images, min_sizes, 200, FPN_STRIDES, [(s,) for s in SMALL_ANCHORS],
                                    (0.5, 1.0, 2.0))
    assert len(best) == len(want) == sum(len(i[2]) for i in images) * len(min_sizes)
    np.testing.assert_allclose(best, want, rtol=0, atol=1e-9)
    for threshold in (0.7, 0.5):  # the counts themselves, not just close values
        assert (best >= threshold).sum() == (want >= threshold).sum()
    assert 0 < (want >= 0.7).sum() < (want >= 0.5).sum() < len(want)  # a case where thresholds matter
    table = coverage_table(box_set, best, ["a", "b", "c"])
    for label, name in enumerate("abc", start=1):
        mine = want[labels == label]
        row = (f"  class {name}  {len(mine):>7}  {(mine >= 0.7).mean():>8.1%}  {(mine >= 0.5).mean():>8.1%}  "
               f"{np.median(mine):>10.3f}")
        assert row in table, (row, table)
    assert table[1].split()[:2] == ["all", str(len(want))]


def test_single_map_coverage_equals_brute_force():
    """MobileNetV2 at stride 16: five sizes and two ratios on one map."""
    anchors = DetectorAnchors(ModelConfig(num_classes=2, backbone="mobilenet_v2", anchor_sizes=SMALL_ANCHORS,
                                          aspect_ratios=(0.5, 2.0), min_size=(128,), max_size=200,
                                          backbone_options={"feature_stride": 16, "width_mult": 0.5}))
    assert anchors.strides == (16,)
    images = random_images(1, IMAGE_SIZES, 40)
    best = best_anchor_iou(resize_boxes(images, (128,), 200), anchors.default)
    want, _ = brute_force_best(images, (128,), 200, (16,), [SMALL_ANCHORS], (0.5, 2.0))
    np.testing.assert_allclose(best, want, rtol=0, atol=1e-9)
    assert (best >= 0.7).sum() == (want >= 0.7).sum() > 0 and (best >= 0.5).sum() == (want >= 0.5).sum()


def test_suggestion_raises_the_coverage_of_small_objects():
    """Objects of 10-24 px in 128 px images: the default FPN anchors (32..512) give none of them an
    anchor of IoU 0.7; the suggested ones give a third of them one (the stride-4 grid and one size
    per level bound it) and nearly all one of IoU 0.5, scored exactly as the brute force scores
    them. Twice larger images do better still."""
    config = ModelConfig(num_classes=2, backbone="resnet50_fpn", min_size=(128,), max_size=128)
    anchors = DetectorAnchors(config)
    images = random_images(2, [(128, 128)] * 6, 30, side_range=(10.0, 24 / 128))
    box_set = resize_boxes(images, (128,), 128)
    before = score_layout(box_set, anchors.default)
    after = suggest_anchors(box_set, anchors, search_ratios=True)
    want, _ = brute_force_best(images, (128,), 128, FPN_STRIDES, [(s,) for s in after.layout.sizes],
                               after.layout.aspect_ratios)
    assert before.positive == 0.0 and before.layout.sizes == (32, 64, 128, 256, 512)
    assert after.positive == (want >= 0.7).mean() and after.loose == (want >= 0.5).mean()
    assert after.positive > 0.3 and after.loose > 0.95 > 0.5 > before.loose
    assert len(after.layout.sizes) == 5 and len(after.layout.aspect_ratios) == 3
    [(min_sizes, max_size, larger)] = larger_inputs(images, config, anchors, True, factors=(2.0,))
    assert (min_sizes, max_size) == ((256,), 256) and larger.positive > after.positive + 0.2
    assert low_coverage_hint(after, box_set) is None


def test_low_coverage_hint_for_small_objects_on_a_coarse_map():
    """The same 10-24 px objects on MobileNetV2's stride-16 map: no sizes give most of them an
    anchor of IoU 0.5 (centres 16 px apart), so auto names the stride as the cause."""
    config = ModelConfig(num_classes=2, backbone="mobilenet_v2", min_size=(128,), max_size=128,
                         backbone_options={"feature_stride": 16, "width_mult": 0.5})
    images = random_images(2, [(128, 128)] * 6, 30, side_range=(10.0, 24 / 128))
    fit = fit_anchor_sizes(resize_boxes(images, (128,), 128), DetectorAnchors(config))
    assert fit.chosen.layout.sizes != fit.current.layout.sizes
    assert fit.chosen.loose > fit.current.loose and 0 < fit.chosen.loose < 0.5
    assert fit.hint is not None and "\n" not in fit.hint
    assert f"for only {fit.chosen.loose:.1%} of the boxes: they are small" in fit.hint
    assert "for the feature stride 16; a larger --min-size or an FPN backbone helps more" in fit.hint
    assert describe_auto_anchors(fit).splitlines()[1] == fit.hint


def test_auto_keeps_the_backbone_sizes_when_no_sizes_cover_more():
    """Boxes of 114 x 19 px (1:6) on the FPN: no anchor of ratio 0.5-2 of any size reaches IoU 0.5,
    so the suggestion keeps the backbone's sizes (the search would otherwise return an arbitrary
    tie) and auto blames the aspect ratios, not the stride."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(4):
        x, y = rng.uniform(0, 512 - 114, 20), rng.uniform(0, 512 - 19, 20)
        images.append((512, 512, np.stack([x, y, x + 114, y + 19], 1), np.ones(20, dtype=np.int64)))
    config = ModelConfig(num_classes=2, backbone="resnet50_fpn", min_size=(512,), max_size=512)
    fit = fit_anchor_sizes(resize_boxes(images, (512,), 512), DetectorAnchors(config))
    assert fit.chosen.layout.sizes == fit.current.layout.sizes == (32, 64, 128, 256, 512)
    assert (fit.chosen.positive, fit.chosen.loose) == (fit.current.positive, fit.current.loose) == (0.0, 0.0)
    assert fit.count == 80
    assert fit.hint.endswith("of the boxes: their shapes do not fit --aspect-ratios 0.5,1,2; "
                             "tools/check_dataset.py --anchors suggests ratios that cover more")
    assert describe_auto_anchors(fit).startswith(
        "--anchor-sizes auto: no sizes cover more of the 80 training boxes than the backbone's 32,64,128,256,512 ")


def test_check_dataset_anchors_report_and_plot(demo_voc, tmp_path, capsys):
    plot = tmp_path / "coverage.png"
    code = check_dataset.main([str(demo_voc), "--classes-json", str(demo_voc / "classes.json"), "--anchors",
                               "--backbone", "mobilenet_v2", "--feature-stride", "16", "--width-mult", "0.5",
                               "--min-size", "128", "--max-size", "128", "--anchor-sizes", "32,64,128",
                               "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0, out
    dataset = build_dataset("voc", demo_voc, "train.txt", None, demo_voc / "classes.json")
    want, _ = brute_force_best(dataset_boxes(dataset), (128,), 128, (16,), [(32, 64, 128)], (0.5, 1.0, 2.0))
    configured = out.split("configured: --anchor-sizes 32,64,128 --aspect-ratios 0.5,1,2\n")[1].splitlines()
    assert configured[1] == (f"  {'all':<14}  {len(want):>7}  {(want >= 0.7).mean():>8.1%}  "
                             f"{(want >= 0.5).mean():>8.1%}  {np.median(want):>10.3f}")
    assert "  sizes and ratios: --anchor-sizes " in out and f"plot: {plot}" in out
    with Image.open(plot) as picture:
        assert picture.size == (1200, 336)


def built_trainer(argv):
    """A Trainer of train_mobilenet.py's flags, built up to its model (no training)."""
    from train_mobilenet import DEFAULTS
    from train_utils.engine.args import parse_training_args
    from train_utils.engine.trainer import Trainer

    trainer = Trainer(parse_training_args("t", DEFAULTS, argv=argv))
    trainer.setup_device()
    try:
        trainer.find_resume_checkpoint()
        trainer.build_datasets()
        trainer.choose_anchor_sizes()
        trainer.build_model()
    finally:
        trainer.signals.uninstall()
    return trainer


def test_anchor_sizes_auto_in_training(demo_voc, tmp_path, capsys, monkeypatch):
    """The trainer puts the suggestion into the model config (what the checkpoint stores) and
    builds exactly the model the same sizes typed in give (same weights: the search leaves the
    random state alone) and prints the sizes and the low-coverage hint (forced here: the demo's
    objects need none); 'auto' mixed with sizes, or outside training, is refused."""
    from train_mobilenet import DEFAULTS
    from train_utils.engine.args import parse_training_args

    flags = ["--data-path", str(demo_voc), "--classes-json", str(demo_voc / "classes.json"), "--output-dir",
             str(tmp_path), *TINY_COMMON_FLAGS, *MOBILENET_OPTIONS]
    position = flags.index("--anchor-sizes") + 1
    monkeypatch.setattr(anchor_coverage, "LOW_COVERAGE", 1.01)
    trainer = built_trainer(flags[:position] + ["auto"] + flags[position + 1:])
    printed = capsys.readouterr().out
    config = ModelConfig.from_dict({**trainer.config.to_dict(), "anchor_sizes": None})
    box_set = resize_boxes(dataset_boxes(trainer.train_set), (128,), 128)
    chosen = suggest_anchors(box_set, DetectorAnchors(config), search_ratios=False)
    sizes = chosen.layout.sizes
    assert trainer.config.anchor_sizes == sizes and trainer.args.anchor_sizes == list(sizes)
    assert len(sizes) == 5 and all(b >= 1.35 * a for a, b in zip(sizes, sizes[1:])), sizes  # no near-duplicates
    assert trainer.model_without_ddp.rpn.anchor_generator.sizes == (sizes,)
    assert f"--anchor-sizes auto: {','.join(map(str, sizes))} (best anchor IoU >= 0.7 for " in printed
    hint = low_coverage_hint(chosen, box_set)
    assert hint is not None and printed.count("--anchor-sizes auto:") == 2 and f"\n{hint}\n" in printed
    monkeypatch.undo()
    assert chosen.loose >= 0.5 and low_coverage_hint(chosen, box_set) is None
    typed = built_trainer(flags[:position] + [",".join(map(str, sizes))] + flags[position + 1:])
    assert typed.config == trainer.config
    for key, value in typed.model_without_ddp.state_dict().items():
        assert torch.equal(value, trainer.model_without_ddp.state_dict()[key]), key
    with pytest.raises(SystemExit):
        parse_training_args("t", DEFAULTS, argv=["--anchor-sizes", "auto,32"])
    assert "'auto' stands alone" in capsys.readouterr().err
    evaluation = argparse.ArgumentParser()
    add_model_flags(evaluation, training=False)  # validation.py, predict.py: the checkpoint has the sizes
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--anchor-sizes", "auto"])
    assert "--anchor-sizes: expected int values, got auto" in capsys.readouterr().err


# ---------------------------------------------------------------------------- browse_dataset
@pytest.fixture
def small_voc(tmp_path):
    items = [VocItem("fine", width=96, height=64, objects=[VocObject("cat", (10, 8, 60, 50))]),
             VocItem("outside", width=96, height=64, objects=[VocObject("dog", (-5, 3, 40, 47))]),
             VocItem("plain", width=64, height=96, objects=[VocObject("dog", (4, 30, 50, 90))]),
             VocItem("empty", width=96, height=64)]
    write_voc(tmp_path, items)
    write_classes_json(tmp_path / "classes.json", ["cat", "dog"])
    return tmp_path


def drawn_edge(grid: np.ndarray, position: int, box, image_size, cell_size: int, columns: int) -> np.ndarray:
    """The pixels [K, 3] of the left edge of ``box`` (xyxy in an image of (height, width)) drawn in
    cell ``position``, below any name label (the label sits above the box or inside its top)."""
    scale = browse_dataset.cell_scale(*image_size, cell_size)
    shown = (round(image_size[1] * scale), round(image_size[0] * scale))
    left, top, right, bottom = outline_pixels([v * scale for v in box], *shown)
    x0, y0 = browse_dataset.cell_origin(position, columns, cell_size)
    return grid[y0 + top + 20:y0 + bottom + 1, x0 + left]


def test_browse_dataset_draws_boxes_in_class_colours(small_voc, tmp_path, capsys):
    out = tmp_path / "grids"
    code = browse_dataset.main([str(small_voc), "--classes-json", str(small_voc / "classes.json"), "--augment",
                                "none", "--per-grid", "3", "--cell-size", "128", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"wrote {out / 'grid_000.png'}: fine, outside, plain" in printed
    assert f"wrote {out / 'grid_001.png'}: empty" in printed
    grid = np.asarray(Image.open(out / "grid_000.png").convert("RGB"))
    gap, caption = browse_dataset.GAP, browse_dataset.caption_height()
    assert grid.shape == (gap + 2 * (128 + caption + gap), gap + 2 * (128 + gap), 3)  # 3 cells: 2 columns, 2 rows
    cat, dog = np.array(class_colour(1)), np.array(class_colour(2))
    assert (drawn_edge(grid, 0, (10, 8, 60, 50), (64, 96), 128, 2) == cat).all()
    assert (drawn_edge(grid, 1, (0, 3, 40, 47), (64, 96), 128, 2) == dog).all()  # clipped to the image


def test_browse_dataset_only_problems(small_voc, tmp_path, capsys):
    out = tmp_path / "grids"
    code = browse_dataset.main([str(small_voc), "--classes-json", str(small_voc / "classes.json"), "--augment",
                                "hflip", "--only-problems", "--cell-size", "64", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and f"wrote {out / 'grid_000.png'}: outside, empty\n" in printed
    problems = check_dataset.image_problems("voc", str(small_voc), "train.txt", str(small_voc / "classes.json"))
    assert problems == {"outside": ["boxes outside the image (clipped)"], "empty": ["images without objects"]}
    assert json.loads((small_voc / "classes.json").read_text()) == {"cat": 1, "dog": 2}
