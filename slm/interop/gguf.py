"""GPT-2 models to and from GGUF, the file format of llama.cpp (and of Ollama, LM Studio, and
transformers' GGUF loader), written and read with the `gguf` package.

An slm GPT is GPT-2's architecture, so it exports as GGUF architecture `gpt2` with llama.cpp's
tensor names, GPT-2's BPE vocabulary and merges embedded (the same files slm verifies), and
metadata naming slm and the tokenizer identity. The head is tied: llama.cpp and transformers
reuse `token_embd.weight` when `output.weight` is absent, so it is stored once. Weights can be
f32, f16 or q8_0 (llama.cpp's int8: blocks of 32 values with one f16 scale); norms and biases
stay f32, as llama.cpp's own converter keeps them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import slm
from slm.config import GPT2_VOCAB, PADDED_VOCAB, ModelConfig
from slm.errors import SlmError

# slm tensor name suffixes (per block) -> llama.cpp's
_BLOCK = {
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
_TOP = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
        "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
DTYPES = ("f32", "f16", "q8_0")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise SlmError("GGUF files need the gguf package: pip install 'slm[hf]'") from None
    return gguf


def gguf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")  # transformer.h.{i}.{module...}.{weight|bias}
    if parts[:2] == ["transformer", "h"] and ".".join(parts[3:-1]) in _BLOCK:
        return f"blk.{parts[2]}.{_BLOCK['.'.join(parts[3:-1])]}.{parts[-1]}"
    raise SlmError(f"tensor {name} has no GGUF gpt2 counterpart")


def slm_name(name: str) -> str:
    inverse = {v: k for k, v in _TOP.items()}
    if name in inverse:
        return inverse[name]
    parts = name.split(".")  # blk.{i}.{gguf module}.{weight|bias}
    blocks = {v: k for k, v in _BLOCK.items()}
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in blocks:
        return f"transformer.h.{parts[1]}.{blocks[parts[2]]}.{parts[3]}"
    raise SlmError(f"GGUF tensor {name} is not part of a GPT-2 model")


def _gpt2_vocab() -> tuple[list[str], list[str]]:
    """GPT-2's tokens in id order (byte-level strings, as vocab.json has them) and merges."""
    from slm.tokenizer import default_bpe_dir, get_tokenizer

    get_tokenizer()  # verifies the files' hashes first
    d = default_bpe_dir()
    enc = json.loads(d.joinpath("encoder.json").read_text(encoding="utf-8"))
    tokens = [t for t, _ in sorted(enc.items(), key=lambda kv: kv[1])]
    merges = [m for m in d.joinpath("vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if m]
    return tokens, merges


def write_gguf(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path, dtype: str = "f32",
               name: str = "slm-gpt", tokenizer_identity: dict | None = None) -> Path:
    """Write slm GPT tensors (nn.Linear layout, tied head not included) as a gpt2 GGUF file."""
    gguf = _gguf()
    if dtype not in DTYPES:
        raise SlmError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not cfg.bias:
        raise SlmError("llama.cpp's gpt2 architecture has biases everywhere; a model trained with bias=False "
                       "cannot be exported as GGUF gpt2")
    if dtype == "q8_0" and cfg.n_embd % 32:
        raise SlmError(f"q8_0 quantizes rows in blocks of 32 values; n_embd {cfg.n_embd} is not a multiple of 32 "
                       f"(use --dtype f16 or f32)")
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "gpt2")
    w.add_type("model")
    w.add_name(name)
    w.add_description(f"exported by slm {slm.__version__}")
    w.add_string("slm.version", slm.__version__)
    if tokenizer_identity:
        w.add_string("slm.tokenizer.name", str(tokenizer_identity["name"]))
        w.add_string("slm.tokenizer.fingerprint", str(tokenizer_identity["fingerprint"]))
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(1e-5)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, merges = _gpt2_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i == GPT2_VOCAB - 1 else gguf.TokenType.NORMAL
                       for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(GPT2_VOCAB - 1)
    w.add_eos_token_id(GPT2_VOCAB - 1)
    w.add_add_bos_token(False)

    for k, t in tensors.items():
        if k == "lm_head.weight":
            continue  # tied: readers reuse token_embd.weight
        a = t.detach().float().cpu()
        if k == "transformer.wte.weight":
            a = a[:GPT2_VOCAB]  # the padding rows are no tokens
        a = a.numpy()
        if a.ndim == 1 or dtype == "f32" or (k == "transformer.wpe.weight" and dtype == "q8_0"):
            w.add_tensor(gguf_name(k), a.astype(np.float32))
        elif dtype == "f16":
            w.add_tensor(gguf_name(k), a.astype(np.float16))
        else:
            w.add_tensor(gguf_name(k), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read_gguf_gpt2(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """A GPT-2 GGUF file -> (slm config, slm tensors (dequantized, fp32), GGUF metadata)."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"GGUF file not found: {path}")
    try:
        r = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise SlmError(f"{path} is not a readable GGUF file: {e}") from None
    arch = _field(r, "general.architecture")
    if arch != "gpt2":
        raise SlmError(f"{path} holds a {arch!r} model; slm converts GGUF files of architecture gpt2 only "
                       f"(other architectures load directly: slm generate --model {path})")
    tokens = _field(r, "tokenizer.ggml.tokens")
    if _field(r, "tokenizer.ggml.model") != "gpt2" or tokens != _gpt2_vocab()[0]:
        raise SlmError(f"the tokenizer embedded in {path} is not GPT-2's BPE; slm's models use GPT-2's")
    try:
        cfg = ModelConfig(block_size=int(_field(r, "gpt2.context_length")), vocab_size=PADDED_VOCAB,
                          n_layer=int(_field(r, "gpt2.block_count")), n_head=int(_field(r, "gpt2.attention.head_count")),
                          n_embd=int(_field(r, "gpt2.embedding_length")), bias=True)
    except TypeError:
        raise SlmError(f"{path} lacks gpt2 shape metadata (block_count, context_length, ...)") from None
    ff = _field(r, "gpt2.feed_forward_length")
    if ff is not None and int(ff) != 4 * cfg.n_embd:
        raise SlmError(f"{path} has a feed-forward width of {ff}, not 4 x {cfg.n_embd} as slm's GPT")
    eps = _field(r, "gpt2.attention.layer_norm_epsilon")
    if eps is not None and abs(float(eps) - 1e-5) > 1e-9:
        raise SlmError(f"{path} uses layer_norm_epsilon {eps}; slm's GPT uses 1e-5 as GPT-2 does")
    out: dict[str, torch.Tensor] = {}
    head = None
    for t in r.tensors:
        a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        a = a.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dimensions innermost first
        if t.name == "output.weight":
            head = torch.from_numpy(a.copy())
            continue
        out[slm_name(t.name)] = torch.from_numpy(a.copy())
    wte = out.get("transformer.wte.weight")
    if wte is None:
        raise SlmError(f"{path} has no token embedding (token_embd.weight)")
    if head is not None and not torch.equal(head, wte):
        raise SlmError(f"{path} has an output head that differs from its token embedding; slm's GPT ties them")
    pad = torch.zeros(PADDED_VOCAB - wte.shape[0], wte.shape[1])
    out["transformer.wte.weight"] = torch.cat([wte, pad])
    meta = {k: _field(r, k) for k in ("general.name", "slm.version", "slm.tokenizer.fingerprint", "general.file_type")
            if k in r.fields}
    return cfg, out, meta
