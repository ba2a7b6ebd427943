"""LoRA through peft, for Hugging Face causal LMs and slm's GPT alike.

peft replaces the targeted `nn.Linear` layers in place by LoRA layers (frozen base weight +
trainable low-rank A, B), so the model object keeps its class and call signature: slm's GPT
still answers `model(idx, targets)`, a transformers model still runs inside `HFCausalLM`.

Targets: for transformers models peft's "all-linear" (every projection, not the output head);
for slm's GPT the attention and MLP projections `c_attn`, `c_proj`, `c_fc` (the head is tied
to the token embedding and stays frozen).

The adapter is saved on its own in peft's format (adapter_config.json +
adapter_model.safetensors), which `peft.PeftModel.from_pretrained` reads too; merging folds
B @ A * alpha / r into each base weight, giving a plain model with the same outputs.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from slm.errors import SlmError
from slm.model import GPT

GPT_TARGETS = ["c_attn", "c_proj", "c_fc"]  # LoRA on slm's GPT: every projection, not the tied head
HF_TARGETS = "all-linear"  # peft: every linear layer of a transformers model except its output head


@dataclass
class LoraSettings:
    """LoRA's shape: rank, scale, dropout and which layers get adapters."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale numerator (the update is B A * alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_targets: list[str] | None = field(default=None, metadata={
        "help": "module names to adapt (default: every projection: all-linear for transformers models, "
                f"{' '.join(GPT_TARGETS)} for slm's GPT)"})

    def __post_init__(self):
        if self.lora_r < 1:
            raise SlmError(f"lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SlmError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@contextlib.contextmanager
def quiet_peft():
    """Hide two harmless notices: transformers' deprecation of a call peft makes, and peft not
    finding a base config.json to check the vocabulary against (slm records the tokenizer)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message="Could not find a config file")
        yield


def inner_module(model: nn.Module) -> nn.Module:
    """What peft wraps: the transformers model inside `HFCausalLM`, or the GPT itself."""
    return model if isinstance(model, GPT) else model.hf


def apply_lora(model: nn.Module, s: LoraSettings):
    """Add LoRA layers to `model` in place; returns the peft wrapper (for saving and merging)."""
    from peft import LoraConfig, get_peft_model

    targets = s.lora_targets or (GPT_TARGETS if isinstance(model, GPT) else HF_TARGETS)
    cfg = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules=targets)
    try:
        with quiet_peft():
            return get_peft_model(inner_module(model), cfg)
    except ValueError as e:  # e.g. target names that match no module
        raise SlmError(f"cannot add LoRA layers: {str(e).splitlines()[0]}") from None


def checkpoint_activations(model: nn.Module) -> None:
    """Train keeping only each layer's input; the layer reruns in the backward pass. The
    non-reentrant form replays dropout exactly and needs no gradient on the (frozen) inputs."""
    if isinstance(model, GPT):
        model.checkpoint_blocks = True
    elif hasattr(model.hf, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def save_adapter(peft_model, directory: str | Path) -> Path:
    """adapter_config.json + adapter_model.safetensors in `directory` (peft's layout)."""
    with quiet_peft():
        peft_model.save_pretrained(str(directory))
    (Path(directory) / "README.md").unlink(missing_ok=True)  # peft's model-card stub
    return Path(directory)


def load_adapter(model: nn.Module, directory: str | Path, trainable: bool = False):
    """Attach a saved adapter to `model` (in place); returns the peft wrapper."""
    from peft import PeftModel

    try:
        with quiet_peft():
            return PeftModel.from_pretrained(inner_module(model), str(directory), is_trainable=trainable)
    except (ValueError, KeyError, OSError) as e:
        raise SlmError(f"cannot load the LoRA adapter in {directory}: {str(e).splitlines()[0]}") from None


def merge(peft_model) -> nn.Module:
    """Fold the adapter into the base weights; returns the plain inner model."""
    with quiet_peft():
        return peft_model.merge_and_unload()
