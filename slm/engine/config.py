"""Training configuration: `TrainConfig` (the loop's knobs), config files, and a run's resolved config.

`slm train` takes every option three ways, later ones winning: the dataclass defaults, a config
file (TOML or YAML, or a run's saved `train_config.json`), and command-line flags. A config file
holds the same keys as the flags, either flat (`lr = 6e-4`, `data = "wiki-vital"`,
`preset = "tiny"`) or in `[model]`, `[data]` and `[train]` sections, which is how a run saves its
resolved configuration. `TrainConfig` knows nothing about what is trained: fine-tuning reuses it.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from slm.config import ModelConfig, resolve_model_config
from slm.data import DataConfig
from slm.errors import SlmError

RUN_CONFIG_FILE = "train_config.json"


@dataclass
class TrainConfig:
    # -- length
    max_steps: int | None = field(default=None, metadata={
        "help": "optimizer steps to train; the LR schedule spans them"})
    max_minutes: float | None = field(default=None, metadata={
        "help": "wall-clock budget; without --max-steps the schedule spans the steps that fit"})
    # -- batch
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch per device"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    # -- optimizer and schedule
    lr: float = field(default=6e-4, metadata={"help": "peak learning rate"})
    min_lr: float | None = field(default=None, metadata={"help": "LR at the end of the cosine decay (default: lr/10)"})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "linear warmup steps (default: 100, at most a tenth of the run)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on matrices and embeddings"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    # -- evaluation
    eval_every: int = field(default=100, metadata={"help": "validate every N steps (0 = only at the end)"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation"})
    # -- checkpoints
    ckpt_every: int | None = field(default=None, metadata={"help": "checkpoint every N steps"})
    ckpt_minutes: float | None = field(default=30.0, metadata={"help": "checkpoint every M minutes"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept besides the best by validation loss"})
    # -- numerics and hardware
    seed: int = field(default=1337, metadata={"help": "seed for initialization, data order and dropout"})
    dtype: str = field(default="auto", metadata={
        "help": "bf16 autocast or fp32 (auto: bf16 where the CPU/GPU has native bf16)",
        "choices": ["auto", "fp32", "bf16"]})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (pays off on long runs)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads (default: one per core; on a busy machine 1 can be faster)"})
    fsdp: bool = field(default=False, metadata={"help": "shard weights, gradients and optimizer over ranks (FSDP)"})
    memory_gb: float | None = field(default=None, metadata={
        "help": "device memory to plan for, GB (default: what the device reports)"})
    check_memory: bool = field(default=True, metadata={"help": "refuse a configuration the plan says will not fit"})
    # -- stability
    max_bad_steps: int = field(default=5, metadata={
        "help": "consecutive non-finite steps (skipped) before the run stops"})
    spike_zscore: float = field(default=6.0, metadata={
        "help": "a loss this many standard deviations above the recent mean is a spike (0 = off)"})
    spike_window: int = field(default=50, metadata={"help": "steps in the running loss window for spikes"})
    spike_rollback: bool = field(default=False, metadata={
        "help": "on a spike, go back to the last checkpoint and lower the LR"})
    spike_lr_factor: float = field(default=0.5, metadata={"help": "LR multiplier applied at each rollback"})
    max_rollbacks: int = field(default=3, metadata={"help": "rollbacks before spikes are only logged"})
    # -- output
    log_every: int = field(default=10, metadata={"help": "console line every N steps when stderr is not a terminal"})

    def __post_init__(self) -> None:
        positive = ["batch_size", "grad_accum", "eval_batches", "keep_last", "max_bad_steps", "spike_window",
                    "log_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise SlmError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "ckpt_every", "warmup_steps", "threads"):
            v = getattr(self, name)
            if v is not None and v < (0 if name == "warmup_steps" else 1):
                raise SlmError(f"{name} must be positive, got {v}")
        for name in ("max_minutes", "ckpt_minutes", "memory_gb"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise SlmError(f"{name} must be positive, got {v}")
        if self.lr <= 0 or (self.min_lr is not None and not 0 <= self.min_lr <= self.lr):
            raise SlmError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        for name in ("weight_decay", "grad_clip", "eval_every", "spike_zscore", "max_rollbacks"):
            if getattr(self, name) < 0:
                raise SlmError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise SlmError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not 0 < self.spike_lr_factor <= 1:
            raise SlmError(f"spike_lr_factor must be in (0, 1], got {self.spike_lr_factor}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise SlmError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def warmup_for(self, horizon: int | None) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return 100 if horizon is None else min(100, horizon // 10)


# ---------------------------------------------------------------------------- a run's config


@dataclass
class RunConfig:
    """Everything `slm train` needs: model shape, data, loop. Saved as the run's train_config.json."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    preset: str | None = None

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": self.model.to_dict(), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train)}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# Flat keys: "data" names the source (as --data does); every other key is a field of exactly one.
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
_OWNER = {name: section for section, cls in SECTIONS.items() for name in _fields(cls)}
assert len(_OWNER) == sum(len(_fields(c)) for c in SECTIONS.values()), "config field names must be unique"


def read_config_file(path: str | Path) -> dict:
    """A TOML, YAML or JSON config file as {"preset"?, "model": {}, "data": {}, "train": {}}."""
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"config file not found: {path}")
    text = path.read_text()
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise SlmError(f"cannot parse config file {path}: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SlmError(f"config file {path} must hold a table of keys, not {type(raw).__name__}")
    return split_flat({str(k).replace("-", "_"): v for k, v in raw.items()}, where=str(path))


def split_flat(values: dict, where: str = "config") -> dict:
    """Sort flat keys (and [model]/[data]/[train] sections) into sections."""
    out: dict = {"model": {}, "data": {}, "train": {}}
    for key, value in values.items():
        if key == "preset":
            out["preset"] = value
        elif key in ("model", "train") or (key == "data" and isinstance(value, dict)):
            if not isinstance(value, dict):
                raise SlmError(f"{where}: [{key}] must be a table")
            for k, v in value.items():
                k = str(k).replace("-", "_")
                if k not in _fields(SECTIONS[key]):
                    raise SlmError(f"{where}: unknown key {k!r} in [{key}]; known: {', '.join(sorted(_fields(SECTIONS[key])))}")
                out[key][k] = v
        elif key == "data":
            out["data"]["source"] = value
        elif key in _OWNER and key != "source":
            out[_OWNER[key]][key] = value
        else:
            raise SlmError(f"{where}: unknown key {key!r}; use the names of the flags (e.g. lr, batch_size, "
                           f"data, preset, n_layer)")
    return out


def merge(*layers: dict) -> dict:
    """Later layers override earlier ones, key by key within each section."""
    out: dict = {"model": {}, "data": {}, "train": {}}
    for layer in layers:
        if layer.get("preset") is not None:
            out["preset"] = layer["preset"]  # the base shape; shape keys of every layer override it
        for section in SECTIONS:
            out[section].update({k: v for k, v in layer.get(section, {}).items() if v is not None})
    return out


def build_run_config(values: dict) -> RunConfig:
    model_keys = {k: v for k, v in values["model"].items() if k != "vocab_size"}
    model = resolve_model_config(values.get("preset"), **model_keys)
    if "vocab_size" in values["model"]:
        model = dataclasses.replace(model, vocab_size=values["model"]["vocab_size"])
    try:
        data = DataConfig(**values["data"])
        train = TrainConfig(**values["train"])
    except TypeError as e:
        raise SlmError(f"bad configuration: {e}") from None
    return RunConfig(model, data, train, values.get("preset"))


def save_run_config(directory: Path, cfg: RunConfig) -> None:
    from slm.artifacts import write_json

    write_json(directory / RUN_CONFIG_FILE, cfg.to_dict())


def load_run_config(directory: Path) -> dict:
    """A run's saved config as layered values (for --resume), or {} if it has none."""
    path = Path(directory) / RUN_CONFIG_FILE
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    return {"preset": raw.get("preset"), "model": raw["model"], "data": raw["data"], "train": raw["train"]}
