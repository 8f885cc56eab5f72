"""Extending the project without editing it: a module outside the package registers a backbone (a
tiny CNN with an option of its own) and a dataset format (CSV rows ``image,x1,y1,x2,y2,class``);
the training script, validation.py and predict.py load it with ``--plugin`` and work end to end.
The module is the code block of docs/architecture.md's "Adding a backbone or a format", run as is."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_COMMON_FLAGS
from backbone import read_weight_file


def documented_plugin() -> str:
    """The plugin module docs/architecture.md shows under "Adding a backbone or a format"."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("<!-- plugin-example -->\n```python\n", 1)[1]
    return block.split("\n```", 1)[0]


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """``tiny_plugin.py`` (the documented backbone and CSV format) in a folder outside the project."""
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "tiny_plugin.py").write_text(documented_plugin())
    return folder


def write_csv_splits(demo_voc: Path, folder: Path) -> Path:
    """The demo VOC folder's train and val splits as CSV files in ``folder`` (absolute image paths)."""
    folder.mkdir()
    voc = demo_voc / "VOCdevkit" / "VOC2012"
    for split in ("train", "val"):
        lines = ["image,x1,y1,x2,y2,class"]
        for image_id in (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split():
            for obj in ET.parse(voc / "Annotations" / f"{image_id}.xml").findall("object"):
                box = [obj.find("bndbox").find(tag).text for tag in ("xmin", "ymin", "xmax", "ymax")]
                lines.append(f"{voc / 'JPEGImages' / image_id}.jpg,{','.join(box)},{obj.find('name').text}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return folder


def run(script: str, plugin_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(plugin_dir)}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_plugin_backbone_and_format_train_validate_predict(plugin_dir, demo_voc, tmp_path):
    data = write_csv_splits(demo_voc, tmp_path / "csv")
    out = tmp_path / "run"
    train = run("train_resnet50_fpn.py", plugin_dir, "--plugin", "tiny_plugin", "--backbone", "tiny_cnn",
                "--width", "8", "--dataset-format", "csv_boxes", "--data-path", str(data),
                "--train-split", "train.csv", "--val-split", "val.csv", "--epochs", "1",
                "--output-dir", str(out), *TINY_COMMON_FLAGS)
    assert train.returncode == 0, f"{train.stdout[-2000:]}\n{train.stderr[-3000:]}"
    ckpt = read_weight_file(str(out / "last.pth"))  # read_checkpoint would need the plugin imported here
    assert ckpt["model_config"]["backbone"] == "tiny_cnn" and ckpt["model_config"]["backbone_options"] == {"width": 8}
    assert ckpt["plugins"] == ["tiny_plugin"] and ckpt["args"]["dataset_format"] == "csv_boxes"
    rows = (data / "train.csv").read_text().splitlines()[1:]
    assert ckpt["class_names"] == sorted({row.split(",")[-1] for row in rows}) == ["circle", "square", "triangle"]
    assert ckpt["model"]["backbone.0.weight"].shape == (8, 3, 3, 3)
    coco_stats = ckpt["metrics"]["coco_stats"]
    assert len(coco_stats) == 12

    record = tmp_path / "record.txt"
    valid = run("validation.py", plugin_dir, "--plugin", "tiny_plugin", "--weights-path", str(out / "last.pth"),
                "--workers", "0", "--output", str(record))
    assert valid.returncode == 0, valid.stderr[-3000:]
    scored = json.loads(record.with_suffix(".json").read_text())
    assert scored["num_images"] == 5 and scored["coco_stats"] == pytest.approx(coco_stats, abs=1e-9)

    voc = demo_voc / "VOCdevkit" / "VOC2012"
    images = [str(voc / "JPEGImages" / f"{i}.jpg") for i in (voc / "ImageSets/Main/val.txt").read_text().split()[:2]]
    predicted = run("predict.py", plugin_dir, "--plugin", "tiny_plugin", "--weights", str(out / "last.pth"),
                    "--output-dir", str(tmp_path / "pred"), "--score-thresh", "0", "--workers", "1", *images)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "2 images processed, 0 skipped" in predicted.stdout


@pytest.mark.slow
def test_checkpoint_of_a_plugin_backbone_names_the_plugin(plugin_dir, demo_voc, tmp_path):
    """Without --plugin the backbone is unknown: one line saying which flag to add."""
    state = {"format_version": 2, "model": {"x": torch.zeros(1)}, "plugins": ["tiny_plugin"],
             "model_config": {"num_classes": 4, "backbone": "tiny_cnn"}, "class_names": ["a", "b", "c"]}
    torch.save(state, tmp_path / "plugin.pth")
    done = run("validation.py", plugin_dir, "--weights-path", str(tmp_path / "plugin.pth"),
               "--data-path", str(demo_voc), "--output", str(tmp_path / "r.txt"))
    assert done.returncode == 1
    err = done.stderr.strip()
    assert "\n" not in err and "unknown backbone 'tiny_cnn'" in err and "--plugin tiny_plugin" in err, err
