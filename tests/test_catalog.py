"""The dataset catalog: a format registered from a module outside the package builds datasets and
is checked by tools/check_dataset.py with no other file edited; registration and option errors;
the catalog builds the built-in formats exactly as their classes do."""
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from my_dataset import CocoDataSet, LabelmeDataSet, VOCDataSet, YoloDataSet
from test_formats import save_image, scene, write_all_formats
from tools import check_dataset
from train_utils.data.catalog import (
    DatasetFormat,
    build_dataset,
    format_names,
    get_format,
    layout_help,
    read_annotations,
    register_format,
    unregister_format,
)
from train_utils.data.dataset import DetectionDataSet

BUILT_IN = ("voc", "coco", "yolo", "labelme")

# A whole format in one module: rows ``image,x1,y1,x2,y2,class`` (with that header line), image
# paths relative to the csv's folder, the split is the csv's file name. Class names are numbered in
# the order the data first uses them.
CSV_PLUGIN = '''
"""CSV boxes: one ``image,x1,y1,x2,y2,class`` row per object."""
import csv
from pathlib import Path

from train_utils.data.catalog import register_format
from train_utils.data.records import Annotations, RawImage, RawObject


@register_format("csv_boxes", default_splits=("train.csv", "val.csv"),
                 layout="--data-path holds the csv files and a split is one of them")
def read_csv_boxes(data_path, split):
    path = Path(data_path) / split
    if not path.is_file():
        raise FileNotFoundError(f"csv split {path} does not exist")
    found = Annotations([], [], path, path, path.parent)
    by_name = {}
    with path.open(newline="") as file:
        for number, row in enumerate(csv.DictReader(file), start=2):
            if row["image"] not in by_name:
                image_path = path.parent / row["image"]
                by_name[row["image"]] = RawImage(row["image"], image_path, path, None, [])
                found.images.append(by_name[row["image"]])
                if not image_path.is_file():
                    found.missing.append(str(image_path))
            if row["class"] not in found.class_names:
                found.class_names.append(row["class"])
            box = tuple(float(row[key]) for key in ("x1", "y1", "x2", "y2"))
            by_name[row["image"]].objects.append(RawObject(row["class"], box, 0, f"line {number}"))
    return found
'''

CSV_ROWS = [  # image, box, class
    ("imgs/a.jpg", (3, 5, 30, 40), "dog"),
    ("imgs/a.jpg", (10.5, 2, 60, 47.5), "cat"),
    ("b.png", (0, 0, 50, 30), "cat"),
    ("imgs/c.jpg", (1.25, 1, 20, 20.75), "person"),
]


@pytest.fixture
def csv_plugin(tmp_path, monkeypatch):
    """Import the CSV plugin from a folder outside the project; unregister it afterwards."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "csv_boxes_plugin.py").write_text(CSV_PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    yield importlib.import_module("csv_boxes_plugin")
    if "csv_boxes" in format_names():
        unregister_format("csv_boxes")
    sys.modules.pop("csv_boxes_plugin", None)


def write_csv_dataset(root: Path) -> Path:
    """Images a (64x48), b (50x30 png), c (64x48) and ``root/train.csv`` listing CSV_ROWS."""
    save_image(root / "imgs" / "a.jpg", 64, 48)
    save_image(root / "b.png", 50, 30)
    save_image(root / "imgs" / "c.jpg", 64, 48)
    lines = ["image,x1,y1,x2,y2,class"] + [f"{image},{','.join(map(str, box))},{name}" for image, box, name in CSV_ROWS]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


# ------------------------------------------------------------------------------ a plugin format
def test_plugin_format_builds_a_dataset_through_the_catalog(csv_plugin, tmp_path):
    root = write_csv_dataset(tmp_path / "data")
    assert format_names() == (*BUILT_IN, "csv_boxes")
    entry = get_format("csv_boxes")
    assert entry.read is csv_plugin.read_csv_boxes and entry.default_splits == ("train.csv", "val.csv")
    assert entry.options == () and entry.default_classes_json is None and entry.dataset_type is DetectionDataSet
    assert "csv_boxes: --data-path holds the csv files and a split is one of them" in layout_help()

    dataset = build_dataset("csv_boxes", root, "train.csv", None)
    assert type(dataset) is DetectionDataSet and len(dataset) == 3
    assert dataset.ids == ["imgs/a.jpg", "b.png", "imgs/c.jpg"]
    assert dataset.class_names == ["dog", "cat", "person"]  # first-seen order, labels 1..3
    assert dataset.split_file == root / "train.csv" and dataset.classes_json == root / "train.csv"
    label = {name: i for i, name in enumerate(dataset.class_names, start=1)}
    for idx, image_name in enumerate(dataset.ids):
        rows = [(box, name) for image, box, name in CSV_ROWS if image == image_name]
        image, target = dataset[idx]
        assert torch.equal(target["boxes"], torch.tensor([box for box, _ in rows], dtype=torch.float32))
        assert torch.equal(target["labels"], torch.tensor([label[name] for _, name in rows]))
        assert target["iscrowd"].tolist() == [0] * len(rows) and int(target["image_id"]) == idx
        assert image.size == (50, 30) if image_name == "b.png" else image.size == (64, 48)
    assert dataset.summary() == "nothing skipped"
    assert [raw.id for raw in read_annotations("csv_boxes", root, "train.csv").images] == dataset.ids


def test_plugin_format_takes_a_classes_json_and_the_usual_checks(csv_plugin, tmp_path):
    root = write_csv_dataset(tmp_path / "data")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"cat": 1, "dog": 2}))
    with pytest.raises(ValueError, match=r"DetectionDataSet: classes not in .*names\.json: 'person'"):
        build_dataset("csv_boxes", root, "train.csv", None, names)
    with pytest.warns(UserWarning, match="skipped 1 objects of unknown classes"):
        dataset = build_dataset("csv_boxes", root, "train.csv", None, names, skip_unknown_classes=True)
    assert dataset.class_names == ["cat", "dog"] and dataset[0][1]["labels"].tolist() == [2, 1]
    with pytest.raises(ValueError, match=r"a year \(2012\) only applies to the voc format, not csv_boxes"):
        build_dataset("csv_boxes", root, "train.csv", None, year="2012")
    (root / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"DetectionDataSet: 1 files listed in .*train\.csv are missing: .*b\.png"):
        build_dataset("csv_boxes", root, "train.csv", None)


def test_check_dataset_reads_a_plugin_format(csv_plugin, tmp_path, capsys):
    root = write_csv_dataset(tmp_path / "data")
    assert check_dataset.main([str(root), "--format", "csv_boxes"]) == 0  # default split: train.csv
    report = capsys.readouterr().out
    assert "train.csv" in report and "3 images, 4 objects, 3 classes" in report


# ------------------------------------------------------------------------------ registration
def test_registration_errors_and_replacement(csv_plugin):
    with pytest.raises(ValueError, match=r"dataset format 'voc' is already registered \(reader "
                                         r"train_utils\.data\.voc\.read_voc_split\); register_format\(\.\.\., replace\) replaces it"):
        register_format("voc", csv_plugin.read_csv_boxes, default_splits=("a", "b"), layout="x")
    with pytest.raises(ValueError, match="dataset format 'csv_boxes' is already registered"):
        register_format("csv_boxes", default_splits=("a", "b"), layout="x")(csv_plugin.read_csv_boxes)

    def read_other(data_path, split):
        raise NotImplementedError

    assert register_format("csv_boxes", read_other, default_splits=("a", "b"), layout="x", replace=True) is read_other
    assert get_format("csv_boxes") == DatasetFormat("csv_boxes", read_other, ("a", "b"), "x")
    assert format_names() == (*BUILT_IN, "csv_boxes")
    with pytest.raises(ValueError, match="dataset format 'bad': the reader 'nothing' is not callable"):
        register_format("bad", "nothing", default_splits=("a", "b"), layout="x")
    with pytest.raises(ValueError, match=r"dataset format 'bad': default_splits must be \(train, val\) strings"):
        register_format("bad", read_other, default_splits=("a",), layout="x")
    with pytest.raises(ValueError, match="dataset format 'bad': dataset_type must be a DetectionDataSet subclass"):
        register_format("bad", read_other, default_splits=("a", "b"), layout="x", dataset_type=dict)
    assert "bad" not in format_names()


def test_unknown_format_and_misplaced_options(tmp_path):
    assert format_names() == BUILT_IN
    message = "unknown dataset format 'kitti'; choose one of voc, coco, yolo, labelme"
    for call in (lambda: get_format("kitti"), lambda: build_dataset("kitti", tmp_path, "train", None),
                 lambda: read_annotations("kitti", tmp_path, "train"), lambda: unregister_format("kitti")):
        with pytest.raises(ValueError, match=message):
            call()
    for fmt in BUILT_IN[1:]:
        with pytest.raises(ValueError, match=rf"^a year \(2007\) only applies to the voc format, not {fmt}$"):
            read_annotations(fmt, tmp_path, "train", year="2007")


def test_a_reader_must_return_annotations(tmp_path):
    register_format("not_annotations", lambda data_path, split: [], default_splits=("a", "b"), layout="x")
    try:
        with pytest.raises(TypeError, match=r"the not_annotations reader test_catalog\..*<lambda> returned list, not Annotations"):
            build_dataset("not_annotations", tmp_path, "a", None)
    finally:
        unregister_format("not_annotations")


# ------------------------------------------------------------------------------ built-in formats
def direct_construction(fmt: str, paths: dict) -> DetectionDataSet:
    """The dataset of the training split built by the format's own class."""
    if fmt == "voc":
        return VOCDataSet(paths["voc"], None, None, "train.txt", paths["classes_json"])
    if fmt == "coco":
        return CocoDataSet(paths["coco"] / "train", paths["coco"] / "annotations" / "instances_train.json")
    if fmt == "yolo":
        return YoloDataSet(paths["yolo"], "train")
    return LabelmeDataSet(paths["labelme"])


def catalog_construction(fmt: str, paths: dict) -> DetectionDataSet:
    classes_json = paths["classes_json"] if fmt == "voc" else None
    return build_dataset(fmt, paths[fmt], get_format(fmt).default_splits[0], None, classes_json)


def assert_same_dataset(built: DetectionDataSet, direct: DetectionDataSet) -> None:
    """Same class, same attributes and values, same records, items and pixels."""
    assert type(built) is type(direct) and vars(built).keys() == vars(direct).keys()
    for key, value in vars(direct).items():
        if key != "_records":
            assert vars(built)[key] == value, key
    assert len(built._records) == len(direct._records)
    for ours, theirs in zip(built._records, direct._records):
        for name, value in vars(theirs).items():
            assert np.array_equal(getattr(ours, name), value), name
    for idx in range(len(direct)):
        (built_image, built_target), (image, target) = built[idx], direct[idx]
        assert np.array_equal(np.asarray(built_image), np.asarray(image))
        assert built_target.keys() == target.keys() and all(torch.equal(built_target[k], target[k]) for k in target)


@pytest.mark.parametrize("fmt", BUILT_IN)
def test_catalog_builds_what_the_format_class_builds(tmp_path, fmt):
    paths = write_all_formats(tmp_path, scene())
    assert_same_dataset(catalog_construction(fmt, paths), direct_construction(fmt, paths))


@pytest.mark.parametrize("fmt", BUILT_IN)
def test_catalog_errors_are_the_format_class_errors(tmp_path, fmt):
    paths = write_all_formats(tmp_path, scene())
    image = {"voc": paths["voc"] / "VOCdevkit" / "VOC2012" / "JPEGImages", "coco": paths["coco"] / "train",
             "yolo": paths["yolo"] / "images" / "train", "labelme": paths["labelme"]}[fmt] / "d.jpg"
    image.write_bytes(b"not an image")
    with pytest.warns(UserWarning) as built_warnings:
        built = catalog_construction(fmt, paths)
    with pytest.warns(UserWarning) as direct_warnings:
        direct = direct_construction(fmt, paths)
    assert [str(w.message) for w in built_warnings] == [str(w.message) for w in direct_warnings]
    assert_same_dataset(built, direct)
    image.unlink()  # yolo lists its images, so it has one fewer; the others name it as missing
    outcomes = []
    for construct in (catalog_construction, direct_construction):
        try:
            outcomes.append(construct(fmt, paths).ids)
        except FileNotFoundError as error:
            outcomes.append(str(error))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == ["a", "b", "c"] if fmt == "yolo" else "d." in outcomes[0]
