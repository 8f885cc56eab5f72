"""Process-group setup and the few collective helpers the engine needs.

Works for plain single-process runs, torchrun (RANK / WORLD_SIZE / LOCAL_RANK) and SLURM
(SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID).
"""
import datetime
import os
from typing import Dict

import torch
import torch.distributed as dist


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
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        dist.barrier()
    return {"rank": rank, "world_size": world_size, "local_rank": local_rank}


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


def cleanup() -> None:
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
