"""COCO, YOLO and labelme datasets and the dataset factory: the same scene written in every format
gives the same targets; format-specific parsing, mapping and errors; a COCO training run."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conftest import ROOT, SCHEDULE, TINY_TRAIN_FLAGS
from my_dataset import CocoDataSet, LabelmeDataSet, VOCDataSet, YoloDataSet
from train_utils.evaluation.coco_api import get_coco_api_from_dataset
from train_utils.data.catalog import build_dataset, read_annotations
from train_utils.data.yolo import read_class_names
from voc_factory import VocItem, VocObject, image_pixels, write_classes_json, write_voc

CLASSES = ["cat", "dog", "person"]
CATEGORY_IDS = {"cat": 3, "dog": 7, "person": 20}  # not contiguous, same order as CLASSES


# ------------------------------------------------------------------------------ writers
def scene() -> list[VocItem]:
    """Four images: two objects, one object filling a PNG, no object, two objects."""
    return [
        VocItem("a", objects=[VocObject("dog", (3, 5, 30, 40)), VocObject("cat", (10.5, 2, 60, 47.5))]),
        VocItem("b", width=50, height=30, image_ext=".png", objects=[VocObject("cat", (0, 0, 50, 30))]),
        VocItem("c", width=40, height=40),
        VocItem("d", objects=[VocObject("person", (1, 1, 20, 20)), VocObject("dog", (30.25, 10, 63, 47))]),
    ]


def save_image(path: Path, width: int, height: int, exif_orientation: Optional[int] = None) -> Path:
    """A small gradient image (JPEG or PNG by suffix), optionally with an EXIF orientation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(image_pixels(VocItem(path.stem, width=width, height=height)))
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, quality=95, exif=exif.tobytes())
    else:
        image.save(path, quality=95)
    return path


def write_coco_json(path: Path, images: list, annotations: list, categories: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def write_coco(root: Path, split: str, items: Sequence[VocItem], image_files: dict) -> Path:
    """``root/annotations/instances_<split>.json`` and ``root/<split>/`` from VOC items; difficult
    objects become crowd annotations."""
    images, annotations = [], []
    (root / split).mkdir(parents=True)
    for number, item in enumerate(items):
        file_name = image_files[item.id].name
        shutil.copy(image_files[item.id], root / split)
        images.append({"id": 100 + number, "file_name": file_name, "width": item.width, "height": item.height})
        for obj in item.objects:
            x1, y1, x2, y2 = obj.box
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + number,
                                "category_id": CATEGORY_IDS[obj.name], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": obj.difficult or 0})
    categories = [{"id": cid, "name": name} for name, cid in sorted(CATEGORY_IDS.items(), key=lambda kv: -kv[1])]
    return write_coco_json(root / "annotations" / f"instances_{split}.json", images, annotations, categories)


def yolo_line(class_id: int, box: Sequence[float], width: int, height: int) -> str:
    x1, y1, x2, y2 = box
    return (f"{class_id} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
            f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")


def write_yolo(root: Path, split: str, items: Sequence[VocItem], image_files: dict) -> Path:
    """``root/images/<split>``, ``root/labels/<split>`` (no file for an image without objects), classes.txt."""
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for item in items:
        shutil.copy(image_files[item.id], root / "images" / split)
        if item.objects:
            lines = [yolo_line(CLASSES.index(o.name), o.box, item.width, item.height) for o in item.objects]
            (root / "labels" / split / f"{item.id}.txt").write_text("\n".join(lines) + "\n")
    return root


def labelme_shape(label: str, box: Sequence[float], kind: str) -> dict:
    """A rectangle given by its corners in reverse order, or a polygon whose bounding box is ``box``."""
    x1, y1, x2, y2 = box
    if kind == "rectangle":
        points = [[x2, y2], [x1, y1]]
    else:
        points = [[x1, y2], [(x1 + x2) / 2, y1], [x2, y2], [x2, (y1 + y2) / 2]]
    return {"label": label, "points": points, "group_id": None, "shape_type": kind, "flags": {}}


def write_labelme_json(path: Path, image_path: str, width: int, height: int, shapes: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
                                "imageData": None, "imageHeight": height, "imageWidth": width}))
    return path


def write_labelme(root: Path, items: Sequence[VocItem], image_files: dict) -> Path:
    """One labelme json per item beside its image; objects alternate rectangle / polygon."""
    root.mkdir(parents=True)
    for item in items:
        shutil.copy(image_files[item.id], root)
        shapes = [labelme_shape(o.name, o.box, "rectangle" if k % 2 == 0 else "polygon")
                  for k, o in enumerate(item.objects)]
        write_labelme_json(root / f"{item.id}.json", image_files[item.id].name, item.width, item.height, shapes)
    return root


def write_all_formats(root: Path, items: Sequence[VocItem]) -> dict[str, Path]:
    """The same items as VOC, COCO (split 'train'), YOLO (split 'train') and labelme; also the
    classes json. Image files are byte-identical copies of the VOC ones."""
    voc_dir = write_voc(root / "voc", items)
    image_files = {item.id: voc_dir / "JPEGImages" / f"{item.id}{item.image_ext}" for item in items}
    write_coco(root / "coco", "train", items, image_files)
    write_yolo(root / "yolo", "train", items, image_files)
    write_labelme(root / "labelme", items, image_files)
    return {"voc": root / "voc", "coco": root / "coco", "yolo": root / "yolo", "labelme": root / "labelme",
            "classes_json": write_classes_json(root / "classes.json", CLASSES)}


def build_all(paths: dict[str, Path]) -> dict[str, object]:
    return {
        "voc": build_dataset("voc", paths["voc"], "train.txt", None, paths["classes_json"]),
        "coco": build_dataset("coco", paths["coco"], "train.txt", None),  # .txt is stripped
        "yolo": build_dataset("yolo", paths["yolo"], "train", None),
        "labelme": build_dataset("labelme", paths["labelme"], "", None),
    }


# ------------------------------------------------------------------------------ all formats agree
def test_every_format_gives_the_same_targets(tmp_path):
    datasets = build_all(write_all_formats(tmp_path, scene()))
    voc = datasets["voc"]
    expected_boxes = [[(3, 5, 30, 40), (10.5, 2, 60, 47.5)], [(0, 0, 50, 30)], [],
                      [(1, 1, 20, 20), (30.25, 10, 63, 47)]]
    expected_labels = [[2, 1], [1], [], [3, 2]]
    for idx in range(4):
        target = voc[idx][1]
        assert torch.equal(target["boxes"], torch.tensor(expected_boxes[idx], dtype=torch.float32).reshape(-1, 4))
        assert target["labels"].tolist() == expected_labels[idx]

    for fmt, dataset in datasets.items():
        assert type(dataset).__name__ == {"voc": "VOCDataSet", "coco": "CocoDataSet",
                                          "yolo": "YoloDataSet", "labelme": "LabelmeDataSet"}[fmt]
        assert dataset.class_names == CLASSES and dataset.num_classes == 3, fmt
        assert dataset.class_dict == {"cat": 1, "dog": 2, "person": 3}, fmt
        assert len(dataset) == 4 and [Path(i).stem for i in dataset.ids] == ["a", "b", "c", "d"], fmt
        assert not any(dataset.skipped.values()), fmt
        for idx in range(4):
            image, target = dataset[idx]
            reference_image, reference = voc[idx]
            assert np.array_equal(np.asarray(image), np.asarray(reference_image)), (fmt, idx)
            assert set(target) == {"boxes", "labels", "image_id", "area", "iscrowd"}
            assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == reference["boxes"].shape
            tolerance = 1e-3 if fmt == "yolo" else 0.0  # 6 decimals of a fraction of <= 64 pixels
            torch.testing.assert_close(target["boxes"], reference["boxes"], atol=tolerance, rtol=0)
            torch.testing.assert_close(target["area"], reference["area"], atol=0.1 if fmt == "yolo" else 0.0, rtol=0)
            assert target["labels"].dtype == torch.int64 and torch.equal(target["labels"], reference["labels"])
            assert target["iscrowd"].dtype == torch.int64 and torch.equal(target["iscrowd"], reference["iscrowd"])
            assert target["image_id"].shape == () and int(target["image_id"]) == idx
            assert dataset.get_height_and_width(idx) == voc.get_height_and_width(idx) == image.size[::-1]
            height, width, coco_target = dataset.coco_index(idx)
            assert (height, width) == image.size[::-1]
            assert all(torch.equal(coco_target[key], target[key]) for key in target)
        coco = get_coco_api_from_dataset(dataset)
        assert [c["name"] for c in coco.dataset["categories"]] == CLASSES
        assert len(coco.dataset["annotations"]) == 5
    assert CocoDataSet.collate_fn([("i0", "t0"), ("i1", "t1")]) == (("i0", "i1"), ("t0", "t1"))


def test_construction_sizes_and_ground_truth_need_no_decoding(tmp_path, monkeypatch):
    paths = write_all_formats(tmp_path, scene())
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail(f"{self.filename} decoded"))
    for fmt, dataset in build_all(paths).items():
        assert [dataset.get_height_and_width(i) for i in range(4)] == [(48, 64), (30, 50), (40, 40), (48, 64)], fmt
        assert len(get_coco_api_from_dataset(dataset).dataset["images"]) == 4


def test_unreadable_image_falls_back_to_the_next_one(tmp_path):
    paths = write_all_formats(tmp_path, scene())
    image = paths["yolo"] / "images" / "train" / "d.jpg"
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])  # the header still reads
    dataset = build_dataset("yolo", paths["yolo"], "train", None)
    assert len(dataset) == 4
    with pytest.warns(UserWarning, match=r"YoloDataSet: skipping unreadable image .*d\.jpg"):
        _, target = dataset[3]
    assert int(target["image_id"]) == 0 and dataset.skipped["unreadable_images"] == 1  # wrapped to the first
    assert "skipped 1 unreadable images: d.jpg: cannot decode" in dataset.summary()


# ------------------------------------------------------------------------------ COCO
def coco_images(folder: Path) -> list:
    save_image(folder / "x.jpg", 64, 48)
    save_image(folder / "y.jpg", 32, 32)
    save_image(folder / "z.png", 40, 30)
    return [{"id": 7, "file_name": "x.jpg", "width": 64, "height": 48},
            {"id": 3, "file_name": "y.jpg", "width": 32, "height": 32},
            {"id": 11, "file_name": "z.png", "width": 40, "height": 30}]


COCO_CATEGORIES = [{"id": 90, "name": "zebra"}, {"id": 2, "name": "bike"}, {"id": 15, "name": "bench"}]
COCO_ANNOTATIONS = [
    {"id": 1, "image_id": 7, "category_id": 2, "bbox": [1, 2, 10, 20], "iscrowd": 0},
    {"id": 2, "image_id": 7, "category_id": 90, "bbox": [0, 0, 64, 48], "iscrowd": 1},
    {"id": 3, "image_id": 7, "category_id": 15, "bbox": [60, 40, 10, 10]},  # clipped to 64x48
    {"id": 4, "image_id": 7, "category_id": 15, "bbox": [70, 5, 5, 5], "iscrowd": 0},  # outside: dropped
    {"id": 5, "image_id": 11, "category_id": 15, "bbox": [5.5, 6.25, 10, 3], "iscrowd": 0},
]


def test_coco_categories_crowd_and_empty_images(tmp_path):
    path = write_coco_json(tmp_path / "ann.json", coco_images(tmp_path / "img"), COCO_ANNOTATIONS, COCO_CATEGORIES)
    with pytest.warns(UserWarning, match="dropped 1 degenerate boxes"):
        dataset = CocoDataSet(tmp_path / "img", path)
    assert dataset.class_names == ["bike", "bench", "zebra"]  # category-id order 2, 15, 90
    assert dataset.category_to_label == {2: 1, 15: 2, 90: 3} and dataset.label_to_category == {1: 2, 2: 15, 3: 90}
    assert dataset.ids == ["x.jpg", "y.jpg", "z.png"] and dataset.coco_image_ids == [7, 3, 11]
    assert dataset.classes_json == path and dataset.split_file == path
    assert dataset.skipped == {"degenerate_boxes": 1, "unknown_class_objects": 0, "unreadable_images": 0,
                               "size_mismatch_images": 0, "crowd_objects": 0}
    x, y, z = (dataset.coco_index(i)[2] for i in range(3))
    assert x["boxes"].tolist() == [[1, 2, 11, 22], [0, 0, 64, 48], [60, 40, 64, 48]]
    assert x["labels"].tolist() == [1, 3, 2] and x["iscrowd"].tolist() == [0, 1, 0]
    assert x["area"].tolist() == [200, 64 * 48, 32]
    assert y["boxes"].shape == (0, 4) and y["labels"].shape == (0,)  # kept without annotations
    assert z["boxes"].tolist() == [[5.5, 6.25, 15.5, 9.25]] and z["labels"].tolist() == [2]
    assert dataset[1][0].size == (32, 32)

    with pytest.warns(UserWarning, match="skipped 1 crowd objects"):
        no_crowd = CocoDataSet(tmp_path / "img", path, skip_crowd=True)
    assert no_crowd.skipped["crowd_objects"] == 1 and no_crowd.coco_index(0)[2]["labels"].tolist() == [1, 2]


def test_coco_classes_json_maps_by_name(tmp_path):
    path = write_coco_json(tmp_path / "ann.json", coco_images(tmp_path / "img"), COCO_ANNOTATIONS, COCO_CATEGORIES)
    names = write_classes_json(tmp_path / "names.json", ["zebra", "bench", "bike"])
    with pytest.warns(UserWarning):
        dataset = CocoDataSet(tmp_path / "img", path, classes_json=names)
    assert dataset.class_names == ["zebra", "bench", "bike"] and dataset.classes_json == names
    assert dataset.category_to_label == {90: 1, 15: 2, 2: 3}
    assert dataset.coco_index(0)[2]["labels"].tolist() == [3, 1, 2]

    partial = write_classes_json(tmp_path / "partial.json", ["bench", "bike"])
    with pytest.raises(ValueError, match=r"classes not in .*partial\.json: 'zebra' \(e\.g\. .*ann\.json\)"):
        CocoDataSet(tmp_path / "img", path, classes_json=partial)
    with pytest.warns(UserWarning, match="skipped 1 objects of unknown classes"):
        dataset = CocoDataSet(tmp_path / "img", path, classes_json=partial, skip_unknown_classes=True)
    assert dataset.coco_index(0)[2]["labels"].tolist() == [2, 1] and dataset.label_to_category == {1: 15, 2: 2}


def test_coco_missing_images_are_one_error(tmp_path):
    images = coco_images(tmp_path / "img") + [{"id": 100 + i, "file_name": f"gone{i}.jpg", "width": 8, "height": 8}
                                              for i in range(7)]
    path = write_coco_json(tmp_path / "ann.json", images, [], COCO_CATEGORIES)
    with pytest.raises(FileNotFoundError) as error:
        CocoDataSet(tmp_path / "img", path)
    message = str(error.value)
    assert message.startswith(f"CocoDataSet: 7 image files listed in {path} are missing: ")
    assert "gone0.jpg" in message and "gone4.jpg" in message and "gone5.jpg" not in message
    assert "(2 more)" in message and "x.jpg" not in message


def test_coco_invalid_entries_name_the_annotation(tmp_path):
    bad = [
        {"id": 21, "image_id": 7, "category_id": 2, "bbox": [1, 2, 3]},
        {"id": 22, "image_id": 999, "category_id": 2, "bbox": [1, 2, 3, 4]},
        {"id": 23, "image_id": 7, "category_id": 5, "bbox": [1, 2, 3, 4]},
        {"id": 24, "image_id": 7, "category_id": 2, "bbox": [1, 2, 3, 4], "iscrowd": 2},
    ]
    path = write_coco_json(tmp_path / "ann.json", coco_images(tmp_path / "img"), COCO_ANNOTATIONS[:1] + bad,
                           COCO_CATEGORIES)
    with pytest.raises(ValueError) as error:
        CocoDataSet(tmp_path / "img", path)
    message = str(error.value)
    assert "CocoDataSet: 4 invalid entries" in message
    for fragment in ("annotation id 21: 'bbox' must be 4 finite numbers", "annotation id 22: unknown image_id 999",
                     "annotation id 23: unknown category_id 5", "annotation id 24: 'iscrowd' must be 0 or 1"):
        assert fragment in message

    for categories, fragment in [([{"id": 1, "name": "a"}, {"id": 2, "name": "a"}], "category names repeated: ['a']"),
                                 ([{"id": 1}], "categories[0] needs an integer 'id' and a non-empty 'name'"),
                                 ([], "lists no categories")]:
        write_coco_json(path, [], [], categories)
        with pytest.raises(ValueError, match=re.escape(fragment)):
            CocoDataSet(tmp_path / "img", path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="ann.json is not valid UTF-8 JSON"):
        CocoDataSet(tmp_path / "img", path)
    with pytest.raises(FileNotFoundError, match="annotation file .*nowhere.json does not exist"):
        CocoDataSet(tmp_path / "img", tmp_path / "nowhere.json")


def test_coco_size_mismatch_is_skipped(tmp_path):
    images = coco_images(tmp_path / "img")
    images[1]["width"] = 100
    path = write_coco_json(tmp_path / "ann.json", images, [], COCO_CATEGORIES)
    with pytest.warns(UserWarning, match="skipped 1 images whose size differs from the width/height in the "
                                         "annotation json: ann.json says 100x32, y.jpg is 32x32"):
        dataset = CocoDataSet(tmp_path / "img", path)
    assert dataset.ids == ["x.jpg", "z.png"] and dataset.coco_image_ids == [7, 11]


# ------------------------------------------------------------------------------ YOLO
@pytest.mark.parametrize("text", [
    "path: ../data\nnames: ['cat', \"dog\", person]  # three\nnc: 3\n",
    "names: [cat, dog, person]\n",
    "train: images/train\nnames:\n  - cat\n  - 'dog'\n\n  - person  # comment\nval: images/val\n",
    "names:\n  0: cat\n  1: dog\n  2: \"person\"\nnc: 3\n",
])
def test_yolo_names_from_data_yaml(tmp_path, text):
    path = tmp_path / "data.yaml"
    path.write_text(text)
    assert read_class_names(path) == CLASSES


@pytest.mark.parametrize("text, fragment", [
    ("nc: 2\n", "cannot read a 'names:' list"),
    ("names:\n  1: cat\n  2: dog\n", "cannot read a 'names:' list"),
    ("names: [cat, cat]\n", "class names repeated: ['cat']"),
])
def test_yolo_unreadable_names_are_clear(tmp_path, text, fragment):
    path = tmp_path / "data.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        read_class_names(path)
    assert str(path) in str(error.value) and fragment in str(error.value)


def test_yolo_layout_data_yaml_and_missing_labels(tmp_path):
    paths = write_all_formats(tmp_path, scene())
    (paths["yolo"] / "classes.txt").rename(paths["yolo"] / "data.yaml")
    (paths["yolo"] / "data.yaml").write_text("names:\n- cat\n- dog\n- person\n")
    dataset = YoloDataSet(paths["yolo"], "train")
    assert dataset.class_names == CLASSES and dataset.classes_json == paths["yolo"] / "data.yaml"
    assert dataset.ids == ["a", "b", "c", "d"] and dataset.coco_index(2)[2]["boxes"].shape == (0, 4)  # no label file
    with pytest.raises(FileNotFoundError, match=r"images/val does not exist; splits in .*images: \['train'\]"):
        YoloDataSet(paths["yolo"], "val")
    (paths["yolo"] / "data.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="no classes.txt or data.yaml"):
        YoloDataSet(paths["yolo"], "train")


def test_yolo_malformed_lines_are_one_error_naming_file_and_line(tmp_path):
    paths = write_all_formats(tmp_path, scene())
    labels = paths["yolo"] / "labels" / "train"
    (labels / "a.txt").write_text("1 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n")
    (labels / "d.txt").write_text("5 0.5 0.5 0.2 0.2\n\n0 x 0.5 0.2 0.2\n1.5 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError) as error:
        YoloDataSet(paths["yolo"], "train")
    message = str(error.value)
    assert message.startswith("YoloDataSet: 4 malformed label lines: ")
    assert f"{labels / 'a.txt'}: line 2: expected 5 values 'class cx cy w h', got 4" in message
    assert f"{labels / 'd.txt'}: line 1: class id 5 is not one of 0..2 (classes.txt)" in message
    assert f"{labels / 'd.txt'}: line 3: not numbers" in message
    assert f"{labels / 'd.txt'}: line 4: class id 1.5" in message


def test_yolo_boxes_refer_to_the_exif_upright_image(tmp_path):
    root = tmp_path / "yolo"
    save_image(root / "images" / "train" / "r.jpg", 40, 60, exif_orientation=6)  # shown as 60 wide, 40 high
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "r.txt").write_text("0 0.5 0.25 0.5 0.5\n")
    (root / "classes.txt").write_text("thing\n")
    dataset = YoloDataSet(root, "train")
    image, target = dataset[0]
    assert image.size == (60, 40) and dataset.get_height_and_width(0) == (40, 60)
    assert target["boxes"].tolist() == [[15, 0, 45, 20]]


def test_yolo_classes_json_maps_names(tmp_path):
    paths = write_all_formats(tmp_path, scene())
    names = write_classes_json(tmp_path / "names.json", ["person", "dog", "cat"])
    dataset = build_dataset("yolo", paths["yolo"], "train.txt", None, names)
    assert dataset.class_names == ["person", "dog", "cat"]
    assert dataset.coco_index(0)[2]["labels"].tolist() == [2, 3]
    assert dataset.coco_index(3)[2]["labels"].tolist() == [1, 2]


# ------------------------------------------------------------------------------ labelme
def test_labelme_shapes_split_and_classes_from_the_whole_folder(tmp_path):
    root = tmp_path / "lm"
    save_image(root / "imgs" / "one.jpg", 64, 48)
    save_image(root / "two.png", 50, 40)
    save_image(root / "three.jpg", 30, 30)
    write_labelme_json(root / "one.json", "imgs\\one.jpg", 64, 48, [  # Windows separator, subfolder
        labelme_shape("horse", (60, 40, 70, 50), "rectangle"),  # clipped to (60, 40, 64, 48)
        {"label": "horse", "points": [[1, 2], [9, 3], [5, 12]], "shape_type": None},  # labelme default: polygon
        {"label": "horse", "points": [[3, 3]], "shape_type": "point"},
        {"label": "zebra", "points": [[3, 3], [9, 9]], "shape_type": "circle"},
    ])
    write_labelme_json(root / "two.json", "renamed.png", 50, 40, [labelme_shape("bird", (2, 3, 20, 30), "polygon")])
    write_labelme_json(root / "three.json", "three.jpg", 30, 30, [labelme_shape("ant", (1, 1, 5, 5), "rectangle")])
    write_classes_json(root / "classes.json", ["x"])  # not a labelme file: ignored
    (root / "train.txt").write_text("one\ntwo\n")
    (root / "val.txt").write_text("three\n")

    with pytest.warns(UserWarning, match="skipped 2 unsupported shapes"):
        train = build_dataset("labelme", root, "train.txt", None)
    val = build_dataset("labelme", root, "val.txt", None, expected_class_names=train.class_names)
    assert train.class_names == val.class_names == ["ant", "bird", "horse"]  # every json in the folder
    assert train.ids == ["one", "two"] and val.ids == ["three"] and train.split_file == root / "train.txt"
    assert train.skipped["unsupported_shapes"] == 2
    one, two = train.coco_index(0)[2], train.coco_index(1)[2]
    assert one["boxes"].tolist() == [[60, 40, 64, 48], [1, 2, 9, 12]] and one["labels"].tolist() == [3, 3]
    assert two["boxes"].tolist() == [[2, 3, 20, 30]] and two["labels"].tolist() == [2]
    assert train[1][0].size == (50, 40)  # two.png found by stem since imagePath is gone
    assert val.coco_index(0)[2]["labels"].tolist() == [1]

    names = write_classes_json(tmp_path / "names.json", ["horse", "bird"])
    with pytest.raises(ValueError, match=r"classes not in .*names\.json: 'ant' \(e\.g\. .*three\.json\)"):
        LabelmeDataSet(root, classes_json=names)
    with pytest.warns(UserWarning):
        everything = LabelmeDataSet(root, classes_json=names, skip_unknown_classes=True)
    assert everything.class_names == ["horse", "bird"] and everything.ids == ["one", "three", "two"]
    assert everything.coco_index(0)[2]["labels"].tolist() == [1, 1]


def test_labelme_errors_name_the_file(tmp_path):
    root = tmp_path / "lm"
    save_image(root / "a.jpg", 32, 32)
    save_image(root / "b.jpg", 32, 32)
    write_labelme_json(root / "a.json", "a.jpg", 32, 32, [
        labelme_shape("cat", (1, 1, 9, 9), "rectangle"),
        {"label": "cat", "points": [[1, 1], [2, 2], [3, 3]], "shape_type": "rectangle"},
    ])
    write_labelme_json(root / "b.json", "b.jpg", 32, 32, [{"label": "", "points": [[1, 1], [5, 5]],
                                                          "shape_type": "rectangle"}])
    with pytest.raises(ValueError) as error:
        LabelmeDataSet(root)
    message = str(error.value)
    assert message.startswith("LabelmeDataSet: 2 invalid labelme entries: ")
    assert f"{root / 'a.json'}: shape 2 (cat): a rectangle needs exactly 2 finite [x, y] points" in message
    assert f"{root / 'b.json'}: shape 1: needs a non-empty 'label'" in message

    write_labelme_json(root / "b.json", "elsewhere/b_old.jpg", 32, 32, [])
    (root / "b.jpg").unlink()
    write_labelme_json(root / "a.json", "a.jpg", 32, 40, [labelme_shape("cat", (1, 1, 9, 9), "rectangle")])
    with pytest.raises(FileNotFoundError, match=r"1 files listed in .* are missing: .*b_old\.jpg \(image of b\.json\)"):
        LabelmeDataSet(root)
    (root / "b.json").unlink()
    (root / "split.txt").write_text("a\nc\n")
    with pytest.raises(FileNotFoundError, match=r"missing: .*c\.json"):
        LabelmeDataSet(root, root / "split.txt")
    save_image(root / "z.jpg", 32, 32)
    write_labelme_json(root / "z.json", "z.jpg", 32, 32, [labelme_shape("cat", (1, 1, 9, 9), "rectangle")])
    with pytest.warns(UserWarning, match="skipped 1 images whose size differs from their imageWidth/imageHeight: "
                                         "a.json says 32x40, a.jpg is 32x32"):
        dataset = LabelmeDataSet(root)
    assert dataset.ids == ["z"]


# ------------------------------------------------------------------------------ factory
def test_factory_builds_voc_exactly_as_before(tmp_path):
    paths = write_all_formats(tmp_path, scene())
    direct = VOCDataSet(paths["voc"], None, None, "train.txt", paths["classes_json"])
    built = build_dataset("voc", paths["voc"], "train.txt", None, paths["classes_json"])
    assert type(built) is VOCDataSet and built.ids == direct.ids and built.root == direct.root
    for idx in range(len(direct)):
        assert all(torch.equal(built[idx][1][k], direct[idx][1][k]) for k in direct[idx][1])
    default = build_dataset("voc", paths["voc"], "train.txt", None)  # the repository's 20 VOC classes
    assert default.classes_json.name == "pascal_voc_classes.json" and default.num_classes == 20
    assert default.coco_index(0)[2]["labels"].tolist() == [12, 8]


def test_factory_errors(tmp_path):
    paths = write_all_formats(tmp_path, scene())
    with pytest.raises(ValueError, match="unknown dataset format 'kitti'; choose one of voc, coco, yolo, labelme"):
        build_dataset("kitti", paths["coco"], "train", None)
    with pytest.raises(ValueError, match="year .*only applies to the voc format"):
        build_dataset("coco", paths["coco"], "train", None, year="2012")
    with pytest.raises(FileNotFoundError, match=r"instances_val\.json does not exist"):
        build_dataset("coco", paths["coco"], "val.txt", None)
    with pytest.raises(ValueError, match=r"has classes \['cat', 'dog', 'person'\] but \['cat', 'dog'\] were expected"):
        build_dataset("coco", paths["coco"], "train", None, expected_class_names=["cat", "dog"])
    annotations = read_annotations("yolo", paths["yolo"], "train.txt")
    assert [raw.id for raw in annotations.images] == ["a", "b", "c", "d"] and annotations.class_names == CLASSES


# ------------------------------------------------------------------------------ end to end
def voc_to_coco(voc_root: Path, classes_json: Path, out: Path) -> None:
    """Write train and val of a VOC folder as COCO (category ids 10, 20, ...; difficult -> crowd)."""
    for split in ("train", "val"):
        voc = VOCDataSet(voc_root, txt_name=f"{split}.txt", classes_json=classes_json)
        (out / split).mkdir(parents=True)
        images, annotations = [], []
        for idx, image_id in enumerate(voc.ids):
            height, width, target = voc.coco_index(idx)
            shutil.copy(voc.img_root / f"{image_id}.jpg", out / split)
            images.append({"id": idx, "file_name": f"{image_id}.jpg", "width": width, "height": height})
            for (x1, y1, x2, y2), label, crowd in zip(target["boxes"].tolist(), target["labels"].tolist(),
                                                      target["iscrowd"].tolist()):
                annotations.append({"id": len(annotations) + 1, "image_id": idx, "category_id": 10 * label,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": crowd})
        categories = [{"id": 10 * (i + 1), "name": name} for i, name in enumerate(voc.class_names)]
        write_coco_json(out / "annotations" / f"instances_{split}.json", images, annotations, categories)


def test_training_and_validation_on_coco_match_the_voc_run(demo_voc, trained_run, tmp_path):
    import validation

    voc_to_coco(demo_voc, demo_voc / "classes.json", tmp_path / "coco")
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train_mobilenet.py"), "--dataset-format", "coco", "--data-path",
           str(tmp_path / "coco"), "--train-split", "train", "--val-split", "val", "--epochs", "1",
           "--output-dir", str(out), *TINY_TRAIN_FLAGS, *SCHEDULE]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    coco_run = torch.load(out / "model-0.pth", map_location="cpu", weights_only=True)
    voc_run = torch.load(trained_run / "model-0.pth", map_location="cpu", weights_only=True)
    assert coco_run["class_names"] == ["circle", "square", "triangle"] and coco_run["args"]["dataset_format"] == "coco"
    # Same images, targets and order in another format: the same training, weight for weight.
    for key, value in voc_run["model"].items():
        assert torch.equal(coco_run["model"][key], value), key
    assert coco_run["metrics"]["coco_stats"] == pytest.approx(voc_run["metrics"]["coco_stats"], abs=1e-12)

    record_path = tmp_path / "record_mAP.txt"
    code = validation.main(["--weights-path", str(out / "model-0.pth"), "--dataset-format", "coco",
                            "--data-path", str(tmp_path / "coco"), "--split", "val", "--workers", "0",
                            "--device", "cpu", "--output", str(record_path)])
    assert code == 0
    record = json.loads(record_path.with_suffix(".json").read_text())
    assert record["num_images"] == 5
    np.testing.assert_allclose(record["coco_stats"], coco_run["metrics"]["coco_stats"], rtol=0, atol=1e-9)
