"""Held-out loss: the mean loss over the target tokens of a finite stream of batches.

What training evaluates with (val and test splits), and what `slm eval` and `slm bench` measure
perplexity with. Under torchrun every rank evaluates its shard and the sums are reduced;
ranks stop together at the shortest shard, so sharded (FSDP) forwards stay in step.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import torch
import torch.nn as nn

from slm.engine import distributed as D
from slm.engine.losses import IGNORE_INDEX
from slm.runtime import autocast


class Batches(Protocol):
    """What evaluation reads: batches (tuples of tensors, input ids first, targets last), and a
    way to stop the source's background loader once done with it."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]: ...

    def close(self) -> None: ...


def count_targets(batch) -> int:
    return int((batch[-1] != IGNORE_INDEX).sum())


def evaluate_loss(module: nn.Module, batches: Batches, max_batches: int | None, device: torch.device,
                  dtype: torch.dtype, info: D.DistInfo | None = None, max_targets: int | None = None
                  ) -> tuple[float, int]:
    """Mean loss over the target tokens of the first `max_batches` batches (all ranks together).
    Ranks stop together at the shortest shard, so sharded (FSDP) forwards stay in step."""
    info = info or D.DistInfo(device=device)
    was_training = module.training
    module.eval()
    total = torch.zeros(2, dtype=torch.float64)  # loss sum, targets
    it = iter(batches)
    n = 0
    with torch.no_grad(), autocast(device, dtype), contextlib.closing(batches):
        while max_batches is None or n < max_batches:
            batch = next(it, None)
            if max_targets is not None and batch is not None:
                batch = _trim_targets(batch, max_targets - int(total[1]))
            have = torch.tensor([0.0 if batch is None else 1.0])
            if info.distributed:  # everyone stops when any rank runs out
                torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MIN)
            if have.item() == 0:
                break
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            targets = count_targets(batch)
            total += torch.tensor([module(*batch).double().item() * targets, targets], dtype=torch.float64)
            n += 1
            if max_targets is not None and total[1] >= max_targets:
                break
    module.train(was_training)
    D.all_reduce_sum(total, info)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan"), int(total[1])


def _trim_targets(batch, budget: int):
    """Mask targets past a token budget (None when nothing is left), so exactly `budget` count."""
    if budget <= 0:
        return None
    valid = batch[-1] != IGNORE_INDEX
    over = valid & (valid.flatten().cumsum(0).view_as(valid) > budget)
    if not over.any():
        return batch
    rows = int(valid.sum(dim=1).cumsum(0).lt(budget).sum()) + 1  # rows holding the budget's tokens
    targets = batch[-1].masked_fill(over, IGNORE_INDEX)
    return tuple(t[:rows] for t in (*batch[:-1], targets))


