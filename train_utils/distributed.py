"""Process-group setup and the few collective helpers the engine needs.

Works for plain single-process runs, torchrun (RANK / WORLD_SIZE / LOCAL_RANK) and SLURM
(SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID). Besides the training group (NCCL on GPUs) a gloo
"control" group carries the small CPU messages: agreeing on stops and checkpoints, gathering
random states, sending the resumed checkpoint to ranks that cannot read it.
"""
import datetime
import os
import pickle
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

_CONTROL_GROUP: Optional[Any] = None
_STORE: Optional[dist.Store] = None  # the rendezvous store of the process group (see _attempt_store)
# Words in the errors gloo and NCCL raise when a peer process died or stopped answering.
# (lower case; e.g. a hung peer gives "Timed out waiting ... for recv" or "Application timeout caused
# pair closure", a dead one "Connection reset by peer").
_PEER_FAILURE_MARKERS = ("connection reset by peer", "connection closed by peer", "timed out", "timeout",
                         "broken pipe", "pair closure", "nccl communicator was aborted",
                         "failed to pass monitoredbarrier", "connection refused")


class PeerFailure(RuntimeError):
    """Another rank died or stopped answering; the message says which and what to do."""


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def cuda_index(local_rank: int) -> int:
    """The GPU of a process, the one rule for every launcher: its local rank modulo the GPUs it
    sees. torchrun shows every GPU to every process (index = local rank); SLURM with
    ``--gpus-per-task=1`` shows one GPU per task (index 0 whatever SLURM_LOCALID is)."""
    return local_rank % max(torch.cuda.device_count(), 1)


def init_distributed_mode(device: str, timeout_minutes: float = 30.0) -> Dict[str, int]:
    """Join the process group described by the environment, if any.

    Returns ``{"rank", "world_size", "local_rank"}``. ``device`` ("cuda" or "cpu") selects the
    backend: NCCL for CUDA, gloo otherwise. A rank that dies or hangs makes collectives fail
    after ``timeout_minutes`` instead of blocking forever.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", rank % max(torch.cuda.device_count(), 1)))
        env.setdefault("RANK", str(rank))
        env.setdefault("WORLD_SIZE", str(world_size))
        env.setdefault("LOCAL_RANK", str(local_rank))
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            raise RuntimeError("under SLURM set MASTER_ADDR to the first node's host name before launching")
    else:
        return {"rank": 0, "world_size": 1, "local_rank": 0}

    if world_size > 1 and not is_dist_avail_and_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(cuda_index(local_rank))
            # Fail loudly on a stuck collective instead of hanging.
            env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend=backend, store=_attempt_store(rank, world_size, timeout),
                                world_size=world_size, rank=rank, timeout=timeout)
        global _CONTROL_GROUP
        _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
        dist.barrier(group=_CONTROL_GROUP)
    return {"rank": rank, "world_size": world_size, "local_rank": local_rank}


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store of ``env://`` with its keys under this launch attempt: after torchrun
    restarts a failed group (``--max-restarts``) the store lives on, and a rank reading the
    addresses the previous attempt published would fail to connect."""
    global _STORE
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    _STORE = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return _STORE


def reduce_dict(values: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """All-reduce a dict of scalar tensors (same keys on every rank); mean over ranks by default."""
    world_size = get_world_size()
    if world_size < 2:
        return values
    with torch.no_grad():
        names = sorted(values.keys())
        stacked = torch.stack([values[k].detach().float() for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size
        return dict(zip(names, stacked))


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step every
    rank holds its own statistics; evaluating with them would make each shard use a different
    model from the one rank 0 saves.
    """
    if get_world_size() < 2:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def agree_max(values: List[int]) -> List[int]:
    """The element-wise maximum of ``values`` over every rank (``values`` alone without a group)."""
    if get_world_size() < 2:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return tensor.tolist()


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), indexed by rank; ``[obj]`` without a group."""
    if get_world_size() < 2:
        return [obj]
    parts: List[Any] = [None] * get_world_size()
    dist.all_gather_object(parts, obj, group=_CONTROL_GROUP)
    return parts


def gather_to_rank0(obj: Any) -> Optional[List[Any]]:
    """Every rank's ``obj`` on rank 0 (indexed by rank), None on the others; ``[obj]`` alone."""
    if get_world_size() < 2:
        return [obj]
    parts: Optional[List[Any]] = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0, group=_CONTROL_GROUP)
    return parts


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (through the CPU group)."""
    if get_world_size() < 2:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=_CONTROL_GROUP)
    return box[0]


def share_newest(choice: Optional[Tuple[str, Any]], newness: Callable[[Any], Tuple], error: Optional[str] = None
                 ) -> Tuple[Optional[str], Any]:
    """Every rank's local ``choice`` = (path, what it read from path) or None -> the newest one
    (by ``newness(read)``; ties go to the lowest rank), on every rank. Ranks holding an equally
    new one keep their own, the others receive it from its rank, so output folders need not be
    shared between nodes. An ``error`` on any rank is raised on every rank (ValueError)."""
    if get_world_size() < 2:
        if error:
            raise ValueError(error)
        return choice if choice is not None else (None, None)
    mine = newness(choice[1]) if choice is not None else None
    reports = gather_objects((error, mine, choice[0] if choice else None))
    errors = [f"rank {rank}: {err}" for rank, (err, _, _) in enumerate(reports) if err]
    if errors:
        raise ValueError(errors[0])
    offers = [(key, -rank) for rank, (_, key, _) in enumerate(reports) if key is not None]
    if not offers:
        return None, None
    key, source = max(offers)[0], -max(offers)[1]
    keeps = mine == key
    if agree_max([int(not keeps)])[0]:
        sent = broadcast_object(choice[1] if get_rank() == source else None, src=source)
        return reports[source][2], (choice[1] if keeps else sent)
    return reports[source][2], choice[1]


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank died or hung."""
    return is_dist_avail_and_initialized() and (isinstance(exc, dist.DistError) or mentions_peer_failure(str(exc)))


def mentions_peer_failure(message: str) -> bool:
    """Whether a collective's error message says a peer died or stopped answering."""
    return any(marker in message.lower() for marker in _PEER_FAILURE_MARKERS)


def unresponsive_ranks(grace_seconds: float = 5.0) -> Optional[List[int]]:
    """After a failed collective: the ranks that do not check in within ``grace_seconds``
    (dead or hung), through the rendezvous store; None when the store itself is gone (it lives
    with rank 0, or with the launcher under torchrun)."""
    prefix = f"faster_rcnn/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    world_size, store = get_world_size(), _STORE
    if store is None:
        return None
    try:
        store.set(f"{prefix}{get_rank()}", "1")
        deadline = time.monotonic() + grace_seconds
        while True:
            missing = [r for r in range(world_size) if not store.check([f"{prefix}{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except (RuntimeError, pickle.PickleError, ValueError):
        return None


def describe_peer_failure(exc: BaseException) -> str:
    """One line for a rank that lost its peers: who stopped answering and what to do."""
    missing = unresponsive_ranks()
    if missing is None:
        who = "rank 0 (which holds the rendezvous) or the launcher is gone"
    elif missing:
        who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} stopped answering (died or hung)"
    else:
        who = "every rank is alive but a collective failed"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first_line = re.sub(r"^\[[^\]]*\]\s*", "", first_line).split(". ")[0]  # no source path, first sentence
    return (f"rank {get_rank()}: {who}; look at that rank's log, then restart with --resume auto "
            f"(collective error: {first_line[:200]})")


def cleanup(failed: bool = False) -> None:
    """Leave the process group; after a peer failure only the local state is dropped (a
    collective shutdown could wait on the dead rank)."""
    global _CONTROL_GROUP, _STORE
    if is_dist_avail_and_initialized() and not failed:
        dist.destroy_process_group()
    _CONTROL_GROUP, _STORE = None, None
