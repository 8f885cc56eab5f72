"""Export a detector to ONNX, and run exported files with onnxruntime.

The exported graph takes one image ``[3, H, W]`` float32 in [0, 1] of any size and returns
``boxes [D, 4]`` (x1, y1, x2, y2 in input pixels), ``labels [D]`` int64 and ``scores [D]``
float32, best first. Normalisation, resizing, the RPN, the box head and NMS are all inside, so a
runtime needs nothing else. The class names and the settings fixed at export (input sizes, score
threshold) are stored in the file's metadata.

Exporting needs the ``onnx`` package and running needs ``onnxruntime`` (``pip install onnx
onnxruntime``); neither is needed for training.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from network_files import FasterRCNN

from train_utils.checkpoint import temporary_path

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "labels", "scores")
# Relative box tolerance of the export check (and of the parity tests).
BOX_RTOL = 1e-3


def _require(module: str, purpose: str):
    """Import ``module`` or raise ImportError with the pip command that installs it."""
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"{purpose} needs the '{module}' package: pip install {module}") from exc


class SingleImageDetector(nn.Module):
    """The exported signature: ``image [3, H, W] -> (boxes [D, 4], labels [D], scores [D])``."""

    def __init__(self, detector: FasterRCNN) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        detections = self.detector([image])[0]
        return detections["boxes"], detections["labels"], detections["scores"]


def export_metadata(model: FasterRCNN, class_names: Sequence[str], backbone: str) -> dict[str, str]:
    """What a runtime needs besides the graph, as ONNX metadata strings."""
    transform = model.transform
    return {
        "class_names": json.dumps(list(class_names)),
        "backbone": backbone,
        "min_size": str(transform.min_size[-1]),
        "max_size": str(transform.max_size),
        "score_thresh": str(model.roi_heads.score_thresh),
        "detections_per_img": str(model.roi_heads.detections_per_img),
    }


def export_onnx(
    model: FasterRCNN,
    path: str | os.PathLike,
    metadata: dict[str, str],
    example_size: tuple[int, int] = (480, 640),
    opset: int = OPSET,
) -> None:
    """Trace ``model`` (eval mode, on the CPU) on a random ``example_size (H, W)`` image and write
    the ONNX file atomically, with ``metadata`` attached. The image size stays dynamic."""
    if model.roi_heads.nms_method != "hard":  # a trace would fix its data-dependent loop count
        raise ValueError(f"--box-nms {model.roi_heads.nms_method} cannot be exported to ONNX; export with "
                         "--box-nms hard")
    onnx = _require("onnx", "ONNX export")
    wrapper = SingleImageDetector(model).eval()
    example = torch.rand((3, *example_size), generator=torch.Generator().manual_seed(0))
    path = Path(path)
    with temporary_path(path) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about every Python value derived from a tensor; the ones left in
            # the model are constant for a given architecture (e.g. pyramid scales, the batch of
            # one image), and the export is checked against PyTorch on other sizes.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # Deprecation notices of the TorchScript-based exporter (used on purpose: torch.export
            # fails on the data-dependent sizes after thresholds and NMS), and
            # a caution about negative indices, which the detector never uses.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            torch.onnx.export(
                wrapper, (example,), str(tmp), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {1: "height", 2: "width"}, **{name: {0: "detections"} for name in OUTPUT_NAMES}},
            )
        graph = onnx.load(str(tmp))
        for key, value in metadata.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(graph, str(tmp))


class OnnxDetector:
    """An exported detector run by onnxruntime, called like the PyTorch model on one image.

    path: the ``.onnx`` file. device: ``"cpu"``, or ``"auto"``/``"cuda"``/``"cuda:N"`` to use
    onnxruntime's CUDA provider (on GPU N) when it is installed. Raises ValueError when the file is
    not such an export.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        ort = _require("onnxruntime", "running an ONNX model")
        path = str(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such ONNX file")
        providers: list = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            gpu = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu}))
        try:
            self.session = ort.InferenceSession(path, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from exc
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
            raise ValueError(f"{path}: expected input {INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}, "
                             f"got {inputs} and {outputs}; export it with tools/export_onnx.py")
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        names = self.metadata.get("class_names")
        self.class_names: Optional[list[str]] = json.loads(names) if names else None
        self.score_thresh = float(self.metadata.get("score_thresh", 0.0))

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        """``image [3, H, W]`` float in [0, 1] -> ``{"boxes", "labels", "scores"}`` CPU tensors."""
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        try:
            boxes, labels, scores = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array})
        except Exception as exc:  # onnxruntime's own exception types
            raise ValueError(f"onnxruntime failed on a {list(image.shape)} image: {str(exc).splitlines()[0]}") from exc
        return {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels), "scores": torch.from_numpy(scores)}


def match_detections(expected: dict[str, Tensor], actual: dict[str, Tensor]) -> tuple[float, float]:
    """Compare two detection sets that may order near-tied scores differently.

    Each detection of ``actual`` is paired with the unused detection of ``expected`` with the same
    label whose box is closest. Returns (largest relative box difference, largest score
    difference), relative to ``max(|coordinate|, 1)``. Raises AssertionError when the counts
    differ or a label has no partner.
    """
    if len(expected["scores"]) != len(actual["scores"]):
        raise AssertionError(f"{len(actual['scores'])} detections instead of {len(expected['scores'])}")
    exp_boxes, exp_labels, exp_scores = (expected[k].double().numpy() for k in OUTPUT_NAMES)
    used = np.zeros(len(exp_scores), dtype=bool)
    worst_box = worst_score = 0.0
    for box, label, score in zip(*(actual[k].double().numpy() for k in OUTPUT_NAMES)):
        candidates = np.where((exp_labels == label) & ~used)[0]
        if candidates.size == 0:
            raise AssertionError(f"a detection of label {int(label)} has no counterpart")
        errors = (np.abs(exp_boxes[candidates] - box) / np.maximum(np.abs(exp_boxes[candidates]), 1.0)).max(axis=1)
        best = candidates[int(errors.argmin())]
        used[best] = True
        worst_box = max(worst_box, float(errors.min()))
        worst_score = max(worst_score, abs(float(exp_scores[best]) - float(score)))
    return worst_box, worst_score
