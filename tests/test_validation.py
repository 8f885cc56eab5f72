"""validation.py and train_utils/evaluation/voc_eval.py: COCO parity with pycocotools, hand-computed VOC AP,
per-class rows keyed by category id, checkpoint and bare-state-dict loading, clear errors."""
import contextlib
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import validation
from train_utils.evaluation.per_class import format_table, per_class_results
from backbone import read_weight_file
from train_utils.loading import load_model
from train_utils.model.config import ModelConfig
from train_utils.evaluation.voc_eval import average_precision, class_average_precision, voc_ap_per_class

TINY_ARCH = ["--backbone", "mobilenet_v2", "--width-mult", "0.5", "--feature-stride", "16",
             "--representation-size", "64", "--anchor-sizes", "32,64,128", "--min-size", "128", "--max-size", "128"]


def make_coco(images, annotations, categories):
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def run_cocoeval(coco_gt, results):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


# ------------------------------------------------------------------------------ VOC AP by hand
# One class, three images. Ground truth: A (image 1), B (image 2), C (image 3, difficult), D (image 3).
# Detections, best first:
#   0.9 on A (IoU 1)              -> TP
#   0.8 on C (difficult)          -> ignored
#   0.7 on nothing                -> FP
#   0.6 on D (IoU 0.64 >= 0.5)    -> TP
#   0.5 on A again                -> FP (duplicate)
#   0.4 on B with IoU 0.25        -> FP (below 0.5)
# Non-difficult objects: 3. Ranked outcomes TP FP TP FP FP ->
#   recall    1/3 1/3 2/3 2/3 2/3
#   precision 1   1/2 2/3 1/2 2/5
# VOC07: thresholds 0, .1, .2, .3 reach precision 1; .4, .5, .6 reach 2/3; .7 .. 1 nothing -> (4 + 3 * 2/3) / 11
# VOC12: envelope 1 on (0, 1/3], 2/3 on (1/3, 2/3], 0 above -> 1/3 + 2/9
GROUND_TRUTH = {
    1: (np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([False])),
    2: (np.array([[20.0, 20.0, 40.0, 40.0]]), np.array([False])),
    3: (np.array([[50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]]), np.array([True, False])),
}
DETECTIONS = [
    (2, 0.4, (20.0, 20.0, 30.0, 30.0)),  # input order differs from score order on purpose
    (1, 0.9, (0.0, 0.0, 10.0, 10.0)),
    (3, 0.8, (50.0, 50.0, 60.0, 60.0)),
    (2, 0.7, (100.0, 100.0, 110.0, 110.0)),
    (3, 0.6, (1.0, 1.0, 9.0, 9.0)),
    (1, 0.5, (0.0, 0.0, 10.0, 9.0)),
]
VOC07 = (4 + 3 * 2 / 3) / 11
VOC12 = 1 / 3 + 2 / 9


def test_voc_ap_hand_computed_both_rules():
    assert class_average_precision(DETECTIONS, GROUND_TRUTH, "07") == pytest.approx(VOC07, abs=1e-12)
    assert class_average_precision(DETECTIONS, GROUND_TRUTH, "12") == pytest.approx(VOC12, abs=1e-12)


def test_voc_iou_threshold_is_inclusive_and_plain():
    # Box [0, 0, 10, 5] against [0, 0, 10, 10]: plain IoU exactly 0.5 -> a hit (the devkit's >=);
    # with the devkit's +1 pixel sizes it would be 66/121 instead.
    truth = {0: (np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([False]))}
    assert class_average_precision([(0, 1.0, (0.0, 0.0, 10.0, 5.0))], truth, "12") == 1.0
    assert class_average_precision([(0, 1.0, (0.0, 0.0, 10.0, 4.9))], truth, "12") == 0.0


def test_voc_ap_without_positives_is_undefined():
    only_difficult = {0: (np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([True]))}
    assert class_average_precision([(0, 0.9, (0.0, 0.0, 10.0, 10.0))], only_difficult, "07") is None
    assert class_average_precision([], {}, "12") is None
    with pytest.raises(ValueError, match="unknown VOC AP rule '10'"):
        average_precision(np.array([1.0]), np.array([1.0]), "10")


def test_voc_ap_per_class_from_coco_structures():
    # The crafted case as COCO ground truth (class 1) and COCO-format detections, plus class 2
    # whose only object is difficult and class 3 with nothing at all.
    images = [{"id": i, "height": 200, "width": 200} for i in (1, 2, 3)]
    annotations = []
    for image_id, (boxes, difficult) in GROUND_TRUTH.items():
        for (x1, y1, x2, y2), hard in zip(boxes.tolist(), difficult.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(hard)})
    annotations.append({"id": 99, "image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1})
    categories = [{"id": c, "name": n} for c, n in ((1, "a"), (2, "b"), (3, "c"))]
    coco_gt = make_coco(images, annotations, categories)
    detections = {i: [] for i in (1, 2, 3)}
    for image_id, score, (x1, y1, x2, y2) in DETECTIONS:
        detections[image_id].append({"image_id": image_id, "category_id": 1, "score": score,
                                     "bbox": [x1, y1, x2 - x1, y2 - y1]})
    detections[2].append({"image_id": 2, "category_id": 2, "score": 0.9, "bbox": [0, 0, 5, 5]})
    for rule, expected in (("07", VOC07), ("12", VOC12)):
        result = voc_ap_per_class(coco_gt, detections, rule)
        assert list(result) == [1, 2, 3]
        assert result[1] == pytest.approx(expected, abs=1e-12)
        assert result[2] is None and result[3] is None


# ------------------------------------------------------------------------------ per-class table
@pytest.mark.parametrize("list_absent_category", [True, False], ids=["listed_without_objects", "not_listed"])
def test_class_absent_from_split_does_not_shift_rows(list_absent_category):
    # Class "b" (id 2) has no object. Class "a" is found perfectly; class "c" has two objects of
    # which only one is found: precision 1 up to recall 0.5, so 51 of the 101 recall points -> 51/101.
    images = [{"id": 0, "height": 100, "width": 100}, {"id": 1, "height": 100, "width": 100}]
    annotations = [
        {"id": 1, "image_id": 0, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 2, "image_id": 0, "category_id": 3, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [60, 60, 20, 20], "area": 400, "iscrowd": 1},
    ]
    categories = [{"id": 1, "name": "a"}, {"id": 3, "name": "c"}]
    if list_absent_category:
        categories.insert(1, {"id": 2, "name": "b"})
    coco_gt = make_coco(images, annotations, categories)
    results = [
        {"image_id": 0, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},
        {"image_id": 0, "category_id": 3, "bbox": [50, 50, 40, 40], "score": 0.8},
    ]
    coco_eval = run_cocoeval(coco_gt, results)
    voc = voc_ap_per_class(coco_gt, {0: results, 1: []}, "12")
    rows = per_class_results(coco_eval, coco_gt, ["a", "b", "c"], voc)

    assert [(r.category_id, r.name) for r in rows] == [(1, "a"), (2, "b"), (3, "c")]
    assert (rows[0].coco_ap50, rows[0].coco_ap, rows[0].voc_ap) == pytest.approx((1.0, 1.0, 1.0), abs=1e-12)
    assert rows[0].num_objects == 1
    assert (rows[1].coco_ap50, rows[1].coco_ap, rows[1].voc_ap, rows[1].num_objects) == (None, None, None, 0)
    assert rows[2].coco_ap50 == pytest.approx(51 / 101, abs=1e-12)
    assert rows[2].coco_ap == pytest.approx(51 / 101, abs=1e-12)
    assert rows[2].voc_ap == pytest.approx(0.5, abs=1e-12)
    assert (rows[2].num_objects, rows[2].num_difficult) == (2, 1)

    table = format_table(rows, "12").splitlines()
    assert table[2].split()[:4] == ["b", "no", "ground", "truth"]
    assert table[3].split() == ["c", "0.5050", "0.5050", "0.5000", "2", "1"]


# ------------------------------------------------------------------------------ the script
def read_split(demo_voc: Path):
    voc = demo_voc / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets" / "Main" / "val.txt").read_text().split()
    return voc, ids


def independent_ground_truth(demo_voc: Path) -> COCO:
    """COCO ground truth straight from the XML files (difficult -> iscrowd), image id = split position."""
    voc, ids = read_split(demo_voc)
    classes = json.loads((demo_voc / "classes.json").read_text())
    images, annotations = [], []
    for image_id, name in enumerate(ids):
        root = ET.parse(voc / "Annotations" / f"{name}.xml").getroot()
        images.append({"id": image_id, "width": int(root.find("size/width").text),
                       "height": int(root.find("size/height").text)})
        for obj in root.findall("object"):
            x1, y1, x2, y2 = (float(obj.find(f"bndbox/{t}").text) for t in ("xmin", "ymin", "xmax", "ymax"))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": classes[obj.find("name").text], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": int(obj.find("difficult").text)})
    categories = [{"id": i, "name": n} for n, i in classes.items()]
    return make_coco(images, annotations, categories)


def independent_detections(checkpoint_path: Path, demo_voc: Path) -> list[dict]:
    """Run the checkpoint's model on every val image, one at a time, in COCO results format."""
    model = load_model(str(checkpoint_path))
    voc, ids = read_split(demo_voc)
    results = []
    with torch.inference_mode():
        for image_id, name in enumerate(ids):
            pixels = np.asarray(Image.open(voc / "JPEGImages" / f"{name}.jpg").convert("RGB"))
            image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous().float().div(255)
            output = model([image])[0]
            for (x1, y1, x2, y2), score, label in zip(output["boxes"].tolist(), output["scores"].tolist(),
                                                      output["labels"].tolist()):
                results.append({"image_id": image_id, "category_id": label, "score": score,
                                "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return results


def test_validation_matches_pycocotools_directly(trained_run, demo_voc, tmp_path, capsys):
    output = tmp_path / "record_mAP.txt"
    # Everything else (data folder, classes, sizes) comes from the checkpoint.
    code = validation.main(["--weights-path", str(trained_run / "best.pth"), "--output", str(output),
                            "--workers", "0", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    record = json.loads(output.with_suffix(".json").read_text())

    coco_gt = independent_ground_truth(demo_voc)
    results = independent_detections(trained_run / "best.pth", demo_voc)
    assert results, "the trained model should detect something at score > 0.05"
    expected = run_cocoeval(coco_gt, results)
    assert record["num_images"] == len(coco_gt.imgs) == 5
    np.testing.assert_allclose(record["coco_stats"], expected.stats, rtol=0, atol=1e-9)

    names = ["circle", "square", "triangle"]
    precision = expected.eval["precision"]
    for row in record["per_class"]:
        k = list(expected.params.catIds).index(row["category_id"])
        assert row["name"] == names[row["category_id"] - 1]
        ap50 = precision[0, :, k, 0, -1]
        if (ap50 > -1).any():
            assert row["coco_ap50"] == pytest.approx(ap50[ap50 > -1].mean(), abs=1e-9)
            everything = precision[:, :, k, 0, -1]
            assert row["coco_ap"] == pytest.approx(everything[everything > -1].mean(), abs=1e-9)
        else:
            assert row["coco_ap50"] is None and row["num_objects"] == 0
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(catIds=[row["category_id"]]))
        assert row["num_objects"] == sum(a["iscrowd"] == 0 for a in anns)
        assert row["num_difficult"] == sum(a["iscrowd"] == 1 for a in anns)

    # VOC2012 AP per class from the same detections, grouped by hand.
    for row in record["per_class"]:
        category = row["category_id"]
        truth = {}
        for image_id in coco_gt.imgs:
            anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id], catIds=[category]))
            truth[image_id] = (np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                          a["bbox"][1] + a["bbox"][3]] for a in anns]).reshape(-1, 4),
                               np.array([a["iscrowd"] == 1 for a in anns]))
        dets = [(r["image_id"], r["score"], (r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2],
                                             r["bbox"][1] + r["bbox"][3])) for r in results if r["category_id"] == category]
        voc = class_average_precision(dets, truth, "12")
        assert row["voc_ap"] == (None if voc is None else pytest.approx(voc, abs=1e-9))
    valid = [r["voc_ap"] for r in record["per_class"] if r["voc_ap"] is not None]
    assert record["voc_map"] == pytest.approx(np.mean(valid), abs=1e-12)
    assert record["images_per_second"] > 0

    # record_mAP.txt: pycocotools' 12 lines, a blank line, then AP50 per category.
    with contextlib.redirect_stdout(io.StringIO()) as summary:
        expected.summarize()
    lines = output.read_text().splitlines()
    assert lines[:12] == [line for line in summary.getvalue().splitlines() if line.strip()]
    assert lines[12:14] == ["", "mAP(IoU=0.5) for each category:"]
    assert [line.split(":")[0] for line in lines[14:]] == [f" {n}" for n in names]
    for line, row in zip(lines[14:], record["per_class"]):
        if row["coco_ap50"] is not None:
            assert float(line.split(":")[1]) == pytest.approx(row["coco_ap50"], abs=1e-6)
    assert lines[0] in printed and "images/s" in printed and "triangle" in printed


def test_bare_state_dict_gives_the_checkpoint_results(trained_run, tmp_path):
    checkpoint = read_weight_file(str(trained_run / "best.pth"))
    # The same weights twice: a training checkpoint with default detector settings, and bare.
    checkpoint["model_config"].update({key: None for key in ModelConfig(num_classes=2).detector_kwargs()})
    torch.save(checkpoint, tmp_path / "full.pth")
    torch.save(checkpoint["model"], tmp_path / "bare.pth")
    data = ["--data-path", checkpoint["args"]["data_path"], "--workers", "0", "--voc-metric", "07"]
    classes = checkpoint["args"]["classes_json"]

    assert validation.main(["--weights-path", str(tmp_path / "full.pth"), "--output", str(tmp_path / "a.txt"),
                            *data]) == 0
    assert validation.main(["--weights-path", str(tmp_path / "bare.pth"), "--output", str(tmp_path / "b.txt"),
                            "--classes-json", classes, *TINY_ARCH, *data]) == 0
    full = json.loads((tmp_path / "a.json").read_text())
    bare = json.loads((tmp_path / "b.json").read_text())
    assert bare["coco_stats"] == full["coco_stats"]
    assert bare["per_class"] == full["per_class"]
    assert bare["voc_metric"] == "07" and bare["voc_map"] == full["voc_map"]


def test_validation_errors_are_one_line(trained_run, tmp_path, capsys):
    bare = tmp_path / "bare.pth"
    torch.save(read_weight_file(str(trained_run / "best.pth"))["model"], bare)
    classes = read_weight_file(str(trained_run / "best.pth"))["args"]["classes_json"]
    cases = [
        (["--weights-path", str(tmp_path / "nope.pth")], f"error: weight file '{tmp_path / 'nope.pth'}' not found"),
        (["--weights-path", str(bare), "--classes-json", classes], "pass --backbone and --classes-json"),
        (["--weights-path", str(bare), "--classes-json", classes, "--backbone", "mobilenet_v2"],
         "does not fit a 'mobilenet_v2' detector built with default settings"),
        (["--weights-path", str(trained_run / "best.pth"), "--data-path", str(tmp_path)],
         "error: VOCDataSet: no VOC20xx folder found"),
        (["--weights-path", str(trained_run / "best.pth"), "--split", "missing.txt"],
         "error: VOCDataSet: split file "),
    ]
    for argv, message in cases:
        assert validation.main([*argv, "--workers", "0", "--output", str(tmp_path / "r.txt")]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "r.txt").exists()
