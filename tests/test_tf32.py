"""The TF32 policy (train_utils.device): evaluation in full float32 unless asked, training on
PyTorch's defaults unless --tf32 says otherwise; the backend flags are read inside the passes and
are back as they were afterwards. (The switches exist on CPU-only builds too; what they change on
a GPU is checked by tests/test_cuda.py.)"""
from typing import Dict, List

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import TINY_TRAIN_FLAGS
from train_utils.data.dataset import DetectionDataSet
from train_utils.device import tf32_flags, tf32_mode
from train_utils.evaluation import loop as eval_loop
from train_utils.evaluation.coco_api import get_coco_api_from_dataset

ALL_ON, ALL_OFF = {"cudnn": True, "matmul": True}, {"cudnn": False, "matmul": False}


@pytest.fixture
def restore_tf32():
    """Whatever a test sets, the next test starts from the flags as they were."""
    saved = tf32_flags()
    yield
    torch.backends.cudnn.allow_tf32 = saved["cudnn"]
    torch.backends.cuda.matmul.allow_tf32 = saved["matmul"]


def set_flags(flags: Dict[str, bool]) -> None:
    torch.backends.cudnn.allow_tf32 = flags["cudnn"]
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul"]


class FlagSpy(nn.Module):
    """A detector that finds nothing and records the TF32 flags at each forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[Dict[str, bool]] = []

    def forward(self, images):
        self.seen.append(tf32_flags())
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                for _ in images]


@pytest.fixture(scope="module")
def val_loader(demo_voc):
    from train_utils.data.transforms import get_transforms
    from train_utils.data.voc import VOCDataSet

    dataset = VOCDataSet(demo_voc, transforms=get_transforms(False), txt_name="val.txt",
                         classes_json=str(demo_voc / "classes.json"))
    return DataLoader(dataset, batch_size=2, collate_fn=DetectionDataSet.collate_fn)


@pytest.mark.parametrize("before, tf32, inside", [(ALL_ON, False, ALL_OFF), (ALL_OFF, True, ALL_ON),
                                                  ({"cudnn": True, "matmul": False}, False, ALL_OFF)])
def test_evaluation_switches_tf32_and_restores_the_flags(before, tf32, inside, val_loader, restore_tf32):
    set_flags(before)
    spy = FlagSpy()
    evaluator = eval_loop.evaluate(spy, val_loader, torch.device("cpu"),
                                   get_coco_api_from_dataset(val_loader.dataset), tf32=tf32)
    assert spy.seen == [inside] * len(val_loader)  # 5 images in batches of 2: 3 passes
    assert len(spy.seen) == 3 and tf32_flags() == before
    assert evaluator.stats[1] == 0.0  # nothing found: AP@0.5 is 0 (scored as usual)


def test_evaluation_defaults_to_tf32_off(val_loader, restore_tf32):
    """The library default (what validation.py and the epoch-end evaluation use unless asked)."""
    set_flags(ALL_ON)
    spy = FlagSpy()
    eval_loop.evaluate(spy, val_loader, torch.device("cpu"), get_coco_api_from_dataset(val_loader.dataset))
    assert spy.seen and all(flags == ALL_OFF for flags in spy.seen)
    assert tf32_flags() == ALL_ON


def test_tf32_mode_restores_after_an_error_and_leaves_none_alone(restore_tf32):
    set_flags({"cudnn": True, "matmul": False})
    with pytest.raises(RuntimeError, match="boom"):
        with tf32_mode(True):
            assert tf32_flags() == ALL_ON
            raise RuntimeError("boom")
    assert tf32_flags() == {"cudnn": True, "matmul": False}
    with tf32_mode(None):
        assert tf32_flags() == {"cudnn": True, "matmul": False}
    with tf32_mode(False):
        with tf32_mode(True):
            assert tf32_flags() == ALL_ON
        assert tf32_flags() == ALL_OFF
    assert tf32_flags() == {"cudnn": True, "matmul": False}


@pytest.mark.slow
@pytest.mark.parametrize("flags, training, evaluation", [
    ([], {"cudnn": True, "matmul": False}, ALL_OFF),           # PyTorch's default while training
    (["--tf32", "off", "--eval-tf32"], ALL_OFF, ALL_ON),
    (["--tf32", "on"], ALL_ON, ALL_OFF),
])
def test_training_flags_set_tf32_for_the_steps_and_the_evaluation(flags, training, evaluation, demo_voc, tmp_path,
                                                                  monkeypatch, restore_tf32):
    """The flags as seen where each batch moves to the device: in the training steps and in the
    epoch-end evaluation; after the run the process has its flags back."""
    from train_utils.device import move_to_device
    from train_utils.engine import loop as train_loop
    from train_utils.engine.args import parse_training_args
    from train_utils.engine.trainer import Trainer

    seen: Dict[str, list] = {"train": [], "eval": []}

    def spy(kind: str):
        def moved(images, targets, device):
            seen[kind].append(tf32_flags())
            return move_to_device(images, targets, device)
        return moved

    monkeypatch.setattr(train_loop, "move_to_device", spy("train"))
    monkeypatch.setattr(eval_loop, "move_to_device", spy("eval"))
    set_flags({"cudnn": True, "matmul": False})
    args = parse_training_args("test", {"backbone": "mobilenet_v2"}, argv=[
        "--data-path", str(demo_voc), "--classes-json", str(demo_voc / "classes.json"), "--output-dir", str(tmp_path),
        "--epochs", "1", *TINY_TRAIN_FLAGS, "--rpn-post-nms-top-n-test", "10", *flags])
    Trainer(args).train()
    assert seen["train"] == [training] * 4  # 19 images, batch 4 (the last, partial one dropped)
    assert seen["eval"] == [evaluation] * 5  # 5 images, batch 1
    assert tf32_flags() == {"cudnn": True, "matmul": False}
