"""tools/make_scenes_voc.py: the realistic synthetic scenes read back by the project's VOC reader,
byte-identical under a seed, boxes around the visible pixels, VOC flags set by rule, occlusion and
scale variety present."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import make_scenes_voc as scenes
from train_utils.data.voc import VOCDataSet


SMALL = scenes.SceneRecipe(size_range=(96, 160))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("scenes")
    return out, scenes.make_scenes_voc(out, num_images=12, seed=5, recipe=SMALL)


def test_files_read_back_by_the_voc_reader(small_set):
    out, stats = small_set
    classes = out / "classes.json"
    assert json.loads(classes.read_text()) == {name: i for i, name in enumerate(scenes.CLASSES, start=1)}
    train = VOCDataSet(out, txt_name="train.txt", classes_json=classes)
    val = VOCDataSet(out, txt_name="val.txt", classes_json=classes)
    assert (len(train), len(val)) == (10, 2) and not set(train.ids) & set(val.ids)
    counts = dict.fromkeys(scenes.CLASSES, 0)
    sizes, difficult = set(), 0
    for dataset in (train, val):
        for idx in range(len(dataset)):
            height, width, target = dataset.coco_index(idx)
            image, _ = dataset[idx]
            assert (image.height, image.width) == (height, width)
            assert 96 <= min(height, width) <= max(height, width) <= 160
            sizes.add((height, width))
            boxes = target["boxes"]
            assert bool((boxes[:, 2:] > boxes[:, :2]).all())
            assert bool((boxes >= 0).all() and (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all())
            difficult += int(target["iscrowd"].sum())
            for label in target["labels"].tolist():
                counts[dataset.class_names[label - 1]] += 1
    assert counts == {name: stats[name] for name in counts} and difficult == stats["difficult"]
    assert len(sizes) >= 10  # width and height drawn per image


def test_same_seed_same_bytes_other_seed_other_images(small_set, tmp_path):
    out, _ = small_set
    scenes.make_scenes_voc(tmp_path / "again", num_images=12, seed=5, recipe=SMALL)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) == 12 + 12 + 2 + 1
    for rel in files:
        assert (tmp_path / "again" / rel).read_bytes() == (out / rel).read_bytes(), rel
    first = scenes.draw_scene(5, 0, SMALL)[0]
    assert np.asarray(scenes.draw_scene(6, 0, SMALL)[0]).tobytes() != np.asarray(first).tobytes()


def test_flags_follow_visibility_size_and_border():
    objects, shapes = [], []
    for index in range(40):
        image, found, quality = scenes.draw_scene(1, index, scenes.SceneRecipe(size_range=(128, 256)))
        assert 35 <= quality <= 95
        objects += found
        shapes += [(image.width, image.height)] * len(found)
    assert len(objects) > 100
    for obj, (width, height) in zip(objects, shapes):
        xmin, ymin, xmax, ymax = obj.box
        assert 0 <= xmin < xmax <= width and 0 <= ymin < ymax <= height
        side = max(xmax - xmin, ymax - ymin)
        assert obj.difficult == int(obj.visible < 0.4 or side < 10)
        assert scenes.MIN_VISIBLE <= obj.visible <= 1.0
        if obj.truncated:  # a cut object's box reaches the border, and part of it is hidden
            assert (xmin == 0 or ymin == 0 or xmax == width or ymax == height) and obj.visible < 1.0
    occluded = [o for o in objects if not o.truncated and o.visible < 0.9]
    assert len(occluded) >= 0.1 * len(objects)  # overlapping objects and front clutter
    assert any(o.difficult and not o.truncated and max(o.box[2] - o.box[0], o.box[3] - o.box[1]) >= 10
               for o in objects)  # difficult by occlusion alone
    assert any(o.truncated for o in objects) and any(o.visible == 1.0 for o in objects)
    relative = [max(o.box[2] - o.box[0], o.box[3] - o.box[1]) / min(s) for o, s in zip(objects, shapes)
                if not o.truncated]
    assert min(relative) < 0.05 and max(relative) > 0.4  # log-uniform 3-60% of the shorter side


def test_placement_rules_on_hand_made_masks():
    def paint(n: int) -> np.ndarray:
        return np.full((n, n, 3), 200, np.float32)

    scene = scenes._Scene(np.zeros((40, 50, 3), np.float32))
    square = np.ones((10, 10), bool)
    assert scene.place(square, 5, 5, paint(10), "box")
    assert scene.place(square, 12, 5, paint(10), "disc")  # hides 3 of the first square's 10 columns
    assert scene.visible == [70, 100]
    assert not scene.place(square, 6, 5, paint(10), "star")  # would leave it 10% < MIN_VISIBLE: rejected
    assert scene.visible == [70, 100] and (scene.owner == 0).sum() == 70
    assert scene.place(np.ones((4, 4), bool), 8, 5, paint(4), None)  # front clutter hides 16 more
    assert scene.place(np.ones((20, 20), bool), 35, -4, paint(20), "cross")  # 4 rows and 5 columns outside
    assert (scene.owner >= 0).sum() == 54 + 100 + 240  # visible object pixels
    assert (scene.pixels == 200).all(axis=-1).sum() == 54 + 100 + 240 + 16  # and the clutter, painted
    first, second, cut = scene.annotations()  # boxes around the visible pixels only
    assert (first.box, first.truncated, first.difficult, first.visible) == ((5, 5, 12, 15), 0, 0, 0.54)
    assert (second.box, second.truncated, second.difficult, second.visible) == ((12, 5, 22, 15), 0, 0, 1.0)
    assert (cut.box, cut.truncated, cut.difficult, cut.visible) == ((35, 0, 50, 16), 1, 0, 0.6)
    assert scene.place(square, -3, 5, paint(10), "ring")  # hides the first square's columns 5 and 6
    first, ring = scene.annotations()[0], scene.annotations()[3]
    assert (first.box, first.difficult, first.visible) == ((7, 5, 12, 15), 1, 0.34)  # more than 60% hidden
    assert (ring.box, ring.truncated, ring.difficult, ring.visible) == ((0, 5, 7, 15), 1, 0, 0.7)
    tiny = scenes._Scene(np.zeros((40, 50, 3), np.float32))
    tiny.place(np.ones((9, 9), bool), 0, 0, paint(9), "disc")
    assert tiny.annotations()[0].difficult == 1  # under TINY_SIDE pixels


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(xmin, ymin, xmax, ymax) of the True pixels of bool [H, W] ``mask``, by row and column scans."""
    cols = [x for x in range(mask.shape[1]) if mask[:, x].any()]
    rows = [y for y in range(mask.shape[0]) if mask[y].any()]
    return cols[0], rows[0], cols[-1] + 1, rows[-1] + 1


def test_box_is_the_tight_box_of_the_visible_pixels():
    scene = scenes._Scene(np.zeros((30, 40, 3), np.float32))
    back = np.zeros((14, 14), bool)
    back[2:12, 1:13] = True  # a 12 x 10 rectangle inside its square, at image columns 4..15, rows 5..14
    assert scene.place(back, 3, 3, np.full((14, 14, 3), 100, np.float32), "box")
    front = np.ones((16, 16), bool)  # rows 1..16, columns 10..25: hides the back object's columns 10..15
    assert scene.place(front, 10, 1, np.full((16, 16, 3), 200, np.float32), "disc")
    visible = np.zeros((30, 40), bool)
    visible[5:15, 4:10] = True  # independent reference: the rectangle minus the front square
    assert ((scene.pixels[..., 0] == 100) == visible).all() and (scene.owner == 0).sum() == visible.sum()
    back_obj, front_obj = scene.annotations()
    assert back_obj.box == _tight_box(visible) == (4, 5, 10, 15)
    assert (back_obj.visible, back_obj.difficult, back_obj.truncated) == (0.5, 0, 0)
    assert front_obj.box == (10, 1, 26, 17) and front_obj.visible == 1.0
    assert scene.place(np.ones((8, 8), bool), 3, 11, np.zeros((8, 8, 3), np.float32), None)  # clutter in front
    visible[11:19, 3:11] = False  # hides the back object's rows 11..14
    back_obj, front_obj = scene.annotations()
    assert back_obj.box == _tight_box(visible) == (4, 5, 10, 11) and back_obj.visible == 0.3
    assert back_obj.difficult == 1 and front_obj.box == (10, 1, 26, 17)  # its column 10 still shows rows 1..10
    scene.owner[scene.owner == 0] = scenes.CLUTTER  # nothing of it left in view: not annotated
    assert [o.name for o in scene.annotations()] == ["disc"]


def test_class_subset_sizes_and_counts_from_the_command_line(tmp_path, capsys):
    scenes.main(["--out", str(tmp_path), "--num-images", "4", "--size", "64", "80", "--classes", "ring", "star",
                 "--object-scale", "0.2", "0.3", "--objects", "2", "3", "--val-fraction", "0.5"])
    assert json.loads((tmp_path / "classes.json").read_text()) == {"ring": 1, "star": 2}
    assert len((tmp_path / "VOCdevkit/VOC2012/ImageSets/Main/val.txt").read_text().split()) == 2
    with Image.open(tmp_path / "VOCdevkit/VOC2012/JPEGImages/scene_00000.jpg") as image:
        assert 64 <= min(image.size) <= max(image.size) <= 80
    recipe = scenes.SceneRecipe((64, 80), ("ring", "star"), (0.2, 0.3), (2, 3))
    drawn = [scenes.draw_scene(0, i, recipe) for i in range(12)]
    objects = [o for _, found, _ in drawn for o in found]
    assert {o.name for o in objects} == {"ring", "star"} and {len(found) for _, found, _ in drawn} <= {0, 2, 3}
    sides = [max(o.box[2] - o.box[0], o.box[3] - o.box[1]) / min(image.size) for image, found, _ in drawn
             for o in found if o.visible == 1.0]
    assert sides and 0.2 - 0.03 <= min(sides) and max(sides) <= 0.3 + 0.03  # pixel rounding of small squares
    bad = [(["--classes", "disc", "moon"], "--classes takes distinct names from disc, ring, cross, star, box, "
                                           "triangle, got disc moon"),
           (["--classes", "disc", "disc"], "--classes takes distinct names from disc, ring, cross, star, box, "
                                           "triangle, got disc disc"),
           (["--size", "300", "200"], "--size LOW HIGH must satisfy 64 <= LOW <= HIGH, got 300 200"),
           (["--object-scale", "0", "0.5"], "--object-scale LOW HIGH must satisfy 0 < LOW <= HIGH <= 0.9, got 0 0.5"),
           (["--objects", "3", "2"], "--objects LOW HIGH must satisfy 1 <= LOW <= HIGH, got 3 2"),
           (["--val-fraction", "1"], "--val-fraction must lie strictly between 0 and 1, got 1"),
           (["--num-images", "1"], "--num-images must be at least 2, got 1")]
    for argv, message in bad:
        with pytest.raises(SystemExit):
            scenes.parse_args(argv)
        assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")
