"""Model artifacts on disk: a directory with `model.safetensors` and `config.json`.

config.json holds the model shape, the tokenizer identity, the slm version, the SHA-256 and
size of the weights file, and a free-form `metadata` section. Loading never unpickles
anything, refuses a tokenizer mismatch, and turns a truncated or tampered weights file into
a clear `SlmError` instead of a stack trace from inside a library.

Files are written atomically (temporary name, fsync, rename): an artifact is complete or
absent, never half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import slm
from slm.config import ModelConfig
from slm.errors import SlmError
from slm.model import GPT
from slm.tokenizer import Tokenizer, TokenizerIdentity, get_tokenizer

FORMAT = "slm"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TIED_KEYS = ("lm_head.weight",)  # tied to transformer.wte.weight, stored once


@dataclass
class Artifact:
    """What config.json says about a model directory."""

    path: Path
    model: ModelConfig
    tokenizer: TokenizerIdentity
    metadata: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)  # the whole config.json, for later sections


# ---------------------------------------------------------------------------- writing


def atomic_write(path: str | Path, write) -> None:
    """`write(tmp_path)`, fsync, then rename over `path`; readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_tensors(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict,
                 weights_file: str = WEIGHTS_FILE) -> dict:
    """Write `tensors` and `config` (completed with the weights' hash) into `directory`.
    The weights go first, so a config.json always describes the weights beside it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / weights_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # save_file streams the tensors to disk: no second copy of the weights in memory
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt", "slm_version": slm.__version__}))
    config = dict(config)
    config["weights"] = {"file": weights_file, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    write_json(directory / CONFIG_FILE, config)
    return config


def model_config_json(model_cfg: ModelConfig, tokenizer: TokenizerIdentity, metadata: dict | None = None,
                      kind: str = "gpt") -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "slm_version": slm.__version__,
        "model": model_cfg.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "metadata": metadata or {},
    }


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k not in TIED_KEYS}


def save_model(directory: str | Path, model: GPT, tokenizer: Tokenizer | None = None,
               metadata: dict | None = None) -> Path:
    tokenizer = tokenizer or get_tokenizer()
    cfg = model_config_json(model.config, tokenizer.identity, metadata)
    save_tensors(directory, model_tensors(model), cfg)
    return Path(directory)


# ---------------------------------------------------------------------------- reading


def read_config(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.exists():
        raise SlmError(f"model not found: {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise SlmError(f"{directory} is not an slm model directory: it has no {CONFIG_FILE}")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SlmError(f"{path} is not valid JSON ({e}); the artifact is damaged") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise SlmError(f"{path} is not an slm artifact (no \"format\": \"slm\")")
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise SlmError(f"{directory} was written by a newer slm (format {cfg['format_version']}); upgrade slm")
    return cfg


def read_artifact(directory: str | Path) -> Artifact:
    directory = Path(directory)
    raw = read_config(directory)
    try:
        model_cfg = ModelConfig.from_dict(raw["model"])
        tok = raw["tokenizer"]
        identity = TokenizerIdentity(str(tok["name"]), str(tok["fingerprint"]))
    except (KeyError, TypeError) as e:
        raise SlmError(f"{directory / CONFIG_FILE} is missing {e}; the artifact is damaged") from None
    return Artifact(directory, model_cfg, identity, raw.get("metadata") or {}, raw)


def verify_weights(directory: Path, raw: dict) -> Path:
    """Check the weights file against the size and SHA-256 recorded in config.json."""
    info = raw.get("weights") or {}
    path = directory / info.get("file", WEIGHTS_FILE)
    if not path.is_file():
        raise SlmError(f"weights file missing: {path}")
    size = path.stat().st_size
    if "bytes" in info and size != info["bytes"]:
        raise SlmError(
            f"weights file {path} is {size} bytes, but {info['bytes']} were written: it is truncated "
            f"or was replaced. Re-copy the model directory or re-save the model."
        )
    if "sha256" in info:
        if sha256_file(path) != info["sha256"]:
            raise SlmError(
                f"weights file {path} does not match the checksum in {CONFIG_FILE}: it was modified "
                f"or corrupted after saving. Re-copy the model directory or re-save the model."
            )
    return path


class TensorFile:
    """A safetensors file read one tensor at a time (so loading never holds two copies of a
    model), with a damaged file reported as an `SlmError`."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt")
            self._keys = dict.fromkeys(self._f.keys())  # ordered, fast membership
        except (SafetensorError, OSError, ValueError) as e:
            raise self._damaged(e) from None

    def _damaged(self, e) -> SlmError:
        return SlmError(f"cannot read weights file {self.path}: {e}. The file is damaged; re-copy or re-save it.")

    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, backed by the file's memory map (no copy)."""
        self._check(name)
        try:
            return self._f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise self._damaged(e) from None

    def get_separate(self, name: str) -> torch.Tensor:
        """One tensor in a memory map of its own, no copy: its pages leave memory when the
        tensor is dropped, however long the rest of the file's tensors live (so a model can
        repack weights without keeping the originals resident), and pages never read (rows
        of an embedding table never looked up) are never loaded."""
        self._check(name)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise self._damaged(e) from None

    def _check(self, name: str) -> None:
        if name not in self._keys:
            raise SlmError(f"weights file {self.path} has no tensor {name!r}; the artifact is incomplete")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, as readable errors when the file is damaged."""
    f = TensorFile(path)
    return {k: f.get(k) for k in f.keys()}


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               tokenizer: Tokenizer | None = None) -> tuple[GPT, Artifact]:
    """Load an slm model directory. Refuses a tokenizer mismatch before reading weights."""
    art = read_artifact(directory)
    if art.raw.get("kind", "gpt") != "gpt":
        raise SlmError(f"{directory} holds a {art.raw.get('kind')!r} artifact, not a plain slm model")
    (tokenizer or get_tokenizer()).check(art.tokenizer, f"model {art.path}")
    tensors = read_tensors(verify_weights(art.path, art.raw))
    with torch.device("meta"):
        model = GPT(art.model)
    expected = model_tensors(model)
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise SlmError(
            f"weights in {art.path} do not fit the model config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise SlmError(f"weights in {art.path}: {k} has shape {tuple(t.shape)}, config expects {tuple(expected[k].shape)}")
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # re-tie after assign
    return model.to(device).eval(), art
