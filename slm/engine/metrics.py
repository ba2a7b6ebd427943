"""What a training run reports: metrics sinks for scripts and plots, a progress line and a summary for people.

`Metrics` writes every record to its sinks. `MetricsLog` (always) appends one JSON object per
line to `metrics.jsonl` (every optimizer step's `train_loss`, each evaluation's `val_loss`, and
every intervention as an `event`), flushed per line so a killed run keeps what it logged; on
resume, records after the checkpoint's step are dropped: the resumed run logs those steps again.
`TensorBoardSink` (with `--tensorboard`) writes the same numbers as TensorBoard scalars into
event files beside it, so `tensorboard --logdir runs/` compares runs; a resumed run purges the
events after its checkpoint's step the same way.

`Progress` draws a live line on a terminal and prints a line every few steps otherwise (logs,
CI). `Speedometer` turns step timings into tokens/s, MFU and the share of time spent waiting for
data. MFU is relative to the device's peak matmul FLOP/s: a datasheet's on GPUs; on a CPU a
measured one, measured again when training outruns it (other programs slowed the first
measurement), and never below what training reached, so MFU never passes 100%.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable

from slm.errors import SlmError
from slm.io import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """Every well-formed record of a metrics.jsonl (a torn last line is ignored)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


class MetricsLog:
    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._f = open(self.path, "a") if enabled else None

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def truncate_after(self, step: int) -> int:
        """Drop records logged after `step` (what a resumed run redoes); returns how many."""
        if self._f is None or not self.path.exists():
            return 0
        self._f.close()
        keep, dropped = [], 0
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    dropped += 1  # a line torn by the kill
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) > step:
                    dropped += 1
                else:
                    keep.append(line if line.endswith("\n") else line + "\n")
        atomic_write_bytes(self.path, "".join(keep).encode())
        self._f = open(self.path, "a")
        return dropped

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class TensorBoardSink:
    """Numbers of the metrics records as TensorBoard scalars: `train_loss` -> `train/loss`,
    `val_perplexity` -> `val/perplexity`, other step fields (`lr`, `grad_norm`, ...) under
    `train/`, all against the optimizer step. Events and counters are left to metrics.jsonl."""

    SKIP = ("step", "tokens", "val_tokens", "test_tokens")

    def __init__(self, directory: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise SlmError("--tensorboard needs tensorboardX: pip install 'slm[tensorboard]'") from None
        self.directory = directory
        self._writer_cls = SummaryWriter
        self._w = SummaryWriter(str(directory))

    @staticmethod
    def tag(key: str) -> str:
        split, _, name = key.partition("_")
        return f"{split}/{name}" if split in ("train", "val", "test") and name else f"train/{key}"

    def write(self, record: dict) -> None:
        if "event" in record:
            return
        step = record.get("step", 0)
        for key, value in record.items():
            if key not in self.SKIP and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self._w.add_scalar(self.tag(key), value, step)
        self._w.flush()

    def truncate_after(self, step: int) -> None:
        """Hide the events a resumed run logs again (TensorBoard's purge_step)."""
        self._w.close()
        self._w = self._writer_cls(str(self.directory), purge_step=step + 1)

    def close(self) -> None:
        self._w.close()


class Metrics:
    """Every record to every sink: metrics.jsonl in `run_dir`, and TensorBoard event files with
    `tensorboard`. Disabled (ranks other than 0, runs without a directory), it writes nothing."""

    def __init__(self, run_dir: str | Path | None, enabled: bool = True, tensorboard: bool = False):
        enabled = enabled and run_dir is not None
        self.log = MetricsLog(Path(run_dir or ".") / METRICS_FILE, enabled=enabled)
        self.tensorboard = TensorBoardSink(Path(run_dir)) if enabled and tensorboard else None

    def write(self, record: dict) -> None:
        self.log.write(record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def truncate_after(self, step: int) -> int:
        """Drop what was logged after `step` (what a resumed run redoes); returns how many records."""
        if self.tensorboard is not None:
            self.tensorboard.truncate_after(step)
        return self.log.truncate_after(step)

    def close(self) -> None:
        self.log.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class Speedometer:
    """Tokens/s, MFU and data-wait share over the last `window` steps."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, window: int = 20,
                 reprobe: Callable[[], float] | None = None, max_reprobes: int = 3):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.reprobe, self.reprobes_left = reprobe, max_reprobes
        self.steps: deque[tuple[float, int, float]] = deque(maxlen=window)  # (seconds, tokens, data wait)
        self.total_seconds = 0.0
        self.total_tokens = 0

    def add(self, seconds: float, tokens: int, data_wait: float) -> None:
        self.steps.append((seconds, tokens, data_wait))
        self.total_seconds += seconds
        self.total_tokens += tokens
        self._keep_peak_above(self.flops_per_token * self.tokens_per_s)

    def _keep_peak_above(self, achieved: float) -> None:
        """A peak measured while other programs ran is too low: measure it again, and never
        keep it below what training reached (peak >= any throughput achieved, by definition)."""
        if not self.peak_flops or achieved <= self.peak_flops:
            return
        if self.reprobe is not None and self.reprobes_left > 0:
            self.reprobes_left -= 1
            self.peak_flops = max(self.peak_flops, self.reprobe())
        self.peak_flops = max(self.peak_flops, achieved)

    @property
    def step_seconds(self) -> float:
        return sum(s for s, _, _ in self.steps) / max(1, len(self.steps))

    @property
    def tokens_per_s(self) -> float:
        secs = sum(s for s, _, _ in self.steps)
        return sum(t for _, t, _ in self.steps) / secs if secs > 0 else 0.0

    @property
    def data_wait(self) -> float:
        secs = sum(s for s, _, _ in self.steps)
        return sum(w for _, _, w in self.steps) / secs if secs > 0 else 0.0

    def mfu(self, tokens_per_s: float | None = None) -> float | None:
        if not self.peak_flops:
            return None
        achieved = self.flops_per_token * (self.tokens_per_s if tokens_per_s is None else tokens_per_s)
        self._keep_peak_above(achieved)
        return achieved / self.peak_flops


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 700.0))


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """A live status line on a terminal; every `every` steps a plain line otherwise."""

    def __init__(self, every: int = 10, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.every = every
        self.enabled = enabled
        self.live = enabled and self.stream.isatty() and os.environ.get("TERM") != "dumb"
        self._last_draw = 0.0
        self._drawn = False

    def step(self, step: int, total: int | None, loss: float, lr: float, speed: Speedometer,
             eta_seconds: float | None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.live and now - self._last_draw < 0.2 and step != total:
            return
        if not self.live and step % self.every and step != 1 and step != total:
            return
        self._last_draw = now
        mfu = speed.mfu()
        parts = [f"step {step}" + (f"/{total}" if total else ""), f"loss {loss:.4f}", f"lr {lr:.2e}",
                 f"{speed.tokens_per_s:,.0f} tok/s"]
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        parts.append(f"data wait {100 * speed.data_wait:.1f}%")
        if eta_seconds is not None:
            parts.append(f"ETA {format_duration(eta_seconds)}")
        self._write(" | ".join(parts))

    def message(self, text: str) -> None:
        """A line of its own (evaluations, checkpoints, events)."""
        if not self.enabled:
            return
        if self.live and self._drawn:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = False

    def _write(self, line: str) -> None:
        if self.live:
            self.stream.write("\r\033[K" + line)
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.live and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def describe_summary(s: dict) -> str:
    """A run summary for people (the CLI prints it; --json prints the dict)."""
    mfu = ""
    if s.get("mfu") is not None:
        mfu = f", MFU {100 * s['mfu']:.1f}%" + (f" of {s['peak_flops'] / 1e9:,.0f} GFLOP/s peak" if s.get("peak_flops")
                                               else "")
    lines = [f"trained {s['steps']} steps ({s['tokens']:,} tokens) in {format_duration(s['wall_seconds'])}; "
             f"{s['tokens_per_s']:,.0f} tok/s{mfu}"]
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
