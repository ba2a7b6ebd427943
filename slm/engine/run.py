"""A training run's lifecycle in its directory, the same for every recipe.

    with Run(out, train_cfg, resume=..., what="training run") as run:   # processes joined (torchrun)
        ...check what the recipe needs (data, memory)...
        run.start(resolved_config)          # refuse a finished run without --resume; lock; save the config
        summary = run.fit(task, metadata)   # Trainer: resume if asked, train, evaluate, checkpoint
        run.finish(summary)                 # the summary file (rank 0)
    # lock released, process group left, whatever happened

The directory holds the resolved configuration (`config_file`), metrics.jsonl (and TensorBoard
event files with --tensorboard), the checkpoints `step-NNNNNNN/`, and the summary. One writer at a
time: a second run on the same directory is refused while the first holds its lock. Rank 0
writes everything; the other ranks only train.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from slm.artifacts import RUN_CONFIG_FILE, run_checkpoints
from slm.engine import distributed as D
from slm.engine.config import TrainConfig
from slm.engine.metrics import METRICS_FILE, Progress
from slm.engine.trainer import Trainer, TrainTask
from slm.errors import SlmError
from slm.io import write_json

SUMMARY_FILE = "summary.json"


def has_run(out: Path, config_file: str = RUN_CONFIG_FILE) -> bool:
    """Whether `out` already holds a run: metrics, a saved configuration or a checkpoint."""
    out = Path(out)
    return (out / METRICS_FILE).exists() or (out / config_file).exists() or bool(run_checkpoints(out))


class RunLock:
    """One writer per run directory: a second run on the same directory is refused."""

    def __init__(self, out: Path, command: str = "slm train"):
        self.path = Path(out) / ".lock"
        self.command = command
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise SlmError(f"another {self.command} is writing {self.path.parent}; wait for it or choose another "
                           f"--out") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Run:
    """The lifecycle of one run in `out` (see the module docstring)."""

    def __init__(self, out: str | Path, cfg: TrainConfig, *, resume: bool = False, quiet: bool = False,
                 what: str = "training run", command: str = "slm train", config_file: str = RUN_CONFIG_FILE,
                 summary_file: str = SUMMARY_FILE, markers: tuple[str, ...] = (), check_length: bool = True):
        self.out, self.cfg, self.resume = Path(out), cfg, resume
        self.what, self.command, self.config_file, self.summary_file = what, command, config_file, summary_file
        self.markers = markers  # more files that mean the directory is taken (e.g. a finished artifact)
        self.quiet, self.check_length = quiet, check_length
        self.info: D.DistInfo | None = None
        self.progress: Progress | None = None
        self.trainer: Trainer | None = None
        self._lock: RunLock | None = None

    def __enter__(self) -> "Run":
        if self.check_length and self.cfg.max_steps is None and self.cfg.max_minutes is None:
            raise SlmError("say how long to train: --max-steps N and/or --max-minutes M")
        self.info = D.setup(self.cfg.device)
        self.progress = Progress(self.cfg.log_every, enabled=self.info.is_main and not self.quiet)
        if self.info.is_main and not self.resume and self.taken():
            self.__exit__(None, None, None)
            raise SlmError(f"{self.out} already holds a {self.what}; pass --resume to continue it, or choose "
                           f"another --out")
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.__exit__(*exc)
            self._lock = None
        D.teardown()

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def report(self, text: str) -> None:
        """A line for people on rank 0's stderr."""
        self.progress.message(text)

    def taken(self) -> bool:
        return has_run(self.out, self.config_file) or any((self.out / m).exists() for m in self.markers)

    def start(self, config: dict | None = None) -> None:
        """Create and lock the directory (rank 0), and save the resolved configuration."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = RunLock(self.out, self.command).__enter__()
            if config is not None:
                write_json(self.out / self.config_file, config)
        D.barrier(self.info)

    def fit(self, task: TrainTask, metadata: dict | None = None) -> dict:
        """Train `task` in this directory (continuing from its newest checkpoint with --resume);
        returns the trainer's summary."""
        self.trainer = Trainer(task, self.cfg, self.out, self.info, self.progress, metadata=metadata)
        if self.resume:
            self.trainer.resume()
        return self.trainer.fit()

    def finish(self, summary: dict) -> None:
        """Write the summary file (rank 0)."""
        if self.is_main:
            write_json(self.out / self.summary_file, summary)
