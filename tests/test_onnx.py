"""ONNX export (train_utils/inference/onnx_export.py, tools/export_onnx.py, predict.py --onnx): the exported
ResNet50-FPN and MobileNetV2 detectors agree with PyTorch in onnxruntime on image sizes other
than the traced one; traced size arithmetic equals the eager one; files and errors."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import predict
from backbone import FrozenBatchNorm2d
from backbone.mobilenetv2_model import InvertedResidual
from backbone.resnet50_fpn_model import Bottleneck
from network_files.ops import fast_path
from network_files.ops.tracing import size_tensor
from network_files.transform import GeneralizedRCNNTransform
from tools import export_onnx as export_tool
from train_utils.checkpoint import read_checkpoint
from train_utils.model.builder import build_model
from train_utils.inference.onnx_export import (
    BOX_RTOL, OnnxDetector, export_metadata, export_onnx, match_detections,
)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZES = [(375, 500), (600, 413)]  # neither is the traced (480, 640), one portrait


def calibrate_norms(model: nn.Module, images: list) -> None:
    """Set every (frozen) BatchNorm's statistics to those of its input on ``images``, layer by
    layer in one pass, so activations keep unit scale as in a trained network."""

    def set_statistics(norm: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach()
        norm.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        norm.running_var.copy_(x.var(dim=(0, 2, 3)))

    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    hooks = [norm.register_forward_pre_hook(set_statistics) for norm in norms]
    with torch.no_grad(), fast_path.reference_mode():
        image_list, _ = model.transform(images)
        model.backbone(image_list.tensors)
    for hook in hooks:
        hook.remove()


def random_detector(backbone: str, **config) -> nn.Module:
    """A randomly initialised detector conditioned like a trained one, so that float rounding
    stays rounding: calibrated norms, residual branches scaled down (as zero-init-residual
    training starts), and objectness and class logits spread apart (torchvision's 0.01-std
    initialisation makes them all tie). Without this, rounding alone (folded versus unfolded
    BatchNorm, in PyTorch) reorders near-tied proposals and moves boxes by 1e-2."""
    torch.manual_seed(0)
    model = build_model({"backbone": backbone, "num_classes": 6, **config}).eval()
    calibrate_norms(model, [export_tool.smooth_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)])
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, InvertedResidual) and block.use_shortcut:
                block.conv[-1].weight.mul_(0.1)
            elif isinstance(block, Bottleneck):
                block.bn3.weight.mul_(0.1)
        model.rpn.head.cls_logits.weight.mul_(10)
        model.roi_heads.box_predictor.cls_score.weight.mul_(10)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("backbone, config", [
    ("resnet50_fpn", {"min_size": 512, "max_size": 853}),
    ("mobilenet_v2", {}),
])
def test_onnx_detections_match_pytorch_on_other_image_sizes(tmp_path, backbone, config):
    model = random_detector(backbone, **config)
    path = tmp_path / f"{backbone}.onnx"
    export_onnx(model, path, export_metadata(model, [f"c{i}" for i in range(1, 6)], backbone))

    graph = onnx.load(str(path)).graph
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == ["height", "width"]

    runtime = OnnxDetector(path)
    for seed, (height, width) in enumerate(SIZES):
        image = export_tool.smooth_image(height, width, seed + 10)
        with torch.no_grad():
            expected = model([image])[0]
        actual = runtime(image)
        assert len(expected["scores"]) >= 10, "too few detections for a meaningful comparison"
        box_error, score_error = match_detections(expected, actual)
        assert box_error <= BOX_RTOL
        assert score_error <= 1e-4
        assert sorted(actual["labels"].tolist()) == sorted(expected["labels"].tolist())
        assert actual["boxes"].dtype == torch.float32 and actual["labels"].dtype == torch.int64
        # Boxes are in the input image's pixels.
        assert float(actual["boxes"][:, 2].max()) <= width and float(actual["boxes"][:, 3].max()) <= height


class _TransformOutputs(nn.Module):
    """The batch and the resized sizes ``[B, 2]`` the transform produces for two images."""

    def __init__(self, transform: nn.Module) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, a: torch.Tensor, b: torch.Tensor):
        image_list, _ = self.transform([a, b])
        sizes = [torch.stack([size_tensor(side, torch.int64, a.device) for side in s]) for s in image_list.image_sizes]
        return image_list.tensors, torch.stack(sizes)


@pytest.mark.parametrize("min_size, max_size", [(192, 192), (800, 1333)])
def test_traced_resize_and_padding_equal_eager_for_new_sizes(min_size, max_size):
    """Output sizes computed in float32 would give 191 instead of 192 for a 600-pixel side."""
    transform = GeneralizedRCNNTransform(min_size, max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    module = _TransformOutputs(transform)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (torch.rand(3, 480, 640), torch.rand(3, 300, 200)), check_trace=False)
    for (h1, w1), (h2, w2) in [((600, 413), (375, 500)), ((333, 1000), (1001, 77)), ((64, 64), (97, 131))]:
        a, b = torch.rand(3, h1, w1), torch.rand(3, h2, w2)
        expected_batch, expected_sizes = module(a, b)
        batch, sizes = traced(a, b)
        assert torch.equal(sizes, expected_sizes)
        assert batch.shape == expected_batch.shape
        torch.testing.assert_close(batch, expected_batch, rtol=0, atol=1e-5)


def test_export_tool_and_predict_onnx_give_the_checkpoint_detections(trained_run, demo_voc, tmp_path, capsys):
    weights = trained_run / "best.pth"
    output = tmp_path / "exported" / "model.onnx"
    assert export_tool.main(["--weights", str(weights), "--output", str(output), "--score-thresh", "0.01"]) == 0  # the earlier name of --box-score-thresh
    printed = capsys.readouterr().out
    assert printed.count(": ok") == 2, printed

    checkpoint = read_checkpoint(str(weights))
    metadata = dict(OnnxDetector(output).metadata)
    assert json.loads(metadata["class_names"]) == checkpoint.class_names
    assert metadata["score_thresh"] == "0.01" and metadata["backbone"] == "mobilenet_v2"
    assert not [p for p in output.parent.iterdir() if p.name != "model.onnx"]  # no temporary left

    images = sorted((demo_voc / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))[:4]
    video = tmp_path / "clip.mkv"
    write_frames(video, [np.asarray(Image.open(image).convert("RGB")) for image in images])
    results, frames = {}, {}
    for flag, source in (("--onnx", output), ("--weights", weights)):
        out = tmp_path / flag.strip("-")
        args = [flag, str(source), "--output-dir", str(out), "--score-thresh", "0.05", "--workers", "1",
                "--batch-size", "2", *map(str, images), str(video), "--save-json"]
        assert predict.main(args) == 0
        results[flag] = json.loads((out / "predictions.json").read_text())
        frames[flag] = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    # The ONNX graph takes one image per call: videos run frame by frame and give the same detections.
    assert sum(len(f["detections"]) for f in frames["--onnx"]) > 0
    for mine, theirs in zip(frames["--onnx"], frames["--weights"], strict=True):
        box_error, score_error = match_detections(*(as_tensors(f["detections"]) for f in (theirs, mine)))
        assert box_error < BOX_RTOL and score_error < 1e-4
    assert results["--onnx"], "the trained model should detect something on its own data"
    assert len(results["--onnx"]) == len(results["--weights"])
    # Pair each ONNX detection with a PyTorch one of the same image and class, score and box; the
    # order may differ where a weak model scores several boxes alike (a tie within float rounding).
    unmatched = list(results["--weights"])
    for ours in results["--onnx"]:
        twin = next((theirs for theirs in unmatched
                     if ours["image"] == theirs["image"] and ours["category_name"] == theirs["category_name"]
                     and ours["score"] == pytest.approx(theirs["score"], abs=1e-4)
                     and ours["bbox"] == pytest.approx(theirs["bbox"], rel=BOX_RTOL, abs=1e-2)), None)
        assert twin is not None, f"no PyTorch detection matches the ONNX one {ours}"
        unmatched.remove(twin)


def as_tensors(detections: list) -> dict:
    """JSON-lines detections of one frame as a detections dict."""
    return {"boxes": torch.tensor([d["box"] for d in detections], dtype=torch.float64).reshape(-1, 4),
            "labels": torch.tensor([d["class_id"] for d in detections], dtype=torch.int64),
            "scores": torch.tensor([d["score"] for d in detections], dtype=torch.float64)}


def write_frames(path, frames) -> None:
    """A lossless (H.264 4:4:4, qp 0) video of the uint8 [H, W, 3] frames."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5, options={"qp": "0"})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv444p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_onnx_errors_name_the_file(tmp_path, capsys):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxDetector(missing)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.onnx"):
        OnnxDetector(garbage)

    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    assert predict.main(["--onnx", str(garbage), str(image), "--output-dir", str(tmp_path / "o")]) == 1
    assert predict.main(["--onnx", str(garbage), "--min-size", "300", str(image)]) == 1
    assert predict.main(["--onnx", str(garbage), "--backbone", "vgg16", str(image)]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "garbage.onnx" in err and "fixed at export" in err and "--backbone" in err
    assert "Traceback" not in err

    # Not our export: a model with other input/output names.
    other = tmp_path / "other.onnx"
    torch.onnx.export(nn.Conv2d(3, 2, 1).eval(), (torch.rand(1, 3, 4, 4),), str(other), dynamo=False)
    with pytest.raises(ValueError, match="export it with tools/export_onnx.py"):
        OnnxDetector(other)


def test_export_tool_reports_a_missing_weights_file_and_an_unwritable_output(trained_run, tmp_path, capsys):
    assert export_tool.main(["--weights", str(tmp_path / "none.pth")]) == 1
    assert "none.pth" in capsys.readouterr().err
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert export_tool.main(["--weights", str(trained_run / "best.pth"), "--output", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a_folder" in err and "Traceback" not in err
    assert list(folder.iterdir()) == []  # no temporary left behind


def test_match_detections_pairs_tied_detections_and_reports_differences():
    expected = {"boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]]),
                "labels": torch.tensor([1, 2, 1]), "scores": torch.tensor([0.5, 0.5, 0.3])}
    swapped = {k: v[[1, 0, 2]].clone() for k, v in expected.items()}
    swapped["boxes"][0, 2] += 0.02  # 20 -> 20.02: relative 1e-3
    swapped["scores"][2] += 1e-5
    box_error, score_error = match_detections(expected, swapped)
    assert box_error == pytest.approx(1e-3, rel=1e-3)
    assert score_error == pytest.approx(1e-5, rel=1e-2)
    with pytest.raises(AssertionError, match="2 detections instead of 3"):
        match_detections(expected, {k: v[:2] for k, v in expected.items()})
    relabelled = {k: v.clone() for k, v in expected.items()}
    relabelled["labels"][1] = 1
    with pytest.raises(AssertionError, match="label 1 has no counterpart"):
        match_detections(expected, relabelled)


def test_save_json_never_overwrites_an_input_image(tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 32), "red").save(image)
    before = image.read_bytes()
    # "--save-json photo.jpg" would take the image as the JSON path.
    assert predict.main(["--weights", str(tmp_path / "w.pth"), "--save-json", str(image), str(image)]) == 1
    assert image.read_bytes() == before
    assert "--save-json" in capsys.readouterr().err
