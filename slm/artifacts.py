"""The model-directory format: one owner for what `config.json` says and how directories are found.

A model directory holds `model.safetensors` and `config.json`. config.json's header names the
format ("slm"), its version, the artifact's `kind`, the slm version, the tokenizer identity, the
size and SHA-256 of the weights, and a free-form `metadata` section; each kind adds its sections:

    "gpt"            an slm GPT: "model" (its shape)
    "gpt-quantized"  an slm GPT, int8/int4: "model", "quantization" (slm/quant/artifact.py)
    "hf-quantized"   a Hugging Face causal LM, int8/int4: "hf", "quantization" (slm/quant/artifact.py)
    "finetune"       a fine-tune: "base", "method", "adapter", "model" (slm/recipes/finetune.py)

Readers never unpickle anything, refuse a newer format, and turn a truncated or tampered
weights file into a clear `SlmError`. Writers go through slm/io.py: an artifact is complete or
absent, never half-written.

Directories that are not themselves artifacts resolve to one: a training run directory (its
`step-NNNNNNN/` checkpoints, each a "gpt" artifact, and `trainer.json` with the step's
validation loss) stands for its best checkpoint by validation loss, else its latest. The run
layout is read here; slm/engine writes it.

This module knows the formats, not the stages: loading any kind (slm/loading.py) and writing
the quantized and fine-tuned kinds live with the code that makes them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import slm
from slm.config import ModelConfig
from slm.errors import SlmError
from slm.io import atomic_write, sha256_file, write_json
from slm.model import GPT
from slm.tokenizer import Tokenizer, TokenizerIdentity, get_tokenizer

FORMAT = "slm"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TIED_KEYS = ("lm_head.weight",)  # tied to transformer.wte.weight, stored once

# kinds of artifact (config.json's "kind"); "hf" is what a plain Hugging Face model loads as
GPT_KIND = "gpt"
GPT_QUANTIZED = "gpt-quantized"
HF_QUANTIZED = "hf-quantized"
FINETUNE = "finetune"
HF_KIND = "hf"

# a training run directory (written by slm/engine)
RUN_CONFIG_FILE = "train_config.json"  # the run's resolved configuration
CHECKPOINT_STATE_FILE = "trainer.json"  # in each checkpoint: step, validation loss, ...
_CHECKPOINT = re.compile(r"^step-(\d+)$")


@dataclass
class Artifact:
    """What config.json says about a model directory."""

    path: Path
    model: ModelConfig
    tokenizer: TokenizerIdentity
    metadata: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)  # the whole config.json, for later sections


# ---------------------------------------------------------------------------- writing


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


def header(kind: str, tokenizer: TokenizerIdentity, metadata: dict | None = None, **sections) -> dict:
    """config.json of an artifact of `kind`: the common header plus the kind's sections
    (`save_tensors` adds "weights" when it writes them)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "slm_version": slm.__version__,
            **sections, "tokenizer": tokenizer.to_dict(), "metadata": metadata or {}}


def gpt_header(model_cfg: ModelConfig, tokenizer: TokenizerIdentity, metadata: dict | None = None,
               kind: str = GPT_KIND) -> dict:
    """config.json of an slm GPT (plain or quantized): the header and the model's shape."""
    return header(kind, tokenizer, metadata, model=model_cfg.to_dict())


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k not in TIED_KEYS}


def save_model(directory: str | Path, model: GPT, tokenizer: Tokenizer | None = None,
               metadata: dict | None = None) -> Path:
    tokenizer = tokenizer or get_tokenizer()
    cfg = gpt_header(model.config, tokenizer.identity, metadata)
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


def artifact_kind(directory: Path) -> str | None:
    """The kind of the slm artifact in `directory`, or None when it holds none (no config.json,
    or another program's, such as a Hugging Face model's)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return raw.get("kind", GPT_KIND) if isinstance(raw, dict) and raw.get("format") == FORMAT else None


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
    if art.raw.get("kind", GPT_KIND) != GPT_KIND:
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


@dataclass
class LoadedModel:
    """A model ready for inference, whatever its kind: the GPT call interface (model.py) and
    slm's tokenizer interface, with where it came from."""

    model: nn.Module
    tokenizer: object  # slm.tokenizer.Tokenizer or interop.hf_causal.HFTokenizer
    name: str
    kind: str  # an artifact kind, or HF_KIND
    path: str
    info: dict = field(default_factory=dict)  # the artifact's config.json, when it has one

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "has_chat_template", False))


# ---------------------------------------------------------------------------- training run directories


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_step(path: Path) -> int | None:
    m = _CHECKPOINT.match(path.name)
    return int(m.group(1)) if m else None


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint directories of a run, oldest first (complete by construction: the engine
    renames a checkpoint into place only once it is written)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def checkpoint_state(path: Path) -> dict | None:
    """A checkpoint's trainer.json, unverified (for listing), or None if unreadable."""
    try:
        return json.loads((Path(path) / CHECKPOINT_STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the lowest validation loss measured at its step, if any has one."""
    scored = []
    for path in run_checkpoints(run_dir):
        state = checkpoint_state(path)
        if state and state.get("val_loss") is not None:
            scored.append((state["val_loss"], checkpoint_step(path), path))
    return min(scored)[2] if scored else None


def find_model_dir(run_dir: Path) -> Path | None:
    """What `--model RUN_DIR` loads: the best checkpoint by validation loss, else the latest."""
    checkpoints = run_checkpoints(run_dir)
    if not checkpoints:
        return None
    return best_checkpoint(run_dir) or checkpoints[-1]


def resolve_artifact_dir(path: Path) -> Path:
    """The artifact directory a spec directory stands for: itself, or a training run's checkpoint."""
    path = Path(path)
    if artifact_kind(path) is not None:
        return path
    found = find_model_dir(path)
    return found if found is not None else path


def read_run_config(run_dir: Path) -> dict:
    """A run's resolved configuration (train_config.json) as saved, or {} when it has none."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SlmError(f"{path} is not valid JSON ({e}); the run directory is damaged") from None
    if not isinstance(raw, dict):
        raise SlmError(f"{path} does not hold a configuration; the run directory is damaged")
    return raw
