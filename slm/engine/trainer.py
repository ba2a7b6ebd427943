"""The training loop: `Trainer` runs any `TrainTask` with slm's schedule, guards, checkpoints and reports.

A recipe (pretraining in pretrain.py, fine-tuning elsewhere) plugs in a `TrainTask`:

- `module`: an nn.Module called as `module(*batch)` that returns the mean loss over the batch's
  target tokens. A batch is a tuple of tensors whose first element is the input ids and whose
  last is the targets, -100 where no loss is taken. DDP/FSDP wrap exactly this module.
- `batches`: an iterable of batches with `state_dict()` / `load_state_dict()` (exact resume).
- `eval_batches(split)`: a finite iterable of batches of "val" or "test" (or None: no evaluation).
- `save_model(directory, state_dict, metadata)` writes a loadable model directory from the
  module's full state dict; `load_model(directory)` returns that state dict again.

The trainer owns everything else: AdamW and the LR schedule, gradient accumulation and clipping,
bf16 autocast, torch.compile, DDP/FSDP, the non-finite and spike guards (with rollback),
evaluation, checkpoints (policy, retention, resume), metrics.jsonl, the progress line, SIGINT /
SIGTERM, and the run summary.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from slm.errors import SlmError
from slm.engine import distributed as D
from slm.engine.checkpoints import CheckpointManager, load_optimizer, optimizer_to_tensors
from slm.engine.config import TrainConfig
from slm.engine.guards import BadStepGuard, SpikeDetector
from slm.engine.hardware import cpu_bf16_native, keep_freed_memory, peak_flops, peak_memory
from slm.engine.metrics import METRICS_FILE, MetricsLog, Progress, Speedometer, format_duration
from slm.engine.optim import lr_at, make_optimizer, set_lr

IGNORE_INDEX = -100
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class TrainTask:
    module: nn.Module
    batches: Iterable
    save_model: Callable[[Path, dict, dict], None]
    load_model: Callable[[Path], dict]
    eval_batches: Callable[[str], Iterable] | None = None
    flops_per_token: float = 0.0
    shard_units: list[nn.Module] = field(default_factory=list)  # FSDP units (e.g. transformer blocks)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    data_wait: float
    applied: bool


def resolve_amp_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for --dtype: bf16 where the hardware has it natively under 'auto'."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16_native() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def count_targets(batch) -> int:
    return int((batch[-1] != IGNORE_INDEX).sum())


def evaluate_loss(module: nn.Module, batches: Iterable, max_batches: int | None, device: torch.device,
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
    with torch.no_grad(), autocast(device, dtype), contextlib.closing(_Closer(batches)):
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


class _Closer:
    """Stops a stream's background loader when evaluation is done with it."""

    def __init__(self, batches):
        self.batches = batches

    def close(self) -> None:
        if hasattr(self.batches, "close"):
            self.batches.close()


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


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    def tensor(s):
        return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())

    torch.set_rng_state(tensor(state["cpu"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(tensor(state["cuda"]), device)


class Trainer:
    def __init__(self, task: TrainTask, cfg: TrainConfig, run_dir: str | Path | None = None,
                 info: D.DistInfo | None = None, progress: Progress | None = None, metadata: dict | None = None):
        self.task, self.cfg = task, cfg
        self.info = info or D.DistInfo(device=torch.device("cpu"))
        self.device = self.info.device
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.metadata = metadata or {}
        self.amp_dtype = resolve_amp_dtype(cfg.dtype, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores
        else:
            keep_freed_memory()  # no page faults on each step's large tensors (hardware.py)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        task.module.to(self.device)
        self.module = D.wrap(task.module, self.info, cfg.fsdp, task.shard_units)
        if cfg.compile:
            self.module = torch.compile(self.module)
        self.optimizer = make_optimizer(task.module, cfg)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        main = self.info.is_main
        if self.run_dir is not None and main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress or Progress(cfg.log_every, enabled=main)
        self.progress.enabled = self.progress.enabled and main
        self.ckpt = CheckpointManager(self.run_dir, cfg.keep_last, report=self.progress.message) if self.run_dir else None
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE, enabled=main) if self.run_dir else MetricsLog("", False)
        peak = peak_flops(self.device, self.amp_dtype)
        self.speed = Speedometer(task.flops_per_token, peak * self.info.world_size if peak else None)
        # run state (saved in checkpoints)
        self.step = 0
        self.tokens = 0
        self.horizon = cfg.max_steps
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.elapsed_before = 0.0  # training seconds of earlier sessions of this run
        self.best_val: float | None = None
        self.bad = BadStepGuard(cfg.max_bad_steps)
        self.spikes = SpikeDetector(cfg.spike_window, cfg.spike_zscore)
        # this session
        self.resumed_from: str | None = None
        self.last_val: float | None = None
        self.val_step: int | None = None
        self.test: tuple[float, int] | None = None
        self.ckpt_seconds, self.ckpt_bytes, self.ckpt_saves = 0.0, 0, 0
        self.last_ckpt: Path | None = None
        self.stop_reason: str | None = None
        self._signal: str | None = None
        self._it = None
        self._data_pass: int | None = None
        self._warned_empty: set[str] = set()
        self._t0 = time.monotonic()
        self._last_ckpt_time = self._t0

    # ------------------------------------------------------------------------ one step

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self._t0

    def _flags(self) -> list[float]:
        """Decisions every rank must take together: [signal, out of time, time-based checkpoint due]."""
        cfg = self.cfg
        time_up = cfg.max_minutes is not None and self.elapsed >= 60 * cfg.max_minutes
        ckpt_due = cfg.ckpt_minutes is not None and time.monotonic() - self._last_ckpt_time >= 60 * cfg.ckpt_minutes
        return [float(self._signal is not None), float(time_up), float(ckpt_due)]

    def lr_for(self, step: int) -> float:
        horizon = self.horizon if self.horizon is not None else 10**9
        warmup = self.cfg.warmup_for(self.horizon)
        return self.lr_scale * lr_at(step, self.cfg.lr, self.cfg.final_lr, warmup, horizon)

    def train_step(self) -> StepResult:
        """One optimizer step: grad_accum micro-batches, clip, guard, AdamW."""
        if self._it is None:
            self._it = iter(self.task.batches)
        cfg, G = self.cfg, self.cfg.grad_accum
        t0 = time.perf_counter()
        wait, tokens = 0.0, 0
        lr = self.lr_for(self.step)
        set_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for micro in range(G):
            tw = time.perf_counter()
            try:
                batch = next(self._it)
            except StopIteration:
                raise SlmError("the training data ran out (a finite stream); train fewer steps") from None
            wait += time.perf_counter() - tw
            batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
            tokens += batch[0].numel()
            with self._no_sync(micro < G - 1), autocast(self.device, self.amp_dtype):
                loss = self.module(*batch)
            (loss / G).backward()
            loss_sum += loss.detach().float()
        stats = torch.tensor([loss_sum.item() / G, tokens, *self._flags()], dtype=torch.float64)
        D.all_reduce_sum(stats, self.info)
        loss_value = stats[0].item() / self.info.world_size
        signal_flag, time_up, ckpt_due = stats[2] > 0, stats[3] > 0, stats[4] > 0
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if 0 < cfg.grad_clip < grad_norm < math.inf:  # scaling every gradient only when it changes something
            torch.nn.utils.clip_grads_with_norm_(self.params, cfg.grad_clip, norm)
        applied = self.bad.check(loss_value, grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += int(stats[1].item())
        if signal_flag:
            self.stop_reason = self.stop_reason or "signal"
        elif time_up:
            self.stop_reason = self.stop_reason or "max_minutes"
        self._ckpt_time_due = bool(ckpt_due)
        return StepResult(loss_value, grad_norm, lr, int(stats[1].item()), time.perf_counter() - t0, wait, applied)

    def _no_sync(self, skip_sync: bool):
        if skip_sync and hasattr(self.module, "no_sync"):
            return self.module.no_sync()
        if hasattr(self.task.module, "set_requires_gradient_sync"):  # FSDP2
            self.task.module.set_requires_gradient_sync(not skip_sync)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------ the run

    def fit(self) -> dict:
        cfg = self.cfg
        self._t0 = time.monotonic()
        self._last_ckpt_time = self._t0
        self._ckpt_time_due = False
        handlers = self._install_signal_handlers()
        self.progress.message(self._banner())
        try:
            while self.stop_reason is None:
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    self.stop_reason = "max_steps"
                    break
                r = self.train_step()
                self._after_step(r)
            if self.stop_reason != "signal":
                if self.val_step != self.step:
                    self.run_eval()
            self.save_checkpoint()
            if self.stop_reason != "signal" and self.task.eval_batches is not None:
                loss, n = self.evaluate("test")
                if not n:
                    self._no_eval_data("test")
                else:
                    self.test = (loss, n)
                    self._log({"test_loss": loss, "test_perplexity": _ppl(loss), "test_tokens": n})
                    self.progress.message(f"test loss {loss:.4f}, perplexity {_ppl(loss):.2f} ({n:,} tokens)")
        finally:
            self.progress.close()
            self._restore_signal_handlers(handlers)
            close = getattr(self.task.batches, "close", None)
            if close:
                close()
            self.metrics.close()
            # DDP's C++ Reducer holds the process group: let it go now, so that teardown's
            # destroy_process_group drops the group's last reference and joins gloo's threads without the
            # GIL. Dropped later (with this Trainer), the Reducer joins them holding the GIL, and a thread
            # still freeing the last collective's tensors (which takes the GIL) waits forever.
            self.module = self.task.module
        return self.summary()

    def _after_step(self, r: StepResult) -> None:
        cfg = self.cfg
        self.speed.add(r.seconds, r.tokens, r.data_wait)
        if self.horizon is None and self.step == 5 and cfg.max_minutes is not None:
            # time-budgeted run: the cosine schedule spans the steps that fit, judged from the first ones
            self.horizon = max(self.step + 1, int(self.step * 60 * cfg.max_minutes / max(self.elapsed, 1e-9)))
            self._event("schedule", horizon=self.horizon)
        data_pass = getattr(self.task.batches, "pass_index", None)
        if data_pass is not None and data_pass != self._data_pass:
            if self._data_pass is not None:  # the stream started over on its data (a new shuffle)
                self._event("data_pass", data_pass=data_pass)
                self.progress.message(f"step {self.step}: pass {data_pass + 1} over the training data begins")
            self._data_pass = data_pass
        rec = {"train_loss": r.loss if math.isfinite(r.loss) else None, "lr": r.lr,
               "grad_norm": r.grad_norm if math.isfinite(r.grad_norm) else None,
               "step_seconds": round(r.seconds, 4), "data_wait": round(r.data_wait, 4)}
        self._log(rec)
        total = cfg.max_steps or self.horizon
        self.progress.step(self.step, total, r.loss, r.lr, self.speed, self._eta(total))
        if not r.applied:
            self._event("nonfinite_skip", loss=rec["train_loss"], grad_norm=rec["grad_norm"],
                        consecutive=self.bad.consecutive, total=self.bad.total)
            if self.bad.exhausted:
                self._event("stop", reason="nonfinite")
                raise SlmError(
                    f"{self.bad.consecutive} steps in a row had a non-finite loss or gradient (step {self.step}, "
                    f"lr {r.lr:.2e}); the run is diverging. Lower the learning rate (e.g. --lr "
                    f"{self.cfg.lr / 3:.1e}) and resume or restart")
            return
        z = self.spikes.check(r.loss)
        if z is not None:
            self._on_spike(r.loss, z)
        if cfg.eval_every and self.step % cfg.eval_every == 0:
            self.run_eval()
        if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self._ckpt_time_due:
            if cfg.eval_every and self.val_step != self.step:
                self.run_eval()  # every checkpoint carries its own val loss, so "best" can pick among all
            self.save_checkpoint()

    def _eta(self, total: int | None) -> float | None:
        eta = None
        if total:
            eta = (total - self.step) * self.speed.step_seconds
        if self.cfg.max_minutes is not None:
            left = 60 * self.cfg.max_minutes - self.elapsed
            eta = left if eta is None else min(eta, left)
        return None if eta is None else max(0.0, eta)

    def _on_spike(self, loss: float, z: float) -> None:
        cfg = self.cfg
        can_rollback = cfg.spike_rollback and self.rollbacks < cfg.max_rollbacks
        target = self._rollback_target() if can_rollback else None
        if target is None:
            self._event("loss_spike", loss=loss, zscore=round(z, 2), action="logged")
            self.progress.message(f"step {self.step}: loss spike {loss:.4f} (z={z:.1f})")
            return
        self._load_weights_and_optimizer(target)
        self.lr_scale *= cfg.spike_lr_factor
        self.rollbacks += 1
        self.spikes.reset()
        self._event("loss_spike", loss=loss, zscore=round(z, 2), action="rollback", to_checkpoint=target.name,
                    lr_scale=self.lr_scale)
        self.progress.message(f"step {self.step}: loss spike {loss:.4f} (z={z:.1f}); rolled back to {target.name}, "
                              f"LR x{self.lr_scale:g}")

    def _rollback_target(self) -> Path | None:
        found = None
        if self.info.is_main and self.ckpt is not None:
            latest = self.ckpt.latest_valid(set_aside=True)
            found = str(latest[0]) if latest else None
        found = D.broadcast_object(found, self.info)
        return Path(found) if found else None

    # ------------------------------------------------------------------------ evaluation

    def evaluate(self, split: str) -> tuple[float, int]:
        module = self.module if self.cfg.fsdp else self.task.module  # DDP's forward is for training only
        return evaluate_loss(module, self.task.eval_batches(split), self.cfg.eval_batches, self.device,
                             self.amp_dtype, self.info)

    def run_eval(self) -> None:
        if self.task.eval_batches is None:
            return
        loss, n = self.evaluate("val")
        if not n:
            self._no_eval_data("val")
            return
        self.last_val, self.val_step = loss, self.step
        if math.isfinite(loss) and (self.best_val is None or loss < self.best_val):
            self.best_val = loss
        self._log({"val_loss": loss, "val_perplexity": _ppl(loss), "val_tokens": n})
        self.progress.message(f"step {self.step}: val loss {loss:.4f}, perplexity {_ppl(loss):.2f}")

    def _no_eval_data(self, split: str) -> None:
        """A split too small for one batch: say so once, instead of a NaN loss."""
        if split in self._warned_empty:
            return
        self._warned_empty.add(split)
        self._event("no_eval_data", split=split)
        self.progress.message(f"the {split} split gave no full batch, so it is not evaluated: give it a larger "
                              f"share of the data (--val-percent / --test-percent), or lower --batch-size or "
                              f"--block-size")

    # ------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "horizon": self.horizon, "lr_scale": self.lr_scale,
                "rollbacks": self.rollbacks, "elapsed": self.elapsed, "best_val_loss": self.best_val,
                "val_loss": self.last_val if self.val_step == self.step else None,
                "bad_steps": self.bad.state_dict(), "spikes": self.spikes.state_dict(),
                "world_size": self.info.world_size, "train_config": dataclasses.asdict(self.cfg)}

    def save_checkpoint(self) -> None:
        """Collective: every rank contributes its state; rank 0 writes."""
        if self.run_dir is None:
            return
        self._last_ckpt_time = time.monotonic()
        t0 = time.perf_counter()
        model_sd = get_model_state_dict(self.task.module, options=_FULL)
        osd = get_optimizer_state_dict(self.task.module, self.optimizer, options=_FULL)
        batches_state = self.task.batches.state_dict() if hasattr(self.task.batches, "state_dict") else None
        ranks = D.gather_objects({"data": batches_state, "rng": _rng_state(self.device)}, self.info)
        if self.info.is_main and self.ckpt is not None:
            tensors, groups = optimizer_to_tensors(osd)
            state = self.state_dict() | {"optimizer_param_groups": groups, "ranks": ranks}
            meta = self.metadata | {"step": self.step, "tokens": self.tokens, "val_loss": state["val_loss"]}
            stats = self.ckpt.save(self.step, lambda d: self.task.save_model(d, model_sd, meta), tensors, state)
            if stats.bytes:
                self.ckpt_seconds += time.perf_counter() - t0
                self.ckpt_bytes += stats.bytes
                self.ckpt_saves += 1
                self.last_ckpt = self.run_dir / f"step-{self.step:07d}"
                self._event("checkpoint", path=self.last_ckpt.name, seconds=round(time.perf_counter() - t0, 3),
                            bytes=stats.bytes)
        D.barrier(self.info)

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint of the run directory, if any."""
        found = None
        if self.info.is_main and self.ckpt is not None:
            self.ckpt.clean_temporaries()
            latest = self.ckpt.latest_valid(set_aside=True)
            found = (str(latest[0]), latest[1]) if latest else None
        found = D.broadcast_object(found, self.info)
        if found is None:
            dropped = self.metrics.truncate_after(0)
            if dropped:
                self.progress.message(f"no complete checkpoint in {self.run_dir}: starting over")
            return False
        path, state = Path(found[0]), found[1]
        if state["world_size"] != self.info.world_size:
            raise SlmError(f"{path} was saved by {state['world_size']} processes; resume with the same number "
                           f"(torchrun --nproc_per_node={state['world_size']})")
        self._load_weights_and_optimizer(path)
        self.step, self.tokens = state["step"], state["tokens"]
        # a resumed run may be given more steps; a time-budgeted one keeps the horizon it estimated
        self.horizon = self.cfg.max_steps if self.cfg.max_steps is not None else state["horizon"]
        self.lr_scale, self.rollbacks, self.elapsed_before = state["lr_scale"], state["rollbacks"], state["elapsed"]
        self.best_val = state["best_val_loss"]
        if state["val_loss"] is not None:
            self.last_val, self.val_step = state["val_loss"], self.step
        self.bad.load_state_dict(state["bad_steps"])
        self.spikes.load_state_dict(state["spikes"])
        mine = state["ranks"][self.info.rank]
        if mine["data"] is not None:
            self.task.batches.load_state_dict(mine["data"])
        _set_rng_state(mine["rng"], self.device)
        self._it = None
        self.resumed_from = path.name
        dropped = self.metrics.truncate_after(self.step)
        self._event("resume", checkpoint=path.name, dropped_records=dropped)
        self.progress.message(f"resumed from {path.name} (step {self.step}, {self.tokens:,} tokens)")
        return True

    def _load_weights_and_optimizer(self, path: Path) -> None:
        set_model_state_dict(self.task.module, self.task.load_model(path), options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(self.task.module, self.optimizer, load_optimizer(path),
                                 options=StateDictOptions(full_state_dict=True))

    # ------------------------------------------------------------------------ reporting

    def _log(self, rec: dict) -> None:
        self.metrics.write({"step": self.step, "tokens": self.tokens, **rec})

    def _event(self, name: str, **fields) -> None:
        self._log({"event": name, **fields})

    def _banner(self) -> str:
        cfg = self.cfg
        world = f" x {self.info.world_size} processes" + (" (FSDP)" if cfg.fsdp else " (DDP)") if self.info.distributed else ""
        dtype = "bf16 autocast" if self.amp_dtype == torch.bfloat16 else "fp32"
        length = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.max_minutes:g} minutes"
        return (f"training on {self.device.type}{world}, {dtype}{', compiled' if cfg.compile else ''}: {length}, "
                f"{cfg.batch_size} x {cfg.grad_accum} micro-batches per step, peak lr {cfg.lr:g}")

    def summary(self) -> dict:
        speed = self.speed
        wall = time.monotonic() - self._t0
        tok_s = speed.total_tokens / speed.total_seconds if speed.total_seconds else 0.0
        mfu = speed.mfu(tok_s)
        best = self.ckpt.best() if self.ckpt else None
        out = {
            "steps": self.step,
            "tokens": self.tokens,
            "final_val_loss": self.last_val,
            "final_val_perplexity": _ppl(self.last_val) if self.last_val is not None else None,
            "best_val_loss": self.best_val,
            "test_loss": self.test[0] if self.test else None,
            "test_perplexity": _ppl(self.test[0]) if self.test else None,
            "tokens_per_s": round(tok_s, 1),
            "mfu": round(mfu, 4) if mfu is not None else None,
            "wall_seconds": round(wall, 2),
            "checkpoint_seconds": round(self.ckpt_seconds, 3),
            "checkpoint_saves": self.ckpt_saves,
            "checkpoint_bytes_per_save": self.ckpt_bytes // self.ckpt_saves if self.ckpt_saves else 0,
            "checkpoint_share": round(self.ckpt_seconds / wall, 4) if wall > 0 else 0.0,
            "last_checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
            "best_checkpoint": str(best) if best else None,
            "stopped": self.stop_reason,
            "resumed_from": self.resumed_from,
            "nonfinite_skips": self.bad.total,
            "loss_spikes": self.spikes.spikes,
            "rollbacks": self.rollbacks,
            "peak_memory_bytes": peak_memory(self.device),
            "dtype": "bf16" if self.amp_dtype == torch.bfloat16 else "fp32",
            "device": self.device.type,
            "world_size": self.info.world_size,
            "data_pass": getattr(self.task.batches, "pass_index", None),
            "data_skipped": dict(getattr(self.task.batches, "skipped", {}) or {}),
        }
        return out

    # ------------------------------------------------------------------------ signals

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
            self._signal = name
            self.progress.message(f"{name}: finishing this step, then saving (Ctrl-C again to abort without saving)")

        for s in previous:
            signal.signal(s, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for s, h in (previous or {}).items():
            signal.signal(s, h)


def describe_summary(s: dict) -> str:
    """The run summary for people (the CLI prints it; --json prints the dict)."""
    lines = [f"trained {s['steps']} steps ({s['tokens']:,} tokens) in {format_duration(s['wall_seconds'])}; "
             f"{s['tokens_per_s']:,.0f} tok/s" + (f", MFU {100 * s['mfu']:.1f}%" if s["mfu"] is not None else "")]
    if s["final_val_loss"] is not None:
        lines.append(f"val loss {s['final_val_loss']:.4f} (perplexity {s['final_val_perplexity']:.2f})"
                     + (f", test loss {s['test_loss']:.4f} (perplexity {s['test_perplexity']:.2f})"
                        if s["test_loss"] is not None else ""))
    if s["checkpoint_saves"]:
        lines.append(f"checkpoints: {s['checkpoint_saves']} saves, {s['checkpoint_seconds']:.2f} s total "
                     f"({s['checkpoint_seconds'] / s['checkpoint_saves']:.2f} s and "
                     f"{s['checkpoint_bytes_per_save'] / 1e6:.1f} MB per save), "
                     f"{100 * s['checkpoint_share']:.1f}% of wall time")
    if s.get("planned_memory_bytes"):
        lines.append(f"memory: planned {s['planned_memory_bytes'] / 2**30:.2f} GiB, measured peak "
                     f"{s['peak_memory_bytes'] / 2**30:.2f} GiB")
    if s["best_checkpoint"] or s["last_checkpoint"]:
        lines.append(f"best checkpoint {s['best_checkpoint'] or s['last_checkpoint']}")
    if s.get("data_skipped"):
        lines.append("data skipped: " + ", ".join(f"{k} {v:,}" for k, v in sorted(s["data_skipped"].items())))
    if s["nonfinite_skips"] or s["loss_spikes"]:
        lines.append(f"stability: {s['nonfinite_skips']} non-finite steps skipped, {s['loss_spikes']} loss spikes, "
                     f"{s['rollbacks']} rollbacks")
    if s["stopped"] == "signal":
        lines.append("stopped by a signal after saving; continue with --resume")
    return "\n".join(lines)


def _ppl(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 700.0))
