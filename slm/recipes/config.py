"""The recipes' typed settings: `slm train`'s and `slm finetune`'s flags and config files come from these.

Pretraining: `RunConfig` (model shape, data, loop), read three ways, later ones winning: the
dataclass defaults, a config file (TOML or YAML, or a run's saved `train_config.json`), and
command-line flags. A config file holds the same keys as the flags, either flat (`lr = 6e-4`,
`data = "wiki-vital"`, `preset = "tiny"`) or in `[model]`, `[data]` and `[train]` sections,
which is how a run saves its resolved configuration.

Fine-tuning: `FinetuneConfig` (what to tune, on which examples) and `FinetuneTrainConfig` (the
loop's knobs with fine-tuning defaults); LoRA's shape is `lora.LoraSettings`.

Kept apart from the recipes, so building the CLI does not import peft or transformers.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from slm.artifacts import read_run_config
from slm.config import ModelConfig, resolve_model_config
from slm.data import DataConfig
from slm.engine.config import TrainConfig
from slm.errors import SlmError
from slm.tasks.encode import TRUNCATION
from slm.tasks.examples import FORMATS


# ---------------------------------------------------------------------------- pretraining


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


def load_run_config(directory: Path) -> dict:
    """A run's saved config as layered values (for --resume), or {} if it has none."""
    raw = read_run_config(directory)
    if not raw:
        return {}
    return {"preset": raw.get("preset"), "model": raw["model"], "data": raw["data"], "train": raw["train"]}


# ---------------------------------------------------------------------------- fine-tuning


@dataclass
class FinetuneConfig:
    """What to fine-tune, on which examples, and how they become sequences."""

    base: str = field(default="smollm2-135m-instruct", metadata={
        "help": "model to fine-tune: slm model or run directory, Hugging Face directory or hub id, .gguf file, alias"})
    data: str | None = field(default=None, metadata={
        "help": "training examples: .jsonl, .json, .parquet or hf:DATASET[:SPLIT]"})
    val_data: str | None = field(default=None, metadata={
        "help": "held-out examples (default: carved off --data deterministically)"})
    format: str | None = field(default=None, metadata={
        "help": "data layout (default: detected from the columns)", "choices": list(FORMATS)})
    method: str = field(default="lora", metadata={"help": "lora (adapter) or full (every weight)",
                                                  "choices": ["lora", "full"]})
    max_seq_len: int = field(default=768, metadata={"help": "tokens per example, prompt + completion"})
    truncation: str = field(default="drop", metadata={
        "help": "longer examples: drop them, or cut the prompt's start (left)", "choices": list(TRUNCATION)})
    epochs: float | None = field(default=None, metadata={"help": "train this many passes (instead of --max-steps)"})
    holdout_fraction: float = field(default=0.05, metadata={"help": "share of --data held out when no --val-data"})
    holdout_max: int = field(default=64, metadata={"help": "held-out examples at most"})
    limit: int | None = field(default=None, metadata={"help": "read at most N examples of --data"})
    merge: bool = field(default=False, metadata={"help": "also write OUT/model: the base with the adapter merged in"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "keep only each layer's input and recompute the rest in the backward pass: much less memory "
                "for more compute (measured in bench/README.md)"})

    def __post_init__(self):
        if self.max_seq_len < 8:
            raise SlmError(f"max_seq_len must be at least 8, got {self.max_seq_len}")
        if self.epochs is not None and self.epochs <= 0:
            raise SlmError(f"epochs must be positive, got {self.epochs}")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """The training loop's options with fine-tuning defaults: a small LoRA on CPU for minutes."""

    batch_size: int = field(default=3, metadata={"help": "sequences per micro-batch per device"})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay on matrices and embeddings"})
    eval_every: int = field(default=50, metadata={"help": "validate every N steps (0 = only at the end)"})
    ckpt_minutes: float | None = field(default=10.0, metadata={"help": "checkpoint every M minutes"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept besides the best by validation loss"})
    seed: int = field(default=0, metadata={"help": "seed for LoRA initialization, data order and dropout"})
