"""Pretraining recipe: slm's GPT on a token stream, run by the generic `Trainer`.

`train(run, out, resume)` is what `slm train` does: check the data source and the memory plan,
guard the run directory, build the GPT task (model, streams, checkpoint format), resume if
asked, fit, and return the summary. `gpt_task` and `RandomBatches` are also what the benchmark
and `slm plan`'s CPU measurement run, so they time the very step `slm train` takes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path

import torch

from slm.artifacts import (TIED_KEYS, model_config_json, read_artifact, read_tensors, save_tensors, verify_weights,
                            write_json)
from slm.config import ModelConfig
from slm.errors import SlmError
from slm.model import GPT
from slm.tokenizer import get_tokenizer
from slm.engine import distributed as D
from slm.engine.checkpoints import CheckpointManager
from slm.engine.config import RUN_CONFIG_FILE, RunConfig, save_run_config
from slm.engine.trainer import Trainer, TrainTask, resolve_amp_dtype
from slm.engine.losses import CausalLMLoss
from slm.engine.metrics import METRICS_FILE, Progress
from slm.engine.plan import PlanRequest, alternative_flags, check_fits, format_plan, memory_breakdown, runtime_bytes

PREFIX = "model."  # CausalLMLoss holds the GPT as .model
SUMMARY_FILE = "summary.json"


class RandomBatches:
    """Seeded random token batches with a resumable position (benchmarks, plan measurements, tests)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, seed: int = 0, vocab: int | None = None):
        self.shape = (batch_size, cfg.block_size + 1)
        self.vocab = vocab or cfg.vocab_size
        self.seed, self.index = seed, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
            t = torch.randint(0, self.vocab, self.shape, generator=g)
            self.index += 1
            yield t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def gpt_task(model_cfg: ModelConfig, batches, eval_batches=None, model: GPT | None = None) -> TrainTask:
    """A TrainTask for slm's GPT: checkpoints are slm model directories."""
    model = model if model is not None else GPT(model_cfg)
    identity = get_tokenizer().identity

    def save_model(directory: Path, state_dict: dict, metadata: dict) -> None:
        tensors = {k[len(PREFIX):]: v for k, v in state_dict.items()}
        tensors = {k: v for k, v in tensors.items() if k not in TIED_KEYS}
        save_tensors(directory, tensors, model_config_json(model_cfg, identity, metadata))

    def load_model(directory: Path) -> dict:
        art = read_artifact(directory)
        if art.model != model_cfg:
            raise SlmError(f"{directory} holds a model of another shape ({art.model}) than this run's ({model_cfg})")
        tensors = read_tensors(verify_weights(art.path, art.raw))
        for tied in TIED_KEYS:
            tensors[tied] = tensors["transformer.wte.weight"]
        return {PREFIX + k: v for k, v in tensors.items()}

    return TrainTask(module=CausalLMLoss(model), batches=batches, save_model=save_model, load_model=load_model,
                     eval_batches=eval_batches, flops_per_token=model_cfg.flops_per_token(model_cfg.block_size),
                     shard_units=list(model.transformer.h))


def stream_task(run: RunConfig, info: D.DistInfo) -> TrainTask:
    from slm.data import TokenStream

    T, B, seed = run.model.block_size, run.train.batch_size, run.train.seed

    def stream(split: str, loop: bool):
        return TokenStream(run.data, split=split, block_size=T, batch_size=B, rank=info.rank,
                           world_size=info.world_size, loop=loop, seed=seed)

    torch.manual_seed(seed)
    return gpt_task(run.model, stream("train", True), eval_batches=lambda split: stream(split, False))


# ---------------------------------------------------------------------------- the run directory


def has_run(out: Path) -> bool:
    return (out / METRICS_FILE).exists() or (out / RUN_CONFIG_FILE).exists() or bool(CheckpointManager(out).checkpoints())


class RunLock:
    """One writer per run directory: a second `slm train` on the same --out is refused."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise SlmError(f"another slm train is writing {self.path.parent}; wait for it or choose another --out") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def plan_request(run: RunConfig, device: torch.device, world_size: int) -> PlanRequest:
    dtype = "bf16" if resolve_amp_dtype(run.train.dtype, device) == torch.bfloat16 else "fp32"
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
    from slm.data import check_source

    out = Path(out)
    info = D.setup(run.train.device)
    try:
        if run.train.max_steps is None and run.train.max_minutes is None:
            raise SlmError("say how long to train: --max-steps N and/or --max-minutes M")
        progress = Progress(run.train.log_every, enabled=info.is_main and not quiet)
        report = progress.message if info.is_main else (lambda _: None)
        if info.is_main and not resume and has_run(out):
            raise SlmError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
        check_source(run.data, split="train")
        planned = check_memory(run, info, lambda text: print(text, file=sys.stderr) if info.is_main else None)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
        D.barrier(info)
        with RunLock(out) if info.is_main else contextlib.nullcontext():
            if info.is_main:
                save_run_config(out, run)
            task = stream_task(run, info)
            meta = {"created_by": "slm train", "preset": run.preset}
            trainer = Trainer(task, run.train, out, info, progress, metadata=meta)
            if resume:
                trainer.resume()
            report(f"model: {run.model.num_params() / 1e6:.1f}M parameters; data: {run.data.source}; run: {out}")
            summary = trainer.fit()
            summary["planned_memory_bytes"] = planned
            summary["out"] = str(out)
            if info.is_main:
                _write_summary(out, summary)
            return summary
    finally:
        D.teardown()


def _write_summary(out: Path, summary: dict) -> None:
    write_json(out / SUMMARY_FILE, summary)
