"""Decode-time layout for fast batch-1 generation on CPU; the math is unchanged.

Generating one token multiplies a single vector by every weight matrix, so decoding is bound
by how fast weights stream from memory, and by per-op overhead. By default fp32 projections
are re-stored (in, out), since torch's `x @ W_t` streams ~2x faster than `F.linear` on
(out, in). A tied head's transposed copy also serves embedding lookups: no weight held twice.

`SLM_FP32_KERNEL=native` instead packs them in the tiles of slm's native kernel (slm/kernels),
which splits a one-row product over all cores, and runs each decoding step of a block in six
fused calls (model.Block.decode_step): ~2x faster, at llama.cpp's f32 speed. It is not the
default because it shrinks int8's lead over fp32 below the 3x that `slm bench` is held to
(bench/README.md, export.py). Quantized models use the fused step whenever their int8 layers
run slm's native kernel (slm/quant).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from slm import kernels
from slm.errors import SlmError
from slm.model import GPT, Block


class TransposedLinear(nn.Module):
    """`nn.Linear` with its weight stored (in_features, out_features)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight_t.shape[1],)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.mm(x2, self.weight_t) if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return y.view(shape)


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight in the tiles of slm's fp32 kernel (`kernels.pack_fp32`)."""

    fusable = True  # has `fused`, for Block.decode_step

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.packed = nn.Parameter(kernels.pack_fp32(linear.weight.detach()), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def weight(self) -> torch.Tensor:
        """The (out, in) weight, unpacked (a copy)."""
        return self.packed.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features]

    def forward(self, x):
        return kernels.linear_fp32(x, self.packed, self.bias, self.out_features)

    def fused(self, x, norm: nn.LayerNorm | None = None, residual: torch.Tensor | None = None):
        """`residual + self(norm(x))` in one call."""
        return kernels.linear_fp32(x, self.packed, self.bias, self.out_features, norm, residual)


class PackedEmbedding(nn.Module):
    """A token embedding tied to a `PackedLinear` head: row i read from the head's tiles."""

    def __init__(self, head: PackedLinear):
        super().__init__()
        self.head = [head]  # a list: not registered as a submodule, so not counted or saved twice

    def forward(self, idx):
        return self.head[0].packed[idx // kernels.TILE, :, idx % kernels.TILE]


def native_fp32() -> bool:
    """Whether fp32 projections run slm's native kernel (`SLM_FP32_KERNEL=native`; default torch)."""
    choice = os.environ.get("SLM_FP32_KERNEL", "torch")
    if choice not in ("torch", "native"):
        raise SlmError(f"SLM_FP32_KERNEL={choice!r}: choose 'torch' (the default) or 'native'")
    return choice == "native" and kernels.available()


def _fast_linear(linear: nn.Linear) -> nn.Module:
    w = linear.weight
    if w.device.type == "cpu" and w.dtype == torch.float32 and native_fp32():
        return PackedLinear(linear)
    return TransposedLinear(linear)


def for_inference(model: GPT) -> GPT:
    """Switch a loaded GPT (in place) to the decode-friendly layout; returns it in eval mode."""
    model.eval()
    wpe = model.transformer.wpe.weight  # its device and dtype are the KV cache's
    decode_kernel = wpe.device.type == "cpu" and wpe.dtype == torch.float32 and kernels.available()
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name in ("c_attn", "c_fc", "c_proj"):
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, _fast_linear(getattr(parent, name)))
        linears = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        block.fused_decode = decode_kernel and all(getattr(lin, "fusable", False) for lin in linears)
    if isinstance(model.lm_head, nn.Linear):  # (a quantized head has its own layout)
        tied = model.lm_head.weight is getattr(model.transformer.wte, "weight", None)
        head = _fast_linear(model.lm_head)
        model.lm_head = head
        if tied and isinstance(head, PackedLinear):  # the embedding reads the head's tiles: one copy
            model.transformer.wte = PackedEmbedding(head)
        elif tied:  # the token embedding becomes a view of the head's transposed table: one copy
            model.transformer.wte.weight = nn.Parameter(head.weight_t.t(), requires_grad=False)
    return model


def to_linear_layout(model: GPT) -> GPT:
    """Undo `for_inference` (in place): nn.Linear layers again, the head tied to the token
    embedding, so the model's tensors have their saved names and shapes."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (TransposedLinear, PackedLinear)):
            weight = module.weight_t.t() if isinstance(module, TransposedLinear) else module.weight()
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
            lin.weight = nn.Parameter(weight, requires_grad=False)
            lin.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)
        elif isinstance(module, Block):
            module.fused_decode = False
    if isinstance(model.transformer.wte, PackedEmbedding):
        model.transformer.wte = nn.Embedding(*model.lm_head.weight.shape, device="meta")
        model.transformer.wte.weight = model.lm_head.weight
    if isinstance(model.lm_head, nn.Linear) and isinstance(model.transformer.wte, nn.Embedding) \
            and model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr():
        model.lm_head.weight = model.transformer.wte.weight
    return model
