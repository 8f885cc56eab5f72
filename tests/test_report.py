"""validation.py --report and train_utils/evaluation/analysis.py: precision against pycocotools' own
arrays, TIDE dAP per error type worked out by hand, the confusion matrix and best-F1 thresholds on
hand cases, and the written report (every link exists, the HTML parses) on the demo data."""
import contextlib
import io
import itertools
import json
import math
import random
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import lxml.html
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import validation
from train_utils.evaluation import analysis as an
from train_utils.vis.draw import GT_DARK, GT_IGNORED, GT_LIGHT, class_colour, default_line_thickness, draw_evaluation

R = 101  # recall thresholds of COCO's interpolation


def image(image_id, gts=(), dets=()):
    """An ImageData from gts [(xywh, label) or (xywh, label, ignored)] and dets [(xywh, label, score)]."""
    gts = [g if len(g) == 3 else (*g, False) for g in gts]
    return an.ImageData(image_id,
                        np.array([g[0] for g in gts], dtype=float).reshape(-1, 4),
                        np.array([g[1] for g in gts], dtype=np.int64),
                        np.array([g[2] for g in gts], dtype=bool),
                        np.array([d[0] for d in dets], dtype=float).reshape(-1, 4),
                        np.array([d[2] for d in dets], dtype=float),
                        np.array([d[1] for d in dets], dtype=np.int64))


def run_tide(images, classes=(1,)):
    return an.tide(an.match_detections(images, list(classes)))


def assert_only(result, expected: dict):
    """TIDE deltas: the ones in ``expected`` exactly (1e-12), every other one 0."""
    for name in an.TIDE_TYPES:
        assert result.delta[name] == pytest.approx(expected.get(name, 0.0), abs=1e-12), name


# Boxes (xywh). A = [0, 0, 10, 10]. IoU(A, LOW) = 40 / 100 = 0.4; IoU(A, NEAR) = 90 / 100 = 0.9.
A, LOW, NEAR, FAR = [0, 0, 10, 10], [0, 0, 10, 4], [0, 0, 10, 9], [50, 50, 10, 10]


# ------------------------------------------------------------------------------ pycocotools parity
def random_coco(seed: int):
    """30 images of 3 classes (some crowd objects, some images without objects), detections near
    the objects with wrong classes, jitter and background boxes, scores rounded to 2 decimals (ties
    across and within images), one image with 130 detections of one class (over the 100 cap) and
    a few boxes of negative width."""
    rng = random.Random(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, 31):
        images.append({"id": image_id, "width": 200, "height": 200})
        objects = [] if image_id % 7 == 0 else [
            (rng.uniform(0, 150), rng.uniform(0, 150), rng.uniform(10, 50), rng.uniform(10, 50), rng.randint(1, 3))
            for _ in range(rng.randint(1, 5))]
        for x, y, w, h, label in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.1)})
            for _ in range(rng.randint(0, 4)):
                jitter = [v + rng.gauss(0, 4) for v in (x, y)] + [max(1.0, v + rng.gauss(0, 4)) for v in (w, h)]
                results.append({"image_id": image_id, "bbox": jitter, "score": round(rng.random(), 2),
                                "category_id": label if rng.random() < 0.7 else rng.randint(1, 3)})
        if image_id % 5 == 0:  # a box of negative width: COCOeval leaves it out
            results.append({"image_id": image_id, "category_id": 2, "bbox": [50, 50, -5, 20], "score": 0.99})
        for _ in range(130 if image_id == 3 else rng.randint(0, 3)):
            results.append({"image_id": image_id, "category_id": 1 if image_id == 3 else rng.randint(1, 3),
                            "bbox": [rng.uniform(0, 180), rng.uniform(0, 180), rng.uniform(5, 40), rng.uniform(5, 40)],
                            "score": round(rng.random(), 2)})
    rng.shuffle(results)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        coco_eval = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return coco, coco_eval, by_image


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_equals_pycocotools_arrays(seed):
    coco, coco_eval, detections = random_coco(seed)
    images = an.images_from_coco(coco, detections)
    precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
    for t, threshold in ((0, 0.5), (5, 0.75)):
        assert coco_eval.params.iouThrs[t] == pytest.approx(threshold)
        matching = an.match_detections(images, [1, 2, 3], iou_threshold=threshold)
        ranked = an.ranked_by_class(matching, *an.base_scenario(matching))
        num_gt = matching.num_gt()
        for k, class_id in enumerate([1, 2, 3]):
            ours = an.interpolated_precision(ranked[class_id][0], num_gt[class_id])
            np.testing.assert_array_equal(ours, precision[t, :, k, 0, 2])
    matching = an.match_detections(images, [1, 2, 3])
    per_image_class = {}
    for dets in detections.values():
        for d in dets:
            key = (d["image_id"], d["category_id"])
            per_image_class[key] = per_image_class.get(key, 0) + 1
    over_cap = sum(max(n - 100, 0) for n in per_image_class.values())
    assert over_cap >= 30 and (matching.det_outcome == an.DROPPED).sum() == over_cap  # image 3 holds 130+
    assert an.tide(matching).map == pytest.approx(coco_eval.stats[1], abs=1e-15)
    curves = an.coco_curves(coco_eval)
    np.testing.assert_array_equal(curves[2][0], precision[0, :, 1, 0, 2])
    np.testing.assert_allclose(curves[2][1], precision[:, :, 1, 0, 2].mean(axis=0))


# ------------------------------------------------------------------------------ TIDE, one case per type
def test_tide_cls():
    # Class 1 object A (image 1); class 2 object B = A moved to x=20. Detections of class 1:
    # 0.95 exactly on B (IoU 1 with a class-2 object: Cls), 0.9 exactly on A (TP).
    # AP1: ranks FP, TP -> precision 1/2 at recall 1 -> 0.5; AP2: nothing found -> 0; mAP 0.25.
    # Cls fix: the 0.95 box becomes a class-2 TP -> AP2 = 1, AP1 = 1 (only the TP left) -> mAP 1.
    B = [20, 0, 10, 10]
    result = run_tide([image(1, [(A, 1), (B, 2)], [(B, 1, 0.95), (A, 1, 0.9)])], (1, 2))
    assert result.map == pytest.approx(0.25, abs=1e-12)
    assert_only(result, {"cls": 0.75})
    assert result.class_delta["cls"] == {1: pytest.approx(0.5, abs=1e-12), 2: pytest.approx(1.0, abs=1e-12)}
    assert result.counts == {"cls": 1, "loc": 0, "both": 0, "dupe": 0, "bkg": 0, "missed": 0}  # B is aimed at


def test_tide_cls_two_errors_on_one_object():
    # Class 2 object B; class 1 boxes on it at 0.9 (IoU 1) and 0.8 (IoU 0.9): both Cls aimed at B;
    # class 1 object A found at 0.7. AP1: FP FP TP -> 1/3; AP2 0; mAP 1/6. Cls fix: the 0.9 box
    # becomes B's TP (AP2 = 1), the 0.8 one is removed (it would duplicate B), AP1 = 1 -> mAP 1.
    # (Keeping the 0.8 box in class 1 would give AP1 = 1/2, mAP 3/4.)
    B = [20, 0, 10, 10]
    result = run_tide([image(1, [(B, 2)], [(B, 1, 0.9), ([20, 0, 10, 9], 1, 0.8)]),
                       image(2, [(A, 1)], [(A, 1, 0.7)])], (1, 2))
    assert_only(result, {"cls": 5 / 6})


def test_tide_loc():
    # Image 1: object A, a 0.9 box with IoU 0.4 (Loc). Image 2: object A found at 0.8.
    # AP: FP, TP over 2 objects -> precision 1/2 up to recall 1/2: 51 of 101 thresholds -> 25.5/101.
    # Loc fix: the box becomes A's TP -> TP, TP -> 1. dAP = 75.5/101.
    result = run_tide([image(1, [(A, 1)], [(LOW, 1, 0.9)]), image(2, [(A, 1)], [(A, 1, 0.8)])])
    assert result.map == pytest.approx(25.5 / R, abs=1e-12)
    assert_only(result, {"loc": 75.5 / R})
    assert result.counts["loc"] == 1 and result.counts["missed"] == 0


def test_tide_loc_on_a_found_object_is_removed():
    # Object A found at 0.9; a 0.95 box with IoU 0.4 on it (Loc, but A is taken): the fix removes it.
    # AP: FP, TP over 1 object -> 0.5; after: 1.
    result = run_tide([image(1, [(A, 1)], [(LOW, 1, 0.95), (A, 1, 0.9)])])
    assert_only(result, {"loc": 0.5})


def test_tide_both():
    # Class 2 object A; a class-1 0.9 box with IoU 0.4 on it (no class-1 object near: Both).
    # Class 1 object found at 0.8 (image 2); class 2 object found at 0.7 (image 3).
    # AP1: FP, TP -> 0.5; AP2: A missed, the other found first -> 51/101. Both fix: AP1 = 1 -> +0.25.
    # Missed fix: A (aimed at by no Cls/Loc error) stops counting -> AP2 = 1 -> +(50/101) / 2.
    result = run_tide([image(1, [(A, 2)], [(LOW, 1, 0.9)]), image(2, [(A, 1)], [(A, 1, 0.8)]),
                       image(3, [(A, 2)], [(A, 2, 0.7)])], (1, 2))
    assert result.map == pytest.approx((0.5 + 51 / R) / 2, abs=1e-12)
    assert_only(result, {"both": 0.25, "missed": 25 / R})
    assert result.counts["both"] == 1 and result.counts["missed"] == 1


def test_tide_dupe():
    # Image 1: A found at 0.9, a second box (IoU 0.9) at 0.8 (Dupe). Image 2: A found at 0.7.
    # AP: TP, FP, TP over 2 -> precision 1 to recall 1/2 (51 thresholds), 2/3 above (50): (51 + 100/3)/101.
    # Dupe fix: TP, TP -> 1.
    result = run_tide([image(1, [(A, 1)], [(A, 1, 0.9), (NEAR, 1, 0.8)]), image(2, [(A, 1)], [(A, 1, 0.7)])])
    assert result.map == pytest.approx((51 + 100 / 3) / R, abs=1e-12)
    assert_only(result, {"dupe": 1 - (51 + 100 / 3) / R})
    assert result.counts["dupe"] == 1


def test_tide_bkg():
    # Image 1: A found at 0.8, a 0.9 box far away (IoU 0: Bkg). Image 2: no objects, a 0.95 box (Bkg).
    # AP: FP, FP, TP over 1 -> 1/3. Bkg fix: TP -> 1.
    result = run_tide([image(1, [(A, 1)], [(FAR, 1, 0.9), (A, 1, 0.8)]), image(2, [], [(A, 1, 0.95)])])
    assert_only(result, {"bkg": 2 / 3})
    assert result.counts["bkg"] == 2


def test_tide_missed_leaves_out_objects_a_fix_would_find():
    # A found at 0.9 (image 1); B missed, nothing near (image 2); C with a 0.3 box of IoU 0.4 (image 3, Loc).
    # AP: TP, FP over 3 -> precision 1 to recall 1/3: 34 thresholds -> 34/101.
    # Missed fix: only B stops counting (C is aimed at by the Loc error) -> recall 1/2: 51/101.
    # Loc fix: TP, TP over 3 -> recall 2/3: 67/101.
    result = run_tide([image(1, [(A, 1)], [(A, 1, 0.9)]), image(2, [(A, 1)]), image(3, [(A, 1)], [(LOW, 1, 0.3)])])
    assert result.map == pytest.approx(34 / R, abs=1e-12)
    assert_only(result, {"missed": 17 / R, "loc": 33 / R})
    assert result.counts["missed"] == 1


def test_tide_order_of_tests_and_ignored_objects():
    # One box with IoU 0.4 with its class and 1.0 with another class: Loc first (the toolbox's order).
    # A box on a difficult object is left out of every count (no error, AP unchanged).
    matching = an.match_detections([image(1, [(A, 1), ([0, 0, 10, 4], 2), (FAR, 1, True)],
                                          [(LOW, 1, 0.9), (FAR, 1, 0.8)])], [1, 2])
    assert matching.det_error.tolist() == [an.LOC, an.NONE]
    assert matching.det_outcome.tolist() == [an.FALSE_POSITIVE, an.IGNORED]
    assert matching.num_gt() == {1: 1, 2: 1}


def test_tide_without_detections_and_class_without_objects():
    result = run_tide([image(1, [(A, 1)])], (1, 2))
    assert result.map == 0.0 and result.ap == {1: 0.0, 2: None}
    assert_only(result, {})  # the missed object was the class's only one: AP stays 0
    assert result.class_delta["missed"] == {1: 0.0, 2: None}


# ------------------------------------------------------------------------------ confusion and F1
def test_confusion_matrix_hand_case():
    # Classes 1, 2; threshold 0.5. Image 1: a (class 1), b (class 2, at x=20), c (class 1, difficult, far).
    #   0.9 class 1 on a -> TP [1,1]; 0.8 class 1 on b -> confusion [2,1]; 0.75 class 1 at IoU 0.9 on b
    #   (b taken) -> false detection [bg,1]; 0.7 class 2 on nothing -> [bg,2]; 0.6 class 1 on c ->
    #   ignored; 0.3 class 2 on a -> below the threshold.
    # Image 2: e (class 2) not found -> [2,bg]; f (class 1) found at 0.55 -> [1,1].
    b = [20, 0, 10, 10]
    images = [image(1, [(A, 1), (b, 2), (FAR, 1, True)],
                    [(A, 1, 0.9), (b, 1, 0.8), ([20, 0, 10, 9], 1, 0.75), ([100, 0, 10, 10], 2, 0.7),
                     (FAR, 1, 0.6), (NEAR, 2, 0.3)]),
              image(2, [(b, 2), (A, 1)], [(A, 1, 0.55)])]
    confusion = an.confusion_matrix(an.match_detections(images, [1, 2]), 0.5)
    assert confusion.counts.tolist() == [[2, 0, 0], [1, 0, 1], [1, 1, 0]]
    np.testing.assert_allclose(confusion.normalised(), [[1, 0, 0], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    assert confusion.image_tp.tolist() == [1, 1] and confusion.image_fp.tolist() == [3, 0]
    assert confusion.image_fn.tolist() == [1, 1]  # b was not found by a class-2 box; e missed
    np.testing.assert_allclose(an.image_f1(confusion), [2 / 6, 2 / 3])
    assert confusion.gt_found.tolist() == [True, False, False, False, True]  # a and f
    assert an.worst_and_best(confusion, 1) == ([0], [1])


def test_best_f1_hand_case():
    # 3 objects; ranked 0.9 TP, 0.8 FP, 0.7 TP, 0.7 TP, 0.6 FP. F1 = 2TP / (TP + FP + 3) at each
    # threshold: 0.9 -> 2/4, 0.8 -> 2/5, 0.7 (both tied boxes) -> 6/7, 0.6 -> 6/8. Splitting the tie
    # (4/6) is not a threshold. Best: 0.7 with precision 3/4, recall 1.
    point = an.best_f1(np.array([1, 0, 1, 1, 0], bool), np.array([0.9, 0.8, 0.7, 0.7, 0.6]), 3)
    assert (point.threshold, point.true_positives, point.false_positives) == (0.7, 3, 1)
    assert (point.precision, point.recall, point.f1) == pytest.approx((0.75, 1.0, 6 / 7), abs=1e-12)
    # Equal F1 (2/3 at 0.9 and at 0.6): the higher threshold wins.
    tie = an.best_f1(np.array([1, 0, 0, 1], bool), np.array([0.9, 0.8, 0.7, 0.6]), 2)
    assert tie.threshold == 0.9 and tie.f1 == pytest.approx(2 / 3, abs=1e-12)
    assert an.best_f1(np.array([0], bool), np.array([0.5]), 1).threshold is None


def test_f1_table_from_matching():
    # Class 1: A found at 0.9, a Bkg box at 0.4 -> best F1 1 at 0.9. Class 2: one object, never found.
    matching = an.match_detections([image(1, [(A, 1), (FAR, 2)], [(A, 1, 0.9), ([100, 0, 5, 5], 1, 0.4)])], [1, 2])
    per_class, overall = an.f1_table(matching)
    assert per_class[1].threshold == 0.9 and per_class[1].f1 == 1.0
    assert per_class[2].threshold is None
    assert (overall.threshold, overall.f1) == (0.9, pytest.approx(2 / 3))  # pooled: TP 1, FN 1


# ------------------------------------------------------------------------------ drawing
def test_draw_evaluation_styles():
    picture = Image.new("RGB", (40, 30), (120, 120, 120))
    drawn = draw_evaluation(picture, [[2, 2, 38, 28]], ["missed x"], [False], [[10, 10, 20, 20]], [1], ["x 0.5 Bkg"],
                            min_long_side=400)
    assert drawn.size == (400, 300)
    pixels = np.asarray(drawn)
    edge = pixels[20:280, 20]  # the ground truth's left edge (x = 2 * 10), dashed
    colours = {tuple(p) for p in edge}
    assert GT_LIGHT in colours and GT_DARK in colours
    assert tuple(pixels[150, 100]) == class_colour(1)  # the prediction's left edge


def test_ignored_ground_truth_is_dotted_grey_with_black_gaps():
    """On a white image (where grey dashes over open gaps were hard to see) the outline of an
    ignored object holds only grey dots and black gaps, one line thick each."""
    drawn = draw_evaluation(Image.new("RGB", (40, 30), (255, 255, 255)), [[2, 2, 38, 28]], [None], [True],
                            [], [], [], min_long_side=400)
    edge = np.asarray(drawn)[20:280, 20]  # the left edge (x = 2 * 10)
    runs = [(colour, len(list(run))) for colour, run in itertools.groupby(map(tuple, edge))]
    assert {colour for colour, _ in runs} == {GT_IGNORED, GT_DARK}
    assert {length for _, length in runs[1:-1]} == {default_line_thickness(400, 300)}


# ------------------------------------------------------------------------------ the written report
def check_report(folder: Path) -> dict:
    """Every src/href of report.html exists under ``folder``; no script, nothing remote."""
    page = (folder / "report.html").read_text()
    tree = lxml.html.fromstring(page)
    assert not tree.xpath("//script")
    links = [e.get("src") for e in tree.xpath("//*[@src]")] + [e.get("href") for e in tree.xpath("//*[@href]")]
    assert links
    for link in links:
        if link.startswith("#"):
            assert tree.xpath(f"//*[@id='{link[1:]}']"), link
            continue
        assert "://" not in link and not link.startswith("/"), link
        assert (folder / link).is_file(), link
    data = json.loads((folder / "report.json").read_text())
    for name in data["files"]:
        assert (folder / name).is_file(), name
    return data


def run_report(weights: Path, out: Path, *extra: str) -> dict:
    code = validation.main(["--weights-path", str(weights), "--output", str(out / "record.txt"), "--workers", "0",
                            "--report", str(out / "report"), *extra])
    assert code == 0
    return check_report(out / "report")


def test_report_on_demo_data(trained_run, tmp_path):
    data = run_report(trained_run / "best.pth", tmp_path)
    assert data["ap50"] == pytest.approx(data["coco_stats"]["AP@.5"], abs=1e-12)
    assert data["score_threshold"] == data["best_f1_overall"]["threshold"] or \
        data["best_f1_overall"]["threshold"] is None
    counts = np.array(data["confusion"]["counts"])
    objects = [row["num_objects"] for row in data["per_class"]]
    assert counts[:-1].sum(axis=1).tolist() == objects  # every object is in its row once
    assert all(v >= 0 for v in data["tide"]["delta"].values())
    assert {"training_loss_and_lr.png", "training_map.png"} <= set(data["files"])
    assert len(data["images"]["worst"]) + len(data["images"]["best"]) == 5  # 5 validation images


def test_report_with_a_class_absent_from_the_split(trained_run, demo_voc, tmp_path):
    data_copy = tmp_path / "data"
    shutil.copytree(demo_voc, data_copy)
    voc = data_copy / "VOCdevkit" / "VOC2012"
    for stem in (voc / "ImageSets" / "Main" / "val.txt").read_text().split():
        path = voc / "Annotations" / f"{stem}.xml"
        tree = ET.parse(path)
        for obj in tree.getroot().findall("object"):
            if obj.findtext("name") == "square":
                tree.getroot().remove(obj)
        tree.write(path)
    data = run_report(trained_run / "best.pth", tmp_path, "--data-path", str(data_copy), "--report-score-thresh",
                      "0.05", "--report-images", "2")
    square = next(row for row in data["per_class"] if row["name"] == "square")
    assert square["num_objects"] == 0 and square["coco_ap50"] is None and square["best_f1"] is None
    assert all(value is None for value in square["tide"].values())
    index = data["confusion"]["labels"].index("square")
    assert sum(data["confusion"]["counts"][index]) == 0
    assert data["score_threshold"] == 0.05 and data["score_threshold_source"] == "--report-score-thresh"
    assert len(data["images"]["worst"]) <= 2


@pytest.mark.parametrize("flags, message", [(["--report-images", "-1"], "--report-images must be >= 0"),
                                            (["--report-score-thresh", "1.5"], "--report-score-thresh must be")])
def test_report_flag_errors_are_one_line(tmp_path, capsys, flags, message):
    code = validation.main(["--weights-path", str(tmp_path / "missing.pth"), "--report", str(tmp_path), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and message in err


def test_report_numbers_are_finite(trained_run, tmp_path):
    data = run_report(trained_run / "best.pth", tmp_path, "--report-images", "0")
    assert data["images"] == {"worst": [], "best": []}
    for row in data["per_class"]:
        for value in row["tide"].values():
            assert value is None or math.isfinite(value)
