"""The training loop: `Trainer` runs any `TrainTask` with slm's schedule, guards, checkpoints and reports.

A recipe (slm/recipes) plugs in a `TrainTask`; the trainer knows nothing else about it:

- `module`: an nn.Module called as `module(*batch)` that returns the mean loss over the batch's
  target tokens. A batch is a tuple of tensors whose first element is the input ids and whose
  last is the targets, -100 where no loss is taken. DDP/FSDP wrap exactly this module.
- `batches`: a `BatchSource` (every capability the trainer uses is declared there).
- `eval_batches(split)`: finite `Batches` of "val" or "test" (or None: no evaluation).
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
from typing import Callable, Iterator, Protocol, runtime_checkable

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

from slm.engine import distributed as D
from slm.engine.checkpoints import CheckpointManager, load_optimizer, optimizer_to_tensors
from slm.engine.config import TrainConfig
from slm.engine.evaluation import Batches, evaluate_loss
from slm.engine.guards import BadStepGuard, SpikeDetector
from slm.engine.hardware import keep_freed_memory, peak_flops, peak_memory
from slm.engine.metrics import Metrics, Progress, Speedometer, perplexity
from slm.engine.optim import lr_at, make_optimizer, set_lr
from slm.errors import SlmError
from slm.runtime import autocast, autocast_dtype

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@runtime_checkable
class BatchSource(Protocol):
    """What the trainer reads training batches from: every capability it uses.

    Batches are tuples of tensors, input ids first and targets last (-100: no loss there).
    `state_dict()` is a small JSON-able position that `load_state_dict()` resumes from exactly
    (saved in every checkpoint, per rank); `close()` stops any background loader; `pass_index`
    is the pass over the data the source is on (None when it does not count passes), and
    `skipped` what input it skipped so far, per reason (both reported in the summary)."""

    pass_index: int | None
    skipped: dict[str, int]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


@dataclass
class TrainTask:
    module: nn.Module
    batches: BatchSource
    save_model: Callable[[Path, dict, dict], None]
    load_model: Callable[[Path], dict]
    eval_batches: Callable[[str], Batches] | None = None
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
        if not isinstance(task.batches, BatchSource):
            missing = [n for n in ("__iter__", "state_dict", "load_state_dict", "close", "pass_index", "skipped")
                       if not hasattr(task.batches, n)]
            raise TypeError(f"{type(task.batches).__name__} is not a BatchSource: it lacks {', '.join(missing)}")
        self.amp_dtype = autocast_dtype(cfg.dtype, self.device)
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
        self.metrics = Metrics(self.run_dir, enabled=main and self.run_dir is not None, tensorboard=cfg.tensorboard)
        peak = peak_flops(self.device, self.amp_dtype)
        reprobe = ((lambda: peak_flops(self.device, self.amp_dtype, fresh=True) * self.info.world_size)
                   if self.device.type == "cpu" else None)
        self.speed = Speedometer(task.flops_per_token, peak * self.info.world_size if peak else None, reprobe=reprobe)
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
        if cfg.max_steps is None and cfg.max_minutes is None:
            raise SlmError("say how long to train: --max-steps N and/or --max-minutes M")
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
                    self._log({"test_loss": loss, "test_perplexity": perplexity(loss), "test_tokens": n})
                    self.progress.message(f"test loss {loss:.4f}, perplexity {perplexity(loss):.2f} ({n:,} tokens)")
        finally:
            self.progress.close()
            self._restore_signal_handlers(handlers)
            self.task.batches.close()
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
        data_pass = self.task.batches.pass_index
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
        self._log({"val_loss": loss, "val_perplexity": perplexity(loss), "val_tokens": n})
        self.progress.message(f"step {self.step}: val loss {loss:.4f}, perplexity {perplexity(loss):.2f}")

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
        batches_state = self.task.batches.state_dict()
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
            "final_val_perplexity": perplexity(self.last_val) if self.last_val is not None else None,
            "best_val_loss": self.best_val,
            "test_loss": self.test[0] if self.test else None,
            "test_perplexity": perplexity(self.test[0]) if self.test else None,
            "tokens_per_s": round(tok_s, 1),
            "mfu": round(mfu, 4) if mfu is not None else None,
            "peak_flops": speed.peak_flops,
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
            "data_pass": self.task.batches.pass_index,
            "data_skipped": dict(self.task.batches.skipped),
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
