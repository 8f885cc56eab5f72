"""tools/bench_cuda.py (``tools/benchmark.py --device cuda``) run on the CPU: the same timing,
FLOP counting, table and JSON code as on a GPU, with tiny detectors in place of the real ones."""
import json
import subprocess
import sys

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator

from conftest import ROOT, TinyBackbone
from tools import bench_cuda


def tiny_pair(tiny_detector, arch: str):
    """(ours, torchvision's) tiny detectors with the same weights; "mbv2" fails, as a broken case would."""
    if arch == "mbv2":
        raise RuntimeError("no such model here")
    torch.manual_seed(0)
    options = dict(num_classes=21, min_size=64, max_size=96, rpn_batch_size_per_image=32, box_batch_size_per_image=32)
    theirs = TVFasterRCNN(TinyBackbone(), rpn_anchor_generator=TVAnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
                          box_roi_pool=torchvision.ops.MultiScaleRoIAlign(["0"], 7, 2), **options)
    ours = tiny_detector(**options)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def test_cpu_run_prints_rows_writes_json_and_survives_a_failed_case(tiny_detector, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_cuda, "build_pair", lambda arch: tiny_pair(tiny_detector, arch))
    out = tmp_path / "bench.json"
    status = bench_cuda.main(["--device", "cpu", "--tiny", "--quick", "--json", str(out),
                              "--cases", "train_r50_b2_bf16", "infer_mbv2_b1_fp32", "infer_r50_b1_fp32"])
    assert status == 1  # the mbv2 case failed
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("device CPU") and "bf16 matmul peak" in lines[0]
    assert lines[1] == bench_cuda.TABLE_HEADER.splitlines()[0]
    assert lines[3].startswith("| train_r50_b2_bf16 | ")
    assert lines[4] == "| infer_mbv2_b1_fp32 | error: RuntimeError: no such model here |"
    assert lines[5].startswith("| infer_r50_b1_fp32 | ") and len(lines) == 6

    records = json.loads(out.read_text())
    assert [r["case"] for r in records] == ["train_r50_b2_bf16", "infer_mbv2_b1_fp32", "infer_r50_b1_fp32"]
    assert records[1]["error"] == "RuntimeError: no such model here"
    for record, batch in ((records[0], 2), (records[2], 1)):
        assert record["batch"] == batch and record["ours_s"] > 0 and record["torchvision_s"] > 0
        assert record["ratio"] == pytest.approx(record["ours_s"] / record["torchvision_s"], rel=1e-12)
        assert record["peak_fraction"] == pytest.approx(
            record["flops"] / record["ours_s"] / record["peak_flops"], rel=1e-12)

    # The FLOPs are torchvision's model's, counted independently here: inference of one image.
    _, theirs = tiny_pair(tiny_detector, "r50")
    images, _ = bench_cuda.case_inputs(bench_cuda.Case.parse("infer_r50_b1_fp32"), bench_cuda.TINY_SIZE,
                                       torch.device("cpu"))
    theirs.transform.min_size, theirs.transform.max_size = (64,), 96
    theirs.rpn._pre_nms_top_n, theirs.rpn._post_nms_top_n = {"testing": 100}, {"testing": 50}
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        theirs.eval()(images)
    assert records[2]["flops"] == counter.get_total_flops() > 0
    assert records[0]["flops"] > 2 * records[2]["flops"]  # training: two images, forward and backward


def test_case_names_are_checked():
    assert bench_cuda.Case.parse("train_mbv2_b8_fp16") == bench_cuda.Case("train", "mbv2", 8, "fp16")
    for bad in ("train_r50_b8", "train_r18_b8_bf16", "infer_r50_b0_fp32", "train_r50_b2_fp64"):
        with pytest.raises(ValueError, match="case"):
            bench_cuda.Case.parse(bad)
    assert len(set(bench_cuda.FULL_CASES)) == len(bench_cuda.FULL_CASES)
    assert set(bench_cuda.QUICK_CASES) <= set(bench_cuda.FULL_CASES)
    for name in bench_cuda.FULL_CASES:
        assert bench_cuda.Case.parse(name).name == name


def test_benchmark_py_hands_device_runs_to_bench_cuda():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--device", "cpu",
                           "--cases", "train_r50_b8_fp64"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "tools/benchmark.py: error: case 'train_r50_b8_fp64': expected" in done.stderr
