"""Training checkpoints in a run directory: atomic, verified, retained by policy, found for resume.

A checkpoint is a directory `step-0000120/` inside the run directory:

    model.safetensors, config.json   an slm model directory (loadable wherever --model is taken)
    optimizer.safetensors            AdamW moments and step counts, keyed "<parameter name>/<key>"
    trainer.json                     step, tokens, schedule, guards, RNG and data-stream state (JSON)
    manifest.json                    size and SHA-256 of every file above; written last

Everything is written into a hidden temporary directory, fsynced, and renamed into place, so a
`step-*` directory is complete or absent. A checkpoint damaged later (truncated copy, bit rot)
fails its manifest and is reported and skipped on resume. Nothing here unpickles: tensors are
safetensors, the rest JSON.

The manager knows nothing about models: the caller gives it a function that writes the model
files, and tensors and JSON for the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from slm.artifacts import CHECKPOINT_STATE_FILE, best_checkpoint, checkpoint_name, read_tensors, run_checkpoints
from slm.io import atomic_write, atomic_write_bytes, fsync_dir, sha256_file

MANIFEST = "manifest.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = CHECKPOINT_STATE_FILE  # the step's trainer state; its name is part of the run layout (artifacts.py)


class CorruptCheckpoint(Exception):
    pass


@dataclass
class SaveStats:
    seconds: float
    bytes: int


def verify(path: Path) -> dict:
    """The checkpoint's trainer state, after checking every file against the manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CorruptCheckpoint("no manifest.json (incomplete)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise CorruptCheckpoint("manifest.json is damaged") from None
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        if f.stat().st_size != info["bytes"]:
            raise CorruptCheckpoint(f"{name} is {f.stat().st_size} bytes, {info['bytes']} were written")
        if sha256_file(f) != info["sha256"]:
            raise CorruptCheckpoint(f"{name} does not match its checksum")
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{STATE_FILE} unreadable: {e}") from None


def optimizer_to_tensors(osd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A full, name-keyed optimizer state dict -> safetensors tensors + JSON param groups."""
    tensors = {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{name}/{key}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, groups


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict] = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


class CheckpointManager:
    """Save, list, verify, retain and find the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, report: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.report = report

    # ------------------------------------------------------------------------ listing

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, oldest first (complete by construction; verify() checks it)."""
        return run_checkpoints(self.run_dir)

    def latest_valid(self, set_aside: bool = False) -> tuple[Path, dict] | None:
        """The newest checkpoint that passes verification; damaged ones are reported and skipped
        (and with `set_aside`, renamed out of the listing so nothing loads or keeps them as a step)."""
        for path in reversed(self.checkpoints()):
            try:
                return path, verify(path)
            except CorruptCheckpoint as e:
                if set_aside:
                    self.set_aside(path, e)
                else:
                    self.report(f"checkpoint {path.name} is incomplete or corrupt ({e}); skipping it")
        return None

    def set_aside(self, path: Path, reason: Exception) -> Path:
        """Rename a damaged checkpoint to a hidden name (kept for inspection, never deleted)."""
        dest = self.run_dir / f".corrupt-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, dest)
        fsync_dir(self.run_dir)
        self.report(f"checkpoint {path.name} is incomplete or corrupt ({reason}); skipping it, moved to {dest.name}")
        return dest

    def best(self) -> Path | None:
        """The checkpoint with the lowest validation loss measured at its step, if any has one."""
        return best_checkpoint(self.run_dir)

    def clean_temporaries(self) -> None:
        """Remove what an interrupted save or prune left behind (hidden .tmp-/.trash- dirs)."""
        if not self.run_dir.is_dir():
            return
        for p in self.run_dir.iterdir():
            if p.is_dir() and p.name.startswith((".tmp-step-", ".trash-step-")):
                if p.name.startswith(".tmp-"):
                    self.report(f"removing incomplete checkpoint {p.name} (a save was interrupted)")
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------------ writing

    def save(self, step: int, write_model: Callable[[Path], None], optimizer_tensors: dict[str, torch.Tensor],
             state: dict) -> SaveStats:
        """Write checkpoint `step` atomically, then apply the retention policy."""
        t0 = time.perf_counter()
        final = self.run_dir / checkpoint_name(step)
        if final.exists():
            try:
                verify(final)
                return SaveStats(0.0, 0)  # saved already at this step (e.g. a periodic save, then the final one)
            except CorruptCheckpoint as e:  # left by an earlier, broken run: keep it aside, never under its name
                self.set_aside(final, e)
        tmp = self.run_dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_model(tmp)
        atomic_write(tmp / OPTIMIZER_FILE, lambda p: save_file(optimizer_tensors, str(p), metadata={"format": "pt"}))
        atomic_write_bytes(tmp / STATE_FILE, (json.dumps(state, indent=1) + "\n").encode())
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        atomic_write_bytes(tmp / MANIFEST, (json.dumps({"step": step, "files": files}, indent=1) + "\n").encode())
        os.replace(tmp, final)
        fsync_dir(self.run_dir)
        self.prune()
        return SaveStats(time.perf_counter() - t0, sum(f["bytes"] for f in files.values()))

    def prune(self) -> None:
        """Keep the last `keep_last` checkpoints and the best by validation loss; delete the rest."""
        ckpts = self.checkpoints()
        keep = set(ckpts[-self.keep_last:])
        best = self.best()
        if best is not None:
            keep.add(best)
        for path in ckpts:
            if path not in keep:
                trash = self.run_dir / f".trash-{path.name}"
                os.replace(path, trash)  # gone from the listing at once, even if rmtree is interrupted
                shutil.rmtree(trash, ignore_errors=True)


def load_optimizer(path: Path) -> dict:
    """The name-keyed optimizer state of a verified checkpoint."""
    state = json.loads((path / STATE_FILE).read_text())
    return optimizer_from_tensors(read_tensors(path / OPTIMIZER_FILE), state["optimizer_param_groups"])
