"""Open any model slm can run from one `--model` spec: for inference (`open_model`) or for
training (`load_base`).

Accepted specs, in the order they are tried:
- a model alias (`smollm2-135m-instruct`) or a `.gguf` file: loaded with transformers;
- an slm artifact directory, by its kind (slm/artifacts.py): "gpt" (model.py's GPT),
  "gpt-quantized" and "hf-quantized" (slm/quant/artifact.py), "finetune" (its standalone
  model, or its base with the LoRA adapter merged in);
- a directory that stands for an artifact (a training run: its best, else latest, checkpoint);
- a Hugging Face model directory (config.json without "format": "slm"), or a hub id.

Every path ends in a `LoadedModel`: a model with the GPT call interface and a tokenizer with
slm's tokenizer interface, whatever produced them. `load_base` gives a model in its trainable
layout instead (what fine-tuning and distillation start from).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from slm.artifacts import (FINETUNE, GPT_KIND, GPT_QUANTIZED, HF_KIND, HF_QUANTIZED, LoadedModel, artifact_kind,
                           load_model, read_config, resolve_artifact_dir)
from slm.errors import SlmError
from slm.inference import for_inference
from slm.interop.hf_causal import ALIASES, HFTokenizer, load_hf
from slm.lora import load_adapter, merge
from slm.quant.artifact import load_gpt_quantized, load_hf_quantized
from slm.tokenizer import TokenizerIdentity, check_identity, get_tokenizer


def load_slm_gpt(path: Path, device, dtype) -> LoadedModel:
    model, art = load_model(path, device=device, dtype=dtype)
    return LoadedModel(for_inference(model), get_tokenizer(), path.name, GPT_KIND, str(path), art.raw)


def open_model(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load whatever `spec` names, ready for inference (eval mode, decode-friendly layout)."""
    spec_s = str(spec)
    if spec_s in ALIASES or spec_s.endswith(".gguf"):
        model, tok = load_hf(spec_s, device, dtype or torch.float32)
        return LoadedModel(model, tok, spec_s if spec_s in ALIASES else Path(spec_s).stem, HF_KIND, spec_s)
    path = Path(spec_s)
    if path.is_dir():
        path = resolve_artifact_dir(path)
        kind = artifact_kind(path)
        if kind is not None:
            if kind not in LOADERS:
                raise SlmError(f"{path} holds an slm artifact of kind {kind!r}, which this slm cannot load; upgrade slm")
            return LOADERS[kind](path, device, dtype)
        if (path / "config.json").is_file():
            model, tok = load_hf(path, device, dtype or torch.float32)
            return LoadedModel(model, tok, path.name, HF_KIND, str(path))
        raise SlmError(f"{path} is not a model directory: no config.json (slm or Hugging Face) found")
    if path.exists():
        raise SlmError(f"{path} is a file, not a model directory (give the directory, or a .gguf file)")
    if "/" in spec_s and not spec_s.startswith((".", "/")) and spec_s.count("/") == 1:
        model, tok = load_hf(spec_s, device, dtype or torch.float32)  # a hub id: needs the network
        return LoadedModel(model, tok, spec_s, HF_KIND, spec_s)
    raise SlmError(f"model not found: {spec_s} does not exist (give a model directory, a .gguf file, "
                   f"a Hugging Face hub id, or one of: {', '.join(ALIASES)})")


# ---------------------------------------------------------------------------- trainable models


@dataclass
class Base:
    """A model in its trainable layout, with its tokenizer."""

    model: nn.Module  # slm GPT or interop.hf_causal.HFCausalLM
    tokenizer: object
    kind: str  # GPT_KIND or HF_KIND
    spec: str  # how to find it again (an absolute path for local directories and files)


def load_base(spec: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> Base:
    """The model to train from: an slm model or run directory, a Hugging Face directory or hub
    id, a .gguf file, or an alias; a fine-tune's standalone model works too."""
    spec_s = str(spec)
    path = Path(spec_s)
    if spec_s not in ALIASES and path.exists():
        spec_s = str(path.resolve())
    if path.is_dir():
        path = resolve_artifact_dir(path)
        kind = artifact_kind(path)
        if kind == GPT_KIND:
            model, _ = load_model(path, device=device, dtype=dtype)
            return Base(model, get_tokenizer(), GPT_KIND, str(path.resolve()))
        if kind == FINETUNE and read_config(path).get("model"):
            return load_base(path / read_config(path)["model"], device, dtype)
        if kind is not None:
            raise SlmError(f"{path} holds an slm {kind!r} artifact without a standalone model to fine-tune "
                           f"(fine-tune from a model directory, or re-run the fine-tune with --merge)")
        if not (path / "config.json").is_file():
            raise SlmError(f"{path} is not a model directory: no config.json (slm or Hugging Face) found")
    elif path.is_file() and not spec_s.endswith(".gguf"):
        raise SlmError(f"{path} is a file, not a model directory (give the directory, or a .gguf file)")
    model, tok = load_hf(spec_s, device, dtype)
    return Base(model, tok, HF_KIND, spec_s)


# ---------------------------------------------------------------------------- fine-tunes


def check_tokenizer(tokenizer, recorded: dict | None, what: str) -> None:
    """Refuse a tokenizer other than the recorded one. A Hugging Face tokenizer's name is only
    where it was loaded from (the base's id, then the merged directory), so for those the
    fingerprint decides, and the tokenizer takes the recorded name."""
    if isinstance(tokenizer, HFTokenizer) and isinstance(recorded, dict) and "name" in recorded:
        renamed = TokenizerIdentity(str(recorded["name"]), tokenizer.identity.fingerprint)
        check_identity(renamed, recorded, what)
        tokenizer.identity = renamed
        return
    tokenizer.check(recorded, what)


def load_finetuned(path: Path, device, dtype) -> LoadedModel:
    """A fine-tune: its standalone model, or its base with the adapter merged in."""
    raw = read_config(path)
    recorded = raw.get("tokenizer")
    if raw.get("model"):
        loaded = open_model(path / raw["model"], device=device, dtype=dtype)
        check_tokenizer(loaded.tokenizer, recorded, f"fine-tuned model {path}")
        return dataclasses.replace(loaded, name=path.name, kind=FINETUNE, path=str(path), info=raw)
    if not raw.get("adapter"):
        raise SlmError(f"{path} names neither a model nor an adapter; the fine-tune did not finish")
    base = load_base(raw["base"], device)
    check_tokenizer(base.tokenizer, recorded, f"the adapter in {path} (base {raw['base']})")
    merge(load_adapter(base.model, path / raw["adapter"]))
    model = for_inference(base.model) if base.kind == GPT_KIND else base.model.eval()
    if dtype is not None:
        model = model.to(dtype)
    return LoadedModel(model, base.tokenizer, path.name, FINETUNE, str(path), raw)


# kind in config.json -> loader(path, device, dtype)
LOADERS = {GPT_KIND: load_slm_gpt, GPT_QUANTIZED: load_gpt_quantized, HF_QUANTIZED: load_hf_quantized,
           FINETUNE: load_finetuned}
