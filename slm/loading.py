"""Open any model slm can run from one `--model` spec, for generation, evaluation and serving.

Accepted specs, in the order they are tried:
- a model alias (`smollm2-135m-instruct`) or a `.gguf` file: loaded with transformers;
- an slm artifact directory (config.json with "format": "slm"), by its `kind`:
  "gpt" (model.py's GPT) or any kind registered in `ARTIFACT_LOADERS`;
- a directory that `resolve_model_dir` maps to an artifact (e.g. a training run's best or
  latest checkpoint);
- a Hugging Face model directory (config.json without "format": "slm"), or a hub id.

Every path ends in a `LoadedModel`: a model with the GPT call interface and a tokenizer with
slm's tokenizer interface, whatever produced them. Training code loads slm models directly
with `checkpoint.load_model`, which keeps the trainable layout.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from slm.errors import SlmError

# kind in config.json -> "module:function(path, device, dtype) -> LoadedModel"
ARTIFACT_LOADERS: dict[str, str] = {
    "gpt": "slm.loading:load_slm_gpt",
    "gpt-quantized": "slm.quant.artifact:load_gpt_quantized",
    "hf-quantized": "slm.quant.artifact:load_hf_quantized",
    "finetune": "slm.finetune.artifact:load_finetuned",
}
# Functions "module:function(path) -> Path | None" that map a directory which is not itself an
# artifact (e.g. a training run) to the artifact directory to load.
DIRECTORY_RESOLVERS: list[str] = [
    "slm.engine.checkpoints:find_model_dir",  # a training run: its best checkpoint, else its latest
]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # slm.tokenizer.Tokenizer or interop.hf_causal.HFTokenizer
    name: str
    kind: str  # "gpt", another registered artifact kind, or "hf"
    path: str
    info: dict = field(default_factory=dict)  # the artifact's config.json, when it has one

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "has_chat_template", False))


def _call(target: str, *args):
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)(*args)


def load_slm_gpt(path: Path, device, dtype) -> LoadedModel:
    from slm.artifacts import load_model
    from slm.inference import for_inference
    from slm.tokenizer import get_tokenizer

    model, art = load_model(path, device=device, dtype=dtype)
    return LoadedModel(for_inference(model), get_tokenizer(), path.name, "gpt", str(path), art.raw)


def _slm_kind(path: Path) -> str | None:
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        raw = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return raw.get("kind", "gpt") if isinstance(raw, dict) and raw.get("format") == "slm" else None


def resolve_artifact_dir(path: Path) -> Path:
    """The artifact directory a spec directory stands for (itself, or what a resolver says)."""
    if _slm_kind(path) is not None:
        return path
    for resolver in DIRECTORY_RESOLVERS:
        found = _call(resolver, path)
        if found is not None:
            return Path(found)
    return path


def open_model(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load whatever `spec` names, ready for inference (eval mode, decode-friendly layout)."""
    from slm.interop.hf_causal import ALIASES, load_hf

    spec_s = str(spec)
    if spec_s in ALIASES or spec_s.endswith(".gguf"):
        model, tok = load_hf(spec_s, device, dtype or torch.float32)
        return LoadedModel(model, tok, spec_s if spec_s in ALIASES else Path(spec_s).stem, "hf", spec_s)
    path = Path(spec_s)
    if path.is_dir():
        path = resolve_artifact_dir(path)
        kind = _slm_kind(path)
        if kind is not None:
            if kind not in ARTIFACT_LOADERS:
                raise SlmError(f"{path} holds an slm artifact of kind {kind!r}, which this slm cannot load; upgrade slm")
            return _call(ARTIFACT_LOADERS[kind], path, device, dtype)
        if (path / "config.json").is_file():
            model, tok = load_hf(path, device, dtype or torch.float32)
            return LoadedModel(model, tok, path.name, "hf", str(path))
        raise SlmError(f"{path} is not a model directory: no config.json (slm or Hugging Face) found")
    if path.exists():
        raise SlmError(f"{path} is a file, not a model directory (give the directory, or a .gguf file)")
    if "/" in spec_s and not spec_s.startswith((".", "/")) and spec_s.count("/") == 1:
        model, tok = load_hf(spec_s, device, dtype or torch.float32)  # a hub id: needs the network
        return LoadedModel(model, tok, spec_s, "hf", spec_s)
    raise SlmError(f"model not found: {spec_s} does not exist (give a model directory, a .gguf file, "
                   f"a Hugging Face hub id, or one of: {', '.join(ALIASES)})")
