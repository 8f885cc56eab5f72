"""``--compile``: ``torch.compile`` of the detector's parts whose work is a fixed network over
the padded batch, never of the whole detector.

Compiled: the backbone (body + FPN: the padded batch ``[B, 3, H, W]`` -> its feature maps), the RPN
head (per level ``[B, C, H_l, W_l]`` -> objectness and box offsets) and the box head with the box
predictor (``[R, C, P, P]`` -> ``[R, K]``, ``[R, 4K]``). Anchors, proposal selection, matching,
sampling, RoI pooling, the losses and the post-processing stay eager: their shapes follow the data.

Each part's ``forward`` (and the two-layer head's ``after_fc6``, which training calls after the
fused pooling + fc6) is replaced on the instance by its compiled version, so the module tree and
the state-dict keys stay as they are (an ``OptimizedModule`` wrapper would prefix them with
``_orig_mod.``): a checkpoint of a compiled model loads into an eager one and back. What is
compiled is always the class's method bound to the part itself, and :func:`drop_compiled` takes the
overrides off again: a deep copy (``--ema``'s average) would otherwise keep calling the original
model's compiled forwards, with the original's weights.
"""
from typing import Dict, Tuple

import torch
from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Shapes: the first call of a part compiles for its exact input shapes; the first call with other
# shapes (another padded size, another proposal count) recompiles once with those dimensions
# symbolic (torch's automatic dynamic shapes, ``dynamic=None``), and later sizes reuse that graph.
# Training and evaluation, autograd on or off, autocast and the memory layout each add an entry
# of their own, so one run stays well under this many compiled entries per forward; past it a
# part runs eager (torch warns once) rather than compiling without end.
RECOMPILE_LIMIT = 16
COMPILED_METHODS = ("forward", "after_fc6")  # after_fc6: the two-layer box head's only


def static_parts(model: nn.Module) -> Dict[str, nn.Module]:
    """The parts :func:`compile_static_parts` compiles, by their names in the state dict."""
    return {"backbone": model.backbone, "rpn.head": model.rpn.head,
            "roi_heads.box_head": model.roi_heads.box_head, "roi_heads.box_predictor": model.roi_heads.box_predictor}


def compile_static_parts(model: nn.Module, mode: str = "default") -> nn.Module:
    """``model`` (a FasterRCNN) with the forward of each of :func:`static_parts` compiled by
    ``torch.compile`` in ``mode`` (one of ``COMPILE_MODES``); state-dict keys unchanged."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile: mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for part in static_parts(model).values():
        for method in compiled_methods(part):
            eager = getattr(type(part), method).__get__(part)  # this part's own, never a copied override
            setattr(part, method, torch.compile(eager, mode=mode, dynamic=None))
    return model


def compiled_methods(part: nn.Module) -> Tuple[str, ...]:
    """The methods of ``part`` that :func:`compile_static_parts` replaces on the instance."""
    return COMPILED_METHODS if hasattr(part, "after_fc6") else COMPILED_METHODS[:1]


def drop_compiled(model: nn.Module) -> nn.Module:
    """``model`` (any module) with the per-instance compiled methods of :func:`compile_static_parts`
    removed: every submodule runs its class's eager method, on its own weights (for a deep copy)."""
    for module in model.modules():
        for method in COMPILED_METHODS:
            module.__dict__.pop(method, None)
    return model
