"""COCO ground-truth conversion and CocoEvaluator parity with pycocotools."""
import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import ImageFile
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Subset

from my_dataset import VOCDataSet
from train_utils.evaluation.coco_eval import CocoEvaluator, merge_detections
from train_utils.evaluation.coco_api import convert_to_coco_api, get_coco_api_from_dataset
from voc_factory import VocItem, VocObject, write_voc

REPO = Path(__file__).resolve().parents[1]


class InMemoryDetection:
    """Ground truth held in memory, exposing the ``coco_index`` protocol of VOCDataSet."""

    def __init__(self, images, class_names=("a", "b", "c")):
        self.images = images  # list of (height, width, boxes [N, 4] xyxy, labels [N], iscrowd [N])
        self.class_names = list(class_names)

    def __len__(self):
        return len(self.images)

    def coco_index(self, idx):
        height, width, boxes, labels, crowd = self.images[idx]
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64),
                  "image_id": torch.tensor(idx), "iscrowd": torch.tensor(crowd, dtype=torch.int64),
                  "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])}
        return height, width, target


def prediction(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


def evaluate(coco_gt, predictions):
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(predictions)
    evaluator.accumulate()
    return evaluator


def test_convert_voc_dataset_exactly_without_decoding(tmp_path, monkeypatch):
    write_voc(tmp_path, [
        VocItem("a", objects=[VocObject("dog", (1.5, 2, 30, 40), difficult=1), VocObject("person", (3, 4, 20, 21))]),
        VocItem("b", width=50, height=30, image_ext=".png"),
        VocItem("c", objects=[VocObject("cat", (0, 0, 10, 12.5))]),
    ])
    dataset = VOCDataSet(tmp_path, classes_json=REPO / "pascal_voc_classes.json")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("an image was decoded"))
    coco = convert_to_coco_api(dataset)
    assert coco.dataset["images"] == [{"id": 0, "height": 48, "width": 64}, {"id": 1, "height": 30, "width": 50},
                                      {"id": 2, "height": 48, "width": 64}]
    assert coco.dataset["annotations"] == [
        {"id": 1, "image_id": 0, "bbox": [1.5, 2.0, 28.5, 38.0], "area": 1083.0, "category_id": 12, "iscrowd": 1},
        {"id": 2, "image_id": 0, "bbox": [3.0, 4.0, 17.0, 17.0], "area": 289.0, "category_id": 15, "iscrowd": 0},
        {"id": 3, "image_id": 2, "bbox": [0.0, 0.0, 10.0, 12.5], "area": 125.0, "category_id": 8, "iscrowd": 0},
    ]
    categories = coco.dataset["categories"]
    assert len(categories) == 20 and categories[0] == {"id": 1, "name": "aeroplane"}
    assert categories[19] == {"id": 20, "name": "tvmonitor"}
    assert coco.getAnnIds(imgIds=[0]) == [1, 2] and coco.getImgIds(catIds=[8]) == [2]

    subset_coco = get_coco_api_from_dataset(Subset(Subset(dataset, [2, 1, 0]), [0, 2]))
    assert [image["id"] for image in subset_coco.dataset["images"]] == [2, 0]
    assert [a["category_id"] for a in subset_coco.dataset["annotations"]] == [8, 12, 15]


def test_convert_falls_back_to_getitem():
    class Plain:
        def __len__(self):
            return 2

        def __getitem__(self, idx):
            target = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 8.0]]) * (idx + 1), "labels": torch.tensor([3 + idx]),
                      "image_id": torch.tensor(10 + idx)}
            return torch.zeros(3, 20 + idx, 30), target

    coco = convert_to_coco_api(Plain())
    assert coco.dataset["images"] == [{"id": 10, "height": 20, "width": 30}, {"id": 11, "height": 21, "width": 30}]
    assert [a["bbox"] for a in coco.dataset["annotations"]] == [[1.0, 2.0, 3.0, 6.0], [2.0, 4.0, 6.0, 12.0]]
    assert [a["area"] for a in coco.dataset["annotations"]] == [18.0, 72.0]
    assert [a["iscrowd"] for a in coco.dataset["annotations"]] == [0, 0]
    assert coco.dataset["categories"] == [{"id": 3, "name": "3"}, {"id": 4, "name": "4"}]


def simple_gt():
    return convert_to_coco_api(InMemoryDetection([
        (100, 120, [[10, 10, 50, 60], [60, 20, 110, 90]], [1, 2], [0, 0]),
        (80, 80, [[5, 5, 75, 70]], [3], [0]),
        (90, 90, [], [], []),
    ]))


def test_perfect_detections_give_ap_one(capsys):
    predictions = {
        0: prediction([[10, 10, 50, 60], [60, 20, 110, 90]], [0.9, 0.8], [1, 2]),
        1: prediction([[5, 5, 75, 70]], [0.7], [3]),
        2: prediction([], [], []),
    }
    evaluator = evaluate(simple_gt(), predictions)
    evaluator.summarize()
    printed = capsys.readouterr().out
    assert "IoU metric: bbox" in printed and "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in printed
    stats = evaluator.stats
    assert len(stats) == 12
    assert [stats[i] for i in (0, 1, 2, 8)] == pytest.approx([1.0] * 4, abs=1e-12)  # pycocotools rounds
    precision = evaluator.coco_eval["bbox"].eval["precision"]  # [T, R, K, A, M]
    assert precision.shape[2] == 3 and np.allclose(precision[0, :, :, 0, 2], 1.0, rtol=0, atol=1e-12)


def random_case(seed):
    """Ground truth and detections with exactly representable coordinates (multiples of 1/4)."""
    rng = np.random.default_rng(seed)
    images, predictions = [], {}
    for image_id in range(8):
        count = int(rng.integers(0, 5))
        xy = rng.integers(0, 240, (count, 2)) / 4
        wh = rng.integers(20, 160, (count, 2)) / 4
        boxes = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(1, 4, count)
        crowd = (rng.random(count) < 0.15).astype(int)
        images.append((100, 110, boxes.tolist(), labels.tolist(), crowd.tolist()))
        keep = rng.random(count) < 0.8
        jitter = rng.integers(-12, 13, (count, 4)) / 4
        det_boxes = (boxes + jitter)[keep]
        det_labels = np.where(rng.random(count) < 0.9, labels, rng.integers(1, 4, count))[keep]
        extra = int(rng.integers(0, 3))
        extra_xy = rng.integers(0, 240, (extra, 2)) / 4
        extra_boxes = np.concatenate([extra_xy, extra_xy + rng.integers(20, 160, (extra, 2)) / 4], axis=1)
        all_boxes = np.concatenate([det_boxes, extra_boxes])
        all_labels = np.concatenate([det_labels, rng.integers(1, 4, extra)])
        scores = rng.integers(1, 1000, len(all_boxes)) / 1000
        predictions[image_id] = (all_boxes.tolist(), scores.tolist(), all_labels.tolist())
    return InMemoryDetection(images), predictions


def test_evaluator_equals_pycocotools_run_directly():
    dataset, raw = random_case(seed=5)
    coco_gt = convert_to_coco_api(dataset)
    evaluator = CocoEvaluator(coco_gt)
    batches = [[0, 1, 2], [3], [4, 5, 6, 7]]
    for batch in batches:
        evaluator.update({i: prediction(*raw[i]) for i in batch})
    evaluator.accumulate()

    results = [{"image_id": i, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
               for i, (boxes, scores, labels) in raw.items()
               for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels)]
    with contextlib.redirect_stdout(io.StringIO()):
        direct = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    assert 0.1 < direct.stats[0] < 0.95  # a non-trivial case
    np.testing.assert_allclose(evaluator.stats, direct.stats, rtol=0, atol=1e-9)
    np.testing.assert_allclose(evaluator.coco_eval["bbox"].eval["precision"], direct.eval["precision"], atol=1e-9)


def test_difficult_boxes_are_ignored():
    def ap(crowd_flag, detect_crowd_box):
        dataset = InMemoryDetection([(100, 100, [[10, 10, 40, 40], [50, 50, 90, 95]], [1, 1], [0, crowd_flag])])
        boxes, scores = [[10, 10, 40, 40]], [0.5]
        if detect_crowd_box:
            boxes, scores = boxes + [[50, 50, 90, 95]], scores + [0.9]  # ranked first
        return evaluate(convert_to_coco_api(dataset), {0: prediction(boxes, scores, [1] * len(boxes))}).stats[1]

    assert ap(crowd_flag=1, detect_crowd_box=False) == pytest.approx(1.0, abs=1e-12)  # missing it costs no recall
    assert ap(crowd_flag=1, detect_crowd_box=True) == pytest.approx(1.0, abs=1e-12)  # not a false positive
    assert ap(crowd_flag=0, detect_crowd_box=False) < 0.6  # the same box when not difficult


def test_zero_detections_and_images_without_detections():
    empty = {i: prediction([], [], []) for i in range(3)}
    evaluator = evaluate(simple_gt(), empty)
    stats = evaluator.stats
    assert stats[0] == stats[1] == stats[8] == 0.0
    assert all(value in (0.0, -1.0) for value in stats)


def test_update_rules_and_errors():
    coco_gt = simple_gt()
    evaluator = CocoEvaluator(coco_gt)
    with pytest.raises(RuntimeError, match="no predictions"):
        evaluator.accumulate()
    with pytest.raises(RuntimeError, match="accumulate"):
        evaluator.stats
    with pytest.raises(KeyError, match="image id 9"):
        evaluator.update({9: prediction([], [], [])})
    evaluator.update({torch.tensor(0): prediction([[10, 10, 50, 60]], [0.9], [1])})
    evaluator.update({0: prediction([[0, 0, 5, 5]], [0.9], [1])})  # a repeated image keeps its first predictions
    assert evaluator.detections[0][0]["bbox"] == [10.0, 10.0, 40.0, 50.0]
    evaluator.accumulate()
    assert evaluator.coco_eval["bbox"].params.imgIds == [0]
    assert evaluator.stats[8] == 0.5  # one of the two boxes of image 0 found
    assert coco_gt.anns[1] == {"id": 1, "image_id": 0, "bbox": [10.0, 10.0, 40.0, 50.0], "area": 2000.0,
                               "category_id": 1, "iscrowd": 0}  # the caller's ground truth is not modified
    with pytest.raises(ValueError, match="bbox"):
        CocoEvaluator(coco_gt, iou_types=("segm",))


def test_merge_keeps_each_image_once():
    first = {0: ["r0-img0"], 2: ["r0-img2"]}
    second = {1: ["r1-img1"], 0: ["r1-img0-padding"]}
    assert merge_detections([first, second]) == {0: ["r0-img0"], 2: ["r0-img2"], 1: ["r1-img1"]}


def _distributed_worker(rank, world_size, init_file, raw, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dataset, _ = random_case(seed=5)
        evaluator = CocoEvaluator(convert_to_coco_api(dataset))
        # like a padded DistributedSampler: rank 1 also gets image 0, which rank 0 already evaluates
        for image_id in [[0, 2, 4, 6], [1, 3, 5, 7, 0]][rank]:
            boxes, scores, labels = raw[image_id]
            if image_id == 0 and rank != 0:
                boxes, scores, labels = [], [], []  # the duplicate must not replace rank 0's result
            evaluator.update({image_id: prediction(boxes, scores, labels)})
        evaluator.synchronize_between_processes()
        evaluator.accumulate()  # every rank matches its share of the images; rank 0 accumulates
        coco_eval = evaluator.coco_eval["bbox"]
        np.save(Path(out_dir) / f"share{rank}.npy", np.array(coco_eval.params.imgIds))
        if rank == 0:
            np.save(Path(out_dir) / "stats.npy", np.array(evaluator.stats))
            np.save(Path(out_dir) / "precision.npy", coco_eval.eval["precision"])
        else:
            assert not coco_eval.eval, "only rank 0 accumulates"
    finally:
        dist.destroy_process_group()


def test_synchronize_between_processes_matches_single_process(tmp_path):
    dataset, raw = random_case(seed=5)
    reference = evaluate(convert_to_coco_api(dataset), {i: prediction(*raw[i]) for i in raw})
    single = reference.stats
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path / "init"), raw, str(tmp_path)), nprocs=2,
                       start_method="fork")  # fork: no re-import of torch in the children
    np.testing.assert_array_equal(np.load(tmp_path / "stats.npy"), single)
    np.testing.assert_array_equal(np.load(tmp_path / "precision.npy"), reference.coco_eval["bbox"].eval["precision"])
    assert np.load(tmp_path / "share0.npy").tolist() == list(range(8))  # rank 0 ends with every image
    assert np.load(tmp_path / "share1.npy").tolist() == [1, 3, 5, 7]  # rank 1 matched its half
