"""tools/split_data.py: deterministic per seed, only annotations with an image, refuses to
overwrite without --force, and the written split loads in VOCDataSet."""
import subprocess
import sys

import pytest

from conftest import ROOT
from my_dataset import VOCDataSet
from tools import split_data
from voc_factory import VocItem, write_classes_json, write_voc


@pytest.fixture
def voc(tmp_path):
    """20 annotated images, one annotation without image, one image without annotation, strays."""
    items = [VocItem(f"img{i:02d}") for i in range(20)] + [VocItem("no_image", image="missing"),
                                                            VocItem("no_xml", xml="missing")]
    voc_dir = write_voc(tmp_path, items, stray_files=True)
    (voc_dir / "ImageSets" / "Main" / "train.txt").unlink()  # written by default
    write_classes_json(tmp_path / "classes.json", ["cat"])
    return voc_dir


def read_ids(path):
    return path.read_text().splitlines()


def test_split_is_deterministic_and_complete(voc, tmp_path, capsys):
    main = voc / "ImageSets" / "Main"
    assert split_data.main([str(tmp_path), "--val-ratio", "0.25", "--seed", "3"]) == 0
    assert "skipping 1 annotations without an image" in capsys.readouterr().out
    train, val = read_ids(main / "train.txt"), read_ids(main / "val.txt")
    assert len(val) == 5 and len(train) == 15
    assert sorted(train + val) == [f"img{i:02d}" for i in range(20)]  # no_image, no_xml and strays left out
    assert train == sorted(train) and val == sorted(val)

    first = (main / "train.txt").read_bytes(), (main / "val.txt").read_bytes()
    assert split_data.main([str(voc), "--val-ratio", "0.25", "--seed", "3", "--force"]) == 0  # VOC<year> root
    assert ((main / "train.txt").read_bytes(), (main / "val.txt").read_bytes()) == first
    assert split_data.main([str(tmp_path), "--val-ratio", "0.25", "--seed", "4", "--force"]) == 0
    assert read_ids(main / "val.txt") != val and len(read_ids(main / "val.txt")) == 5

    dataset = VOCDataSet(tmp_path, txt_name="val.txt", classes_json=tmp_path / "classes.json")
    assert dataset.ids == read_ids(main / "val.txt")


def test_split_ids_keeps_both_sides_non_empty():
    assert split_data.split_ids(["b", "a"], 0.01, 0) in ((["a"], ["b"]), (["b"], ["a"]))
    assert split_data.split_ids(["b", "a", "c"], 0.99, 0)[0] != []
    assert split_data.split_ids([f"{i}" for i in range(10)], 0.2, 7) == split_data.split_ids(
        [f"{i}" for i in reversed(range(10))], 0.2, 7)  # the listing order does not matter


@pytest.mark.slow
def test_refuses_to_overwrite_without_force(voc, tmp_path):
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    (main / "val.txt").write_text("hand made\n")
    cmd = [sys.executable, str(ROOT / "tools" / "split_data.py"), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: refusing to overwrite {main / 'val.txt'}; pass --force to replace"
    assert (main / "val.txt").read_text() == "hand made\n" and not (main / "train.txt").exists()

    done = subprocess.run(cmd + ["--force"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"({len(read_ids(main / 'train.txt'))} ids)" in done.stdout
    assert len(read_ids(main / "train.txt")) == 16 and len(read_ids(main / "val.txt")) == 4


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert split_data.main([str(tmp_path), "--val-ratio", "1.5"]) == 1
    assert "--val-ratio must be between 0 and 1" in capsys.readouterr().err
    assert split_data.main([str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err
