"""Stability guards: skip non-finite steps, detect loss spikes.

`BadStepGuard` counts steps whose loss or gradient norm is not finite (their update is skipped
by the trainer) and says when too many came in a row. `SpikeDetector` flags a loss more than
`zscore` standard deviations above the mean of a running window of recent losses, as llm.c's
outlier detector does; spikes are kept out of the window so one spike does not hide the next.
Both are plain state machines with `state_dict()` so a resumed run decides exactly as the
uninterrupted one would.
"""

from __future__ import annotations

import math
from collections import deque

STD_FLOOR = 1e-3  # nats: a perfectly flat window would otherwise make any wiggle a spike


class BadStepGuard:
    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.total = 0

    def check(self, loss: float, grad_norm: float) -> bool:
        """True if the step is usable; counts it otherwise."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.limit

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.total = state["consecutive"], state["total"]


class SpikeDetector:
    def __init__(self, window: int, zscore: float):
        self.window = window
        self.zscore = zscore
        self.losses: deque[float] = deque(maxlen=window)
        self.spikes = 0

    def check(self, loss: float) -> float | None:
        """The loss's z-score if it is a spike (window full and z > threshold), else None."""
        if self.zscore <= 0 or not math.isfinite(loss):
            return None
        if len(self.losses) == self.window:
            mean = sum(self.losses) / self.window
            std = math.sqrt(sum((v - mean) ** 2 for v in self.losses) / self.window)
            z = (loss - mean) / max(std, STD_FLOOR)
            if z > self.zscore:
                self.spikes += 1
                return z
        self.losses.append(loss)
        return None

    def reset(self) -> None:
        self.losses.clear()

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.window)
        self.spikes = state["spikes"]
