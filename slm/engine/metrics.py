"""What a training run reports: `metrics.jsonl` for scripts and plots, a progress line for people.

`MetricsLog` appends one JSON object per line (every optimizer step's `train_loss`, each
evaluation's `val_loss`, and every intervention as an `event`), flushed per line so a killed run
keeps what it logged. On resume, records after the checkpoint's step are dropped: the resumed run
logs those steps again. `Progress` draws a live line on a terminal and prints a line every few
steps otherwise (logs, CI). `Speedometer` turns step timings into tokens/s, MFU and the share of
time spent waiting for data.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

from slm.artifacts import atomic_write_bytes

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


class Speedometer:
    """Tokens/s, MFU and data-wait share over the last `window` steps."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, window: int = 20):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.steps: deque[tuple[float, int, float]] = deque(maxlen=window)  # (seconds, tokens, data wait)
        self.total_seconds = 0.0
        self.total_tokens = 0

    def add(self, seconds: float, tokens: int, data_wait: float) -> None:
        self.steps.append((seconds, tokens, data_wait))
        self.total_seconds += seconds
        self.total_tokens += tokens

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
        return self.flops_per_token * (self.tokens_per_s if tokens_per_s is None else tokens_per_s) / self.peak_flops


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
