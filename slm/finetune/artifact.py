"""The fine-tune output directory, and loading it wherever slm takes `--model`.

    OUT/config.json   {"format": "slm", "kind": "finetune", "base": SPEC, "base_kind": "hf"|"gpt",
                       "method": "lora"|"full", "tokenizer": {identity}, "adapter": "adapter"|null,
                       "model": "model"|null, "metadata": {settings, data, results}}
    OUT/adapter/      the LoRA adapter alone (peft format; Hugging Face tokenizer files beside it)
    OUT/model/        a standalone model (`--merge`, or `--method full`): a Hugging Face model
                      directory with its tokenizer, or an slm model directory

`open_model(OUT)` (registered as the artifact kind "finetune") loads OUT/model when present,
else the base model plus the adapter, merged in memory. Either way the tokenizer must be the
one the fine-tune recorded: a different tokenizer would read the ids as other text, so a
mismatch is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import slm
from slm.artifacts import FORMAT, FORMAT_VERSION, load_model, read_config, save_model, write_json
from slm.errors import SlmError
from slm.lora import load_adapter, merge, save_adapter
from slm.loading import LoadedModel, open_model, resolve_artifact_dir
from slm.model import GPT

KIND = "finetune"


@dataclass
class Base:
    """A base model in its trainable layout, with its tokenizer."""

    model: nn.Module  # slm GPT or interop.hf_causal.HFCausalLM
    tokenizer: object
    kind: str  # "gpt" or "hf"
    spec: str  # how to find it again (an absolute path for local directories and files)


def load_base(spec: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> Base:
    """The model to fine-tune: an slm model or run directory, a Hugging Face directory or hub
    id, a .gguf file, or an alias; a fine-tune's standalone model works too."""
    from slm.interop.hf_causal import ALIASES, load_hf
    from slm.tokenizer import get_tokenizer

    spec_s = str(spec)
    path = Path(spec_s)
    if spec_s not in ALIASES and path.exists():
        spec_s = str(path.resolve())
    if path.is_dir():
        path = resolve_artifact_dir(path)
        raw = _slm_config(path)
        if raw is not None:
            kind = raw.get("kind", "gpt")
            if kind == "gpt":
                model, _ = load_model(path, device=device, dtype=dtype)
                return Base(model, get_tokenizer(), "gpt", str(path.resolve()))
            if kind == KIND and raw.get("model"):
                return load_base(path / raw["model"], device, dtype)
            raise SlmError(f"{path} holds an slm {kind!r} artifact without a standalone model to fine-tune "
                           f"(fine-tune from a model directory, or re-run the fine-tune with --merge)")
        if not (path / "config.json").is_file():
            raise SlmError(f"{path} is not a model directory: no config.json (slm or Hugging Face) found")
    elif path.is_file() and not spec_s.endswith(".gguf"):
        raise SlmError(f"{path} is a file, not a model directory (give the directory, or a .gguf file)")
    model, tok = load_hf(spec_s, device, dtype)
    return Base(model, tok, "hf", spec_s)


def _slm_config(path: Path) -> dict | None:
    if not (path / "config.json").is_file():
        return None
    try:
        return read_config(path)
    except SlmError:
        return None  # a Hugging Face config.json


def save_standalone(model: nn.Module, base: Base, directory: Path, metadata: dict) -> None:
    if isinstance(model, GPT):
        save_model(directory, model, base.tokenizer, metadata)
    else:
        model.hf.save_pretrained(str(directory))
        base.tokenizer.hf.save_pretrained(str(directory))


def finetune_config(base: Base, method: str, adapter: str | None, model: str | None, metadata: dict) -> dict:
    """config.json of a fine-tune artifact; `adapter`/`model` are paths relative to it ("." = beside it)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": KIND, "slm_version": slm.__version__,
            "base": base.spec, "base_kind": base.kind, "method": method,
            "tokenizer": base.tokenizer.identity.to_dict(), "adapter": adapter, "model": model,
            "metadata": metadata}


def write_finetune(out: str | Path, base: Base, method: str, peft_model=None, merge_adapter: bool = False,
                   metadata: dict | None = None) -> dict:
    """Write the adapter (LoRA) and/or the standalone model, then config.json, which names
    only what is complete."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = model = None
    if peft_model is not None:
        save_adapter(peft_model, out / "adapter")
        if base.kind == "hf":
            base.tokenizer.hf.save_pretrained(str(out / "adapter"))
        adapter = "adapter"
    if method == "full" or merge_adapter:
        if peft_model is not None:
            merge(peft_model)  # in place: base.model now holds the merged weights
        base.model.eval()
        save_standalone(base.model, base, out / "model", {"created_by": "slm finetune", "base": base.spec})
        model = "model"
    cfg = finetune_config(base, method, adapter, model, metadata or {})
    write_json(out / "config.json", cfg)
    return cfg


def check_tokenizer(tokenizer, recorded: dict | None, what: str) -> None:
    """Refuse a tokenizer other than the recorded one. A Hugging Face tokenizer's name is only
    where it was loaded from (the base's id, then the merged directory), so for those the
    fingerprint decides, and the tokenizer takes the recorded name."""
    from slm.interop.hf_causal import HFTokenizer
    from slm.tokenizer import TokenizerIdentity, check_identity

    if isinstance(tokenizer, HFTokenizer) and isinstance(recorded, dict) and "name" in recorded:
        renamed = TokenizerIdentity(str(recorded["name"]), tokenizer.identity.fingerprint)
        check_identity(renamed, recorded, what)
        tokenizer.identity = renamed
        return
    tokenizer.check(recorded, what)


def load_finetuned(path: Path, device, dtype) -> LoadedModel:
    """ARTIFACT_LOADERS entry for "finetune": the standalone model, or base + adapter merged."""
    from slm.inference import for_inference

    raw = read_config(path)
    recorded = raw.get("tokenizer")
    if raw.get("model"):
        loaded = open_model(path / raw["model"], device=device, dtype=dtype)
        check_tokenizer(loaded.tokenizer, recorded, f"fine-tuned model {path}")
        return dataclasses.replace(loaded, name=path.name, kind=KIND, path=str(path), info=raw)
    if not raw.get("adapter"):
        raise SlmError(f"{path} names neither a model nor an adapter; the fine-tune did not finish")
    base = load_base(raw["base"], device)
    check_tokenizer(base.tokenizer, recorded, f"the adapter in {path} (base {raw['base']})")
    merge(load_adapter(base.model, path / raw["adapter"]))
    model = for_inference(base.model) if base.kind == "gpt" else base.model.eval()
    if dtype is not None:
        model = model.to(dtype)
    return LoadedModel(model, base.tokenizer, path.name, KIND, str(path), raw)
