"""GPT-2 weights to and from Hugging Face `transformers` layout.

HF's GPT2LMHeadModel stores its projections as `Conv1D` (weight shape (in, out)), ours as
`nn.Linear` (out, in); otherwise the names match nanoGPT's. This is what nanoGPT's
`from_pretrained` does, and `slm export --format hf` uses the reverse direction.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slm.config import GPT2_VOCAB, PADDED_VOCAB, ModelConfig
from slm.errors import SlmError

# Projections HF keeps as Conv1D, transposed relative to nn.Linear.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers found in older HF checkpoints.
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise SlmError(f"not a GPT-2 checkpoint: model_type is {hf.get('model_type')!r}")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise SlmError(f"unsupported GPT-2 activation {act!r}: slm's GPT uses the tanh GELU (gelu_new)")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise SlmError(f"unsupported layer_norm_epsilon {eps}: slm's GPT uses 1e-5 as GPT-2 does")
    if hf.get("vocab_size", GPT2_VOCAB) != GPT2_VOCAB:
        raise SlmError(
            f"this checkpoint has a vocabulary of {hf.get('vocab_size')} tokens, not GPT-2's {GPT2_VOCAB}: "
            f"it was made with another tokenizer, which slm's GPT-2 BPE would misread"
        )
    return ModelConfig(
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=PADDED_VOCAB,
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        bias=True,
    )


def tensors_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel tensors -> slm GPT tensors (lm_head tied, vocabulary padded)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(_BUFFERS) or k == "lm_head.weight":
            continue
        name = k if k.startswith("transformer.") else f"transformer.{k}"
        if name.endswith(_CONV1D):
            v = v.t()
        out[name] = v.contiguous()
    wte = out.get("transformer.wte.weight")
    if wte is None:
        raise SlmError("the checkpoint has no token embedding (transformer.wte.weight)")
    if wte.shape[0] < cfg.vocab_size:  # pad rows stay zero: their logits are masked at sampling
        pad = torch.zeros(cfg.vocab_size - wte.shape[0], wte.shape[1], dtype=wte.dtype)
        out["transformer.wte.weight"] = torch.cat([wte, pad])
    return out


def tensors_to_hf(sd: dict[str, torch.Tensor], vocab: int = GPT2_VOCAB) -> dict[str, torch.Tensor]:
    """slm GPT tensors -> HF GPT2LMHeadModel tensors (Conv1D layout, unpadded vocabulary)."""
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue
        if k.endswith(_CONV1D):
            v = v.t()
        if k == "transformer.wte.weight":
            v = v[:vocab]
        out[k] = v.contiguous()
    return out


def config_to_hf(cfg: ModelConfig, vocab: int = GPT2_VOCAB) -> dict:
    if not cfg.bias:
        raise SlmError("Hugging Face GPT-2 has biases everywhere; a model trained with bias=False cannot be exported as GPT-2")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": GPT2_VOCAB - 1,
        "eos_token_id": GPT2_VOCAB - 1,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def _read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    from slm.artifacts import read_tensors

    st = sorted(d.glob("*.safetensors"))
    if st:
        out = {}
        for f in st:
            out.update(read_tensors(f))
        return out
    bins = sorted(d.glob("pytorch_model*.bin"))
    if bins:
        out = {}
        for f in bins:  # weights_only: tensors only, no arbitrary objects are unpickled
            try:
                out.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:
                raise SlmError(f"cannot read {f} safely ({e}); convert it to safetensors first") from None
        return out
    raise SlmError(f"no weights in {d}: expected model.safetensors or pytorch_model.bin")


def check_gpt2_vocab(d: Path) -> None:
    """If the HF directory ships tokenizer files, they must be GPT-2's."""
    vocab = d / "vocab.json"
    if not vocab.is_file():
        return
    from slm.tokenizer import default_bpe_dir

    ours = json.loads((default_bpe_dir() / "encoder.json").read_text())
    if json.loads(vocab.read_text()) != ours:
        raise SlmError(f"the tokenizer in {d} (vocab.json) is not GPT-2's BPE; slm's models use GPT-2's")


def load_hf_gpt2(d: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a local Hugging Face GPT-2 directory (config.json + weights)."""
    d = Path(d)
    if not (d / "config.json").is_file():
        raise SlmError(f"{d} is not a Hugging Face model directory (no config.json)")
    cfg = config_from_hf(json.loads((d / "config.json").read_text()))
    check_gpt2_vocab(d)
    return cfg, tensors_from_hf(_read_hf_weights(d), cfg)


def gpt2_hf_tokenizer():
    """transformers' GPT-2 tokenizer built from the same verified offline files as slm's."""
    from transformers import GPT2Tokenizer

    from slm.tokenizer import default_bpe_dir, get_tokenizer

    get_tokenizer()  # verifies the files' hashes before transformers reads them
    d = default_bpe_dir()
    merges = d.joinpath("vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # drop "#version"
    return GPT2Tokenizer(vocab=json.loads(d.joinpath("encoder.json").read_text(encoding="utf-8")),
                         merges=[tuple(m.split()) for m in merges if m], model_max_length=1024)
