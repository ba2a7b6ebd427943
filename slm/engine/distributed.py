"""Data-parallel training across processes started by torchrun: DDP, or FSDP behind a flag.

`torchrun --nproc_per_node=N -m slm train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; `setup` joins the
process group (NCCL on GPUs, gloo on CPU) and picks this rank's device. Rank 0 is the only
writer of checkpoints, metrics and console output. With one process nothing here does anything.

FSDP uses PyTorch's `fully_shard` (FSDP2): each unit the task names (e.g. transformer blocks) and
then the whole module are sharded, so weights, gradients and optimizer states are split across
ranks and gathered one unit at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from slm.errors import SlmError
from slm.runtime import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join torchrun's process group if there is one; choose this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, info: DistInfo, fsdp: bool = False, units: list[nn.Module] | None = None) -> nn.Module:
    """The module as training calls it: plain, DDP, or FSDP-sharded (in place)."""
    if fsdp:
        if not info.distributed:
            raise SlmError("--fsdp shards over processes: start with torchrun --nproc_per_node=N (N >= 2)")
        from torch.distributed.fsdp import fully_shard

        for unit in units or []:
            fully_shard(unit)
        fully_shard(module)
        return module
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return module


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj` on rank 0 (others get an empty list)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def broadcast_object(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
