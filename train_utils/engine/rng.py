"""Every random state a training process draws from, as plain values a checkpoint can hold.

A state is ``{"python": [...], "numpy": {...}, "torch": ByteTensor, "cuda": [ByteTensor]}``:
``cuda`` holds the generator of the process's own GPU (one process per GPU; the others are not
touched, which would create a CUDA context on every GPU), empty when the process has not used CUDA; tensors, lists, ints and floats only, so checkpoints stay loadable
with ``torch.load(..., weights_only=True)``. Each rank has its own state (the RPN and RoI samplers
draw from it); a checkpoint holds the list of all ranks' states.

Data augmentation does not draw from these: it is seeded per image (see
:class:`train_utils.data.samplers.SeededSamples`), so it repeats whatever the worker count.
"""
import random
from typing import Any, Dict, List

import numpy as np
import torch

RngState = Dict[str, Any]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (torch's seeds every GPU too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture() -> RngState:
    """This process's random states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }


def restore(state: RngState) -> None:
    """Set this process's random states to ``state`` (from :func:`capture`); the CUDA state goes
    to the current GPU."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[0])


def from_stored(stored: Any) -> List[RngState]:
    """A checkpoint's ``rng_state`` as a list of per-rank states: format 3 stores that list,
    formats 1-2 torch's CPU state alone (the other generators are then left as they are)."""
    if stored is None:
        return []
    if isinstance(stored, torch.Tensor):
        return [{"torch": stored}]
    return list(stored)


def restore_rank(states: List[RngState], rank: int) -> bool:
    """Restore ``states[rank]``; False (nothing restored) when the checkpoint has no state for this
    rank, e.g. after a change of world size."""
    if rank >= len(states):
        return False
    state = states[rank]
    if set(state) == {"torch"}:
        torch.set_rng_state(state["torch"])
    else:
        restore(state)
    return True
