"""A new user's first hour: class names taken from the data (--classes-json auto), messages that name
command-line flags, help texts without doubled defaults on every entry point, and predict.py's
COCO results file scored by pycocotools."""
import ast
import contextlib
import io
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import ROOT, TINY_TRAIN_FLAGS
from my_dataset import VOCDataSet
from tools import check_dataset
from voc_factory import VocItem, VocObject, write_voc

TRAFFIC = ["red_light", "green_light", "amber_light"]


@pytest.fixture(scope="module")
def traffic_voc(tmp_path_factory) -> Path:
    """A VOC2007 folder (not 2012) of jpg and png images with class names pascal_voc_classes.json
    does not know; no classes json anywhere."""
    root = tmp_path_factory.mktemp("traffic")
    items = []
    for i in range(16):
        objects = [VocObject(TRAFFIC[(i + k) % 3], (4 + 10 * k, 6, 30 + 10 * k, 40)) for k in range(1 + i % 2)]
        items.append(VocItem(f"light_{i:02d}", width=96, height=80, objects=objects,
                             image_ext=".png" if i % 3 == 0 else ".jpg"))
    ids = [item.id for item in items]
    write_voc(root, items, year="2007", splits={"train": ids[:12], "val": ids[12:]})
    return root


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_unknown_classes_suggest_auto_and_the_flags(traffic_voc):
    with pytest.raises(ValueError) as info:
        VOCDataSet(traffic_voc, transforms=None, txt_name="train.txt")
    message = str(info.value)
    assert "none of the classes of" in message and "pass --classes-json auto" in message
    assert "'red_light'" in message and "\n" not in message
    dataset = VOCDataSet(traffic_voc, transforms=None, txt_name="train.txt", classes_json="auto")
    assert dataset.class_names == sorted(TRAFFIC) and dataset.year == "2007"


def test_check_dataset_writes_the_classes_of_the_data(traffic_voc, tmp_path, capsys):
    out = tmp_path / "classes.json"
    code = check_dataset.main([str(traffic_voc), "--split", "train.txt,val.txt", "--classes-json", "auto",
                               "--write-classes", str(out)])
    assert code == 0, capsys.readouterr().out
    assert json.loads(out.read_text()) == {name: i for i, name in enumerate(sorted(TRAFFIC), start=1)}
    assert VOCDataSet(traffic_voc, None, None, "val.txt", classes_json=str(out)).class_names == sorted(TRAFFIC)


@pytest.mark.slow
def test_classes_json_auto_trains_and_the_checkpoint_carries_the_names(traffic_voc, tmp_path):
    out = tmp_path / "run"
    done = run("train_mobilenet.py", "--data-path", str(traffic_voc), "--classes-json", "auto",
               "--backbone-weights", "none", "--epochs", "1", "--output-dir", str(out), *TINY_TRAIN_FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(TRAFFIC)
    assert json.loads((out / "classes.json").read_text()) == {n: i for i, n in enumerate(names, start=1)}

    report = tmp_path / "record.txt"
    valid = run("validation.py", "--weights-path", str(out / "last.pth"), "--workers", "0", "--output", str(report))
    assert valid.returncode == 0, valid.stderr[-3000:]
    record = json.loads(report.with_suffix(".json").read_text())
    assert [row["name"] for row in record["per_class"]] == names and record["num_images"] == 4

    image = next((traffic_voc / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.png"))
    predicted = run("predict.py", "--weights", str(out / "last.pth"), "--score-thresh", "0", "--no-draw",
                    "--workers", "1", str(image), "--save-json", str(tmp_path / "p.json"))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert {r["category_name"] for r in json.loads((tmp_path / "p.json").read_text())} <= set(names)

    # Resuming keeps the checkpoint's classes; data whose classes differ stops with one line.
    other = tmp_path / "other"
    write_voc(other, [VocItem(f"o{i}", 96, 80, [VocObject("zebra", (4, 6, 40, 40))]) for i in range(6)], year="2007",
              splits={"train": ["o0", "o1", "o2", "o3"], "val": ["o4", "o5"]})
    resumed = run("train_mobilenet.py", "--data-path", str(other), "--classes-json", "auto", "--resume", "auto",
                  "--epochs", "2", "--output-dir", str(out), *TINY_TRAIN_FLAGS)
    assert resumed.returncode == 1 and "was trained on the classes ['amber_light', 'green_light', 'red_light'] " \
        "but the data now gives ['zebra']" in resumed.stderr
    resumed = run("train_mobilenet.py", "--data-path", str(traffic_voc), "--classes-json", "auto", "--resume", "auto",
                  "--epochs", "2", "--output-dir", str(out), *TINY_TRAIN_FLAGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "classes.json").read_text()) == {n: i for i, n in enumerate(names, start=1)}


def test_auto_classes_messages_and_skip(traffic_voc, tmp_path):
    """A split with a class the training split lacks names the auto source; skipping every object
    of the data is an error, not an empty training set."""
    with pytest.raises(ValueError, match=r"classes not in the class names of the training run: 'red_light'.*"
                                         r"give every split the same classes"):
        VOCDataSet(traffic_voc, None, None, "train.txt", classes_json=["amber_light", "green_light"])
    with pytest.raises(ValueError, match="none of the classes of .* is in .*pascal_voc_classes.json.*--classes-json auto"):
        VOCDataSet(traffic_voc, None, None, "train.txt", skip_unknown_classes=True)


def test_coco_results_match_ground_truth_by_the_longest_path_ending(tmp_path):
    from train_utils.inference.coco_results import CocoResults

    gt = {"images": [{"id": 7, "file_name": "a/x.jpg"}, {"id": 8, "file_name": "b/x.jpg"},
                     {"id": 9, "file_name": "y.jpg"}], "categories": [{"id": 3, "name": "cat"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    box, label, score = torch.tensor([[1.0, 2.0, 11.0, 22.0]]), torch.tensor([1]), torch.tensor([0.9])
    results = CocoResults(["cat"], tmp_path / "gt.json")
    for name in ("b/x.jpg", "a/x.jpg", "c/y.jpg", "z.jpg"):
        results.add(tmp_path / "in" / name, 30, 40, box, label, score)
    assert [(r["image_id"], r["category_id"], r["bbox"]) for r in results.records] == \
        [(8, 3, [1.0, 2.0, 10.0, 20.0]), (7, 3, [1.0, 2.0, 10.0, 20.0]), (9, 3, [1.0, 2.0, 10.0, 20.0])]
    assert results.unmatched == [str(tmp_path / "in" / "z.jpg")]
    with pytest.raises(ValueError, match="matches the image .* by file name"):
        results.add(tmp_path / "again" / "y.jpg", 30, 40, box, label, score)
    gt["images"].append({"id": 10, "file_name": "y.jpg"})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(ValueError, match=r"matches ground-truth ids \[9, 10\]"):
        CocoResults(["cat"], tmp_path / "gt.json").add(tmp_path / "y.jpg", 30, 40, box, label, score)
    empty = CocoResults(["cat"])
    lines = empty.write(tmp_path / "empty.json")
    assert "the results file is empty" in lines[1] and json.loads((tmp_path / "empty.json").read_text()) == []


# ------------------------------------------------------------------------------ messages and help
def _message_strings(tree: ast.AST):
    """Literal text of what raise statements, print(...) and parser.error(...) calls say."""
    for node in ast.walk(tree):
        said = None
        if isinstance(node, ast.Raise) and node.exc is not None:
            said = node.exc
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("print", "error"):
            said = node
        if said is not None:
            for part in ast.walk(said):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    yield part.lineno, part.value


def test_messages_name_flags_not_python_arguments():
    files = [p for p in ROOT.glob("*.py")] + [p for folder in ("backbone", "network_files", "train_utils", "tools")
                                               for p in (ROOT / folder).rglob("*.py")]
    python_advice = re.compile(r"\b[a-z_]+=(True|False)\b")
    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}" for path in files
             for line, text in _message_strings(ast.parse(path.read_text())) if python_advice.search(text)]
    assert not found, found


ENTRY_POINTS = ["train_mobilenet.py", "train_resnet50_fpn.py", "train_multi_GPU.py", "validation.py", "predict.py",
                "tools/export_onnx.py", "tools/check_dataset.py", "tools/split_data.py", "tools/make_demo_voc.py",
                "tools/benchmark.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_states_each_default_once(script):
    done = run(script, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(default: None)" not in done.stdout
    # One help entry per option: from its "  -x/--name" line to the next one.
    entries = re.split(r"\n  (?=-)", done.stdout)
    doubled = [entry for entry in entries if len(re.findall(r"\bdefault\b", entry, flags=re.I)) > 1]
    assert not doubled, doubled


# ------------------------------------------------------------------------------ COCO results
def coco_ground_truth(voc: Path, ids: list, path: Path) -> dict:
    """A COCO ground-truth json of VOC images: image ids 100.., category ids 10/20/30 in an order
    unlike the detector's labels."""
    category_ids = {"triangle": 10, "circle": 20, "square": 30}
    images, annotations = [], []
    for number, image_id in enumerate(ids):
        root = ET.parse(voc / "Annotations" / f"{image_id}.xml").getroot()
        size = root.find("size")
        images.append({"id": 100 + number, "file_name": f"{image_id}.jpg",
                       "width": int(size.find("width").text), "height": int(size.find("height").text)})
        for obj in root.findall("object"):
            x1, y1, x2, y2 = (float(obj.find("bndbox").find(t).text) for t in ("xmin", "ymin", "xmax", "ymax"))
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + number, "iscrowd": 0,
                                "category_id": category_ids[obj.find("name").text],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": i, "name": n} for n, i in category_ids.items()]}
    path.write_text(json.dumps(gt))
    return gt


def load_quietly(coco: COCO, results: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return coco.loadRes(str(results))


def test_save_json_is_a_coco_results_file(trained_run, demo_voc, tmp_path):
    import predict

    voc = demo_voc / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets" / "Main" / "val.txt").read_text().split()
    images = [str(voc / "JPEGImages" / f"{i}.jpg") for i in ids]
    gt = coco_ground_truth(voc, ids, tmp_path / "gt.json")
    common = ["--weights", str(trained_run / "best.pth"), "--score-thresh", "0", "--no-draw", "--workers", "1"]

    assert predict.main([*common, *images, "--save-json", str(tmp_path / "with_gt.json"),
                         "--coco-gt", str(tmp_path / "gt.json")]) == 0
    results = json.loads((tmp_path / "with_gt.json").read_text())
    assert results and {r["image_id"] for r in results} <= {image["id"] for image in gt["images"]}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    assert all(names[r["category_id"]] == r["category_name"] for r in results)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        evaluation = COCOeval(coco_gt, load_quietly(coco_gt, tmp_path / "with_gt.json"), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert len(evaluation.stats) == 12 and evaluation.stats[1] >= 0

    assert predict.main([*common, *images, "--save-json", str(tmp_path / "alone.json")]) == 0
    skeleton = json.loads((tmp_path / "alone_images.json").read_text())
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in skeleton["images"]] == \
        [(n + 1, f"{i}.jpg", 128, 128) for n, i in enumerate(ids)]
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = load_quietly(COCO(str(tmp_path / "alone_images.json")), tmp_path / "alone.json")
    assert len(loaded.getAnnIds()) == len(results)
