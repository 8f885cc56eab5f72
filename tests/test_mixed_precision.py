"""Numerics under mixed precision and the GPU of each process (issue #17, the parts a CPU can check):
anchors and decoded boxes stay float32 under bf16/fp16, evaluation during --amp training is
float32, and one rule maps a local rank to its GPU."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_TRAIN_FLAGS
from network_files import AnchorsGenerator
from network_files.det_utils import BoxCoder
from network_files.image_list import ImageList
from train_utils.device import amp_dtype
from train_utils.engine.args import build_parser, parse
from train_utils.distributed import cuda_index

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_anchors_are_float32_whatever_the_feature_dtype(dtype):
    """An 800x1088 batch: bf16 anchors would be off by up to 7 px; ours equal the float32 ones."""
    images = ImageList(torch.zeros(1, 3, 800, 1088), [(800, 1088)])
    shapes = [(800 // s, 1088 // s) for s in (4, 8, 16, 32, 64)]
    generator = AnchorsGenerator(FPN_SIZES, ((0.5, 1.0, 2.0),) * 5)
    reference = generator(images, [torch.zeros(1, 256, h, w) for h, w in shapes])[0]
    half = generator(images, [torch.zeros(1, 256, h, w, dtype=dtype) for h, w in shapes])[0]
    assert half.dtype == torch.float32 and torch.equal(half, reference)
    if dtype == torch.bfloat16:  # what anchors in the feature dtype would cost (fp16 is exact up to 2048)
        strides = [(800 // h, 1088 // w) for h, w in shapes]
        narrow = torch.cat(generator.grid_anchors(shapes, strides, dtype, torch.device("cpu"))).float()
        assert (narrow - reference).abs().max().item() >= 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoding_widens_half_precision_offsets(dtype):
    """Proposals of a 1333 px image decoded from half-precision offsets: within 0.01 px of the
    float32 decode of the same offsets (the boxes are not narrowed to the offsets' dtype)."""
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(500, 2, generator=generator) * 1200
    boxes = torch.cat([corner, corner + 16 + torch.rand(500, 2, generator=generator) * 300], 1)
    codes = (torch.randn(500, 4, generator=generator) * 0.5).to(dtype)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    decoded = coder.decode(codes, [boxes])
    expected = coder.decode(codes.float(), [boxes])
    assert decoded.dtype == torch.float32
    assert (decoded - expected).abs().max().item() <= 0.01
    narrowed = coder.decode(codes.float(), [boxes.to(dtype).float()])  # what narrowing the boxes costs
    assert (narrowed - expected).abs().max().item() > 0.25


def test_one_rule_maps_a_local_rank_to_its_gpu(monkeypatch):
    """torchrun shows every GPU to every process; SLURM --gpus-per-task=1 shows one per task."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [cuda_index(r) for r in range(4)] == [0, 1, 2, 3]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [cuda_index(r) for r in range(4)] == [0, 0, 0, 0]  # SLURM_LOCALID=1..3 with one visible GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert cuda_index(2) == 0


@pytest.mark.slow
def test_evaluation_during_amp_training_is_float32(demo_voc, tmp_path):
    """--amp (bf16 on the CPU) trains in mixed precision, but the logged COCO numbers are the ones
    validation.py gives the saved weights in float32."""
    out = tmp_path / "amp"
    train = subprocess.run([sys.executable, str(ROOT / "train_mobilenet.py"), "--data-path", str(demo_voc),
                            "--classes-json", str(demo_voc / "classes.json"), "--output-dir", str(out),
                            "--epochs", "1", "--amp", *TINY_TRAIN_FLAGS],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["coco"]
    report = tmp_path / "record.txt"
    valid = subprocess.run([sys.executable, str(ROOT / "validation.py"), "--weights-path", str(out / "last.pth"),
                            "--workers", "0", "--output", str(report)], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert valid.returncode == 0, valid.stderr[-3000:]
    assert json.loads(report.with_suffix(".json").read_text())["coco_stats"] == pytest.approx(logged, abs=1e-12)


def test_amp_dtype_defaults_and_choice(monkeypatch):
    """--amp: bfloat16 on the CPU and on CUDA GPUs from Ampere on (compute capability 8.0),
    float16 (+ GradScaler) on older ones; --amp-dtype names another."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for capability, dtype in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert amp_dtype(cuda) == dtype, capability
    assert amp_dtype(cpu) == torch.bfloat16
    assert (amp_dtype(cuda, "bfloat16"), amp_dtype(cpu, "float16")) == (torch.bfloat16, torch.float16)
    parser = build_parser("t", {})
    assert parse(parser, ["--amp", "--amp-dtype", "bfloat16"]).amp_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parse(parser, ["--amp-dtype", "bfloat16"])  # needs --amp


@pytest.mark.slow
def test_float16_amp_trains_on_the_cpu(demo_voc, tmp_path):
    """--amp --amp-dtype float16 on the CPU: autocast in float16, no GradScaler (CUDA only), finite losses."""
    out = tmp_path / "fp16"
    done = subprocess.run([sys.executable, str(ROOT / "train_mobilenet.py"), "--data-path", str(demo_voc),
                           "--classes-json", str(demo_voc / "classes.json"), "--output-dir", str(out),
                           "--epochs", "1", "--amp", "--amp-dtype", "float16", *TINY_TRAIN_FLAGS],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["loss"]) and 0 < record["loss"] < 100
    assert torch.load(out / "last.pth", weights_only=True)["scaler"] is None


def test_device_cuda_n_becomes_the_current_gpu(monkeypatch):
    """--device cuda:1 on one process makes GPU 1 the current device (checked without a GPU)."""
    from train_utils.engine.trainer import Trainer

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    trainer = Trainer(parse(build_parser("t", {}), ["--device", "cuda:1"]))
    trainer.setup_device()
    assert trainer.device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert (trainer.rank, trainer.world_size, trainer.is_main) == (0, 1, True)
