"""tools/check_dataset.py finds every problem planted in generated messy datasets of each format,
fails only on errors and reports the class histogram."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from test_formats import (
    CLASSES,
    coco_images,
    labelme_shape,
    save_image,
    scene,
    write_all_formats,
    write_coco_json,
    write_labelme_json,
)
from tools import check_dataset
from voc_factory import VocItem, VocObject, write_classes_json, write_voc


def run(capsys, *argv: str) -> tuple[int, str]:
    code = check_dataset.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def section(report: str, title: str) -> str:
    """The lines of one problem kind ('  <title> (N):' and its entries)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {title} ("))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("    ")), len(lines))
    return "\n".join(lines[start:end])


def messy_voc(root: Path) -> Path:
    """A VOC folder with one planted problem per image (see the test for which)."""
    dog = VocObject("dog", (2, 2, 20, 20))
    items = [
        VocItem("fine", objects=[dog, VocObject("cat", (30, 10, 60, 40))]),
        VocItem("noimg", image="missing", objects=[dog]),
        VocItem("noxml", xml="missing"),
        VocItem("junk", image="corrupt", objects=[dog]),
        VocItem("half", image="truncated", objects=[dog]),
        VocItem("bad", objects=[VocObject("dog", ("abc", 1, 2, 3))]),
        VocItem("unknown", objects=[VocObject("dragon", (1, 1, 9, 9)), VocObject("dragon", (2, 2, 9, 9)), dog]),
        VocItem("resized", xml_size=(128, 96), objects=[dog]),
        VocItem("flat", objects=[VocObject("cat", (10, 10, 10, 20)), VocObject("cat", (70, 5, 90, 9))]),
        VocItem("outside", objects=[VocObject("cat", (-5, 3, 80, 47))]),
        VocItem("copy1", objects=[dog]),
        VocItem("copy2", objects=[VocObject("person", (5, 5, 15, 15))]),
        VocItem("twice", objects=[dog, dog]),
        VocItem("empty"),
    ]
    voc_dir = write_voc(root, items)
    shutil.copy(voc_dir / "JPEGImages" / "copy1.jpg", voc_dir / "JPEGImages" / "copy2.jpg")
    write_classes_json(root / "classes.json", CLASSES)
    return voc_dir


@pytest.mark.slow
def test_every_planted_voc_problem_is_reported(tmp_path):
    voc_dir = messy_voc(tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "check_dataset.py"), str(tmp_path),
                           "--classes-json", str(tmp_path / "classes.json")],
                          capture_output=True, text=True, timeout=120)
    report = done.stdout
    assert done.returncode == 1, report + done.stderr
    errors, warnings = report.split("\nERRORS\n")[1].split("\nWARNINGS\n")

    missing = section(errors, "missing files")
    assert "(2):" in missing and "noxml.xml" in missing and "noimg.(jpg|jpeg|png|bmp)" in missing
    corrupt = section(errors, "corrupt images")
    assert "(2):" in corrupt and "junk.jpg" in corrupt and "half.jpg" in corrupt  # half: only a full decode fails
    invalid = section(errors, "invalid annotations")
    assert "(1):" in invalid and "bad.xml: object 1 (dog): <xmin> is missing or not a number: 'abc'" in invalid
    assert "'dragon': 2 objects, e.g. unknown.xml object 1" in section(errors, "unknown classes")
    mismatch = section(errors, "size mismatch between annotation and image")
    assert "(1):" in mismatch and "resized.xml says 128x96, resized.jpg is 64x48" in mismatch
    degenerate = section(errors, "degenerate boxes (empty once clipped to the image)")
    assert "(2):" in degenerate
    assert "flat.xml object 1 'cat' (10, 10, 10, 20) in a 64x48 image" in degenerate
    assert "flat.xml object 2 'cat' (70, 5, 90, 9) in a 64x48 image" in degenerate  # entirely outside

    assert "outside.xml object 1 'cat' (-5, 3, 80, 47) in a 64x48 image" in section(warnings, "boxes outside the image")
    duplicates = section(warnings, "duplicate images (same bytes)")
    assert "(1):" in duplicates and "copy1.jpg = " in duplicates and "copy2.jpg" in duplicates
    assert "twice.xml object 1 and object 2: 'dog' (2, 2, 20, 20)" in section(warnings, "duplicate boxes")
    empty = section(warnings, "images without objects")
    assert "(1):" in empty and "empty (empty.jpg)" in empty

    histogram = report.split("class histogram (objects per class):\n")[1].splitlines()
    # counted: every known-class object of a readable annotation, wherever its image stands
    assert histogram[:3] == ["  cat          4", "  dog          8", "  person       1"]
    assert histogram[3] == "FAILED: 9 errors, 4 warnings"
    assert str(voc_dir / "ImageSets" / "Main" / "train.txt") in report.splitlines()[0]


def test_only_warnings_pass_and_the_listing_is_capped(tmp_path, capsys):
    write_voc(tmp_path, [VocItem(f"empty{i}") for i in range(4)] +
              [VocItem("outside", objects=[VocObject("cat", (-5, 3, 80, 47))])])
    write_classes_json(tmp_path / "classes.json", CLASSES)
    code, report = run(capsys, tmp_path, "--classes-json", tmp_path / "classes.json", "--max-listed", "2")
    assert code == 0 and "ERRORS" not in report
    assert "images without objects (4):\n    empty0 (empty0.jpg)\n    empty1 (empty1.jpg)\n    ... and 2 more" in report
    assert report.rstrip().endswith("OK: 0 errors, 5 warnings")


def test_duplicates_across_splits(tmp_path, capsys):
    voc_dir = write_voc(tmp_path, [VocItem("a", objects=[VocObject("cat", (1, 1, 9, 9))]),
                                   VocItem("b", objects=[VocObject("cat", (1, 1, 9, 9))])],
                        splits={"train": ["a"], "val": ["b"]})
    shutil.copy(voc_dir / "JPEGImages" / "a.jpg", voc_dir / "JPEGImages" / "b.jpg")
    write_classes_json(tmp_path / "classes.json", CLASSES)
    code, report = run(capsys, tmp_path, "--classes-json", tmp_path / "classes.json", "--split", "train.txt", "val.txt")
    assert code == 0
    assert f"{voc_dir / 'JPEGImages' / 'a.jpg'} = {voc_dir / 'JPEGImages' / 'b.jpg'}" in report
    assert "train.txt" in report and "val.txt" in report


def test_yolo_problems(tmp_path, capsys):
    paths = write_all_formats(tmp_path, scene())
    labels = paths["yolo"] / "labels" / "train"
    (labels / "a.txt").write_text("1 0.95 0.5 0.2 0.2\n1 0.5 0.5 0.2\n")  # outside on the right; 4 values
    (labels / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    code, report = run(capsys, paths["yolo"], "--format", "yolo")
    assert code == 1
    assert f"{labels / 'a.txt'}: line 2: expected 5 values" in section(report, "invalid annotations")
    assert f"label file without image: {labels / 'ghost.txt'}" in section(report, "reader notes")
    assert "a.txt line 1 'dog' (54.4, 19.2, 67.2, 28.8) in a 64x48 image" in section(report, "boxes outside the image")
    assert "c (c.jpg)" in section(report, "images without objects")


def test_coco_problems(tmp_path, capsys):
    root = tmp_path / "coco"
    images = coco_images(root / "train") + [{"id": 50, "file_name": "lost.jpg", "width": 8, "height": 8}]
    images[0]["height"] = 50
    write_coco_json(root / "annotations" / "instances_train.json", images, [
        {"id": 1, "image_id": 3, "category_id": 2, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 3, "category_id": 2, "bbox": [1, 1, 5]},
    ], [{"id": 2, "name": "bike"}])
    code, report = run(capsys, root, "--format", "coco")
    assert code == 1
    assert str(root / "train" / "lost.jpg") in section(report, "missing files")
    assert "annotation id 2: 'bbox' must be 4 finite numbers" in section(report, "invalid annotations")
    mismatch = section(report, "size mismatch between annotation and image")
    assert "instances_train.json says 64x50, x.jpg is 64x48" in mismatch
    assert "  bike        1" in report


def test_labelme_problems(tmp_path, capsys):
    root = tmp_path / "lm"
    save_image(root / "a.jpg", 32, 32)
    write_labelme_json(root / "a.json", "a.jpg", 32, 32, [
        labelme_shape("cat", (1, 1, 9, 9), "rectangle"), labelme_shape("owl", (2, 2, 8, 8), "polygon"),
        {"label": "cat", "points": [[3, 3]], "shape_type": "point"},
    ])
    names = write_classes_json(tmp_path / "names.json", ["cat"])
    code, report = run(capsys, root, "--format", "labelme", "--classes-json", names)
    assert code == 1
    assert "'owl': 1 objects, e.g. a.json shape 2" in section(report, "unknown classes")
    assert "a.json: shape 3: 'point' shape skipped" in section(report, "reader notes")
    code, report = run(capsys, root, "--format", "labelme")  # classes from the data: owl is known
    assert code == 0 and "  owl         1" in report


def test_unreadable_dataset_exits_2(tmp_path, capsys):
    code, report = run(capsys, tmp_path / "nowhere", "--format", "coco")
    assert code == 2 and report.startswith("error: CocoDataSet: annotation file")
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "a.json").write_text(json.dumps({"shapes": [], "imagePath": "a.jpg"}))
    code, report = run(capsys, tmp_path / "lm", "--format", "labelme", "--split", "list.txt")
    assert code == 2 and "split file" in report and "list.txt not found" in report
