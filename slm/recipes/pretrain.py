"""Pretraining recipe: slm's GPT on a token stream, run by the engine.

`train(run, out, resume)` is what `slm train` does: check the data source and the memory plan,
then let the engine's run lifecycle (lock, resolved config, resume, checkpoints, summary) train
the GPT task (engine/gpt.py) on the streaming data pipeline.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from slm.data import TokenStream, check_source
from slm.engine import distributed as D
from slm.engine.gpt import gpt_task
from slm.engine.plan import PlanRequest, alternative_flags, check_fits, format_plan, memory_breakdown, runtime_bytes
from slm.engine.run import Run
from slm.engine.trainer import TrainTask
from slm.errors import SlmError
from slm.recipes.config import RunConfig
from slm.runtime import autocast_dtype


def stream_task(run: RunConfig, info: D.DistInfo) -> TrainTask:
    """The GPT task on this rank's shard of the data source."""
    T, B, seed = run.model.block_size, run.train.batch_size, run.train.seed

    def stream(split: str, loop: bool):
        return TokenStream(run.data, split=split, block_size=T, batch_size=B, rank=info.rank,
                           world_size=info.world_size, loop=loop, seed=seed)

    torch.manual_seed(seed)
    return gpt_task(run.model, stream("train", True), eval_batches=lambda split: stream(split, False))


def plan_request(run: RunConfig, device: torch.device, world_size: int) -> PlanRequest:
    dtype = "bf16" if autocast_dtype(run.train.dtype, device) == torch.bfloat16 else "fp32"
    return PlanRequest(run.model, batch_size=run.train.batch_size, grad_accum=run.train.grad_accum, dtype=dtype,
                       device="cuda" if device.type == "cuda" else "cpu", num_gpus=world_size, fsdp=run.train.fsdp,
                       memory_gb=run.train.memory_gb)


def check_memory(run: RunConfig, info: D.DistInfo, report) -> int:
    """The planned peak memory per process/device; refuses (printing the plan) what will not fit."""
    req = plan_request(run, info.device, info.world_size)
    if req.device == "cpu":
        req.num_gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes sharing this machine's RAM
    planned = sum(memory_breakdown(req, runtime_bytes(req.device)).values())
    plan = check_fits(req) if run.train.check_memory else None
    if plan is None:
        return planned
    report(format_plan(plan))
    alt = plan.get("alternative")
    hint = (f"try {alternative_flags(alt)}" if alt else "choose a smaller model")
    raise SlmError(f"this configuration needs {plan['memory_per_device_total'] / 1024**3:.1f} GiB per "
                   f"{'process' if req.device == 'cpu' else 'device'} but {plan['device_memory'] / 1024**3:.1f} GiB "
                   f"are available (plan above); {hint}, or pass --no-check-memory to try anyway")


def train(run: RunConfig, out: str | Path, resume: bool = False, quiet: bool = False) -> dict:
    """Train (or resume) a GPT into the run directory `out`; returns the summary."""
    with Run(out, run.train, resume=resume, quiet=quiet) as r:
        check_source(run.data, split="train")
        planned = check_memory(run, r.info, lambda text: print(text, file=sys.stderr) if r.is_main else None)
        r.start(config=run.to_dict())
        task = stream_task(run, r.info)
        r.report(f"model: {run.model.num_params() / 1e6:.1f}M parameters; data: {run.data.source}; run: {out}")
        summary = r.fit(task, metadata={"created_by": "slm train", "preset": run.preset})
        summary["planned_memory_bytes"] = planned
        summary["out"] = str(out)
        r.finish(summary)
        return summary
