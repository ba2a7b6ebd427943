"""Decode-time layout for fast batch-1 generation on CPU; the math is unchanged.

Generating one token multiplies a single vector by every weight matrix, so decoding is bound
by how fast weights stream from memory, and by how many cores stream them. Measured on a
2-core AVX-512 CPU, one 768 x 3072 product for one token:

| layout                                  | 1 thread | 2 threads |
|-----------------------------------------|----------|-----------|
| `F.linear`, weight (out, in)            | 181 us   | 181 us    |
| `x @ W_t`, weight stored (in, out)      | 163 us   | 210 us    |
| oneDNN, weight pre-packed (`PackedLinear`) | 166 us | 97 us     |

torch's dense products run a one-row input on one core; oneDNN's packed product splits the
output columns over all of them. `for_inference` therefore packs every fp32 projection, and
the head, with oneDNN on CPUs where torch has it (x86); elsewhere it re-stores them transposed
(`TransposedLinear`), the tied head as a transposed copy of the embedding whose transpose view
also serves embedding lookups. Whole gpt2 model, 2 threads: 29 tok/s transposed, 39 packed,
45 with the head packed too and torch's allocator on huge pages (see slm/__init__.py).
"""

from __future__ import annotations

import platform

import torch
import torch.nn as nn

from slm.model import GPT


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
    """`nn.Linear` whose fp32 weight oneDNN has re-laid out for one-row inputs (CPU only).

    The packed tensor is opaque: `weight()` unpacks a dense copy when one is needed."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], "")
        return y.view(x.shape[:-1] + (self.out_features,))


def packs_with_onednn(linear: nn.Linear) -> bool:
    """oneDNN packs this layer: an fp32 weight on the CPU, in a torch built with oneDNN on x86."""
    return (linear.weight.device.type == "cpu" and linear.weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64"))


def for_inference(model: GPT) -> GPT:
    """Switch a loaded GPT (in place) to the decode-friendly layout; returns it in eval mode."""
    model.eval()
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name in ("c_attn", "c_fc", "c_proj"):
                linear = getattr(parent, name, None)
                if isinstance(linear, nn.Linear):
                    layer = PackedLinear if packs_with_onednn(linear) else TransposedLinear
                    setattr(parent, name, layer(linear))
    if isinstance(model.lm_head, nn.Linear) and packs_with_onednn(model.lm_head):
        # The packed table is opaque, so a tied embedding keeps its own dense copy: the head's
        # weight is held twice (V x d floats more), for a head product on every core (gpt2:
        # the head is a third of the weights each token streams).
        model.lm_head = PackedLinear(model.lm_head)
    elif isinstance(model.lm_head, nn.Linear):  # (a quantized head has its own layout)
        tied = model.lm_head.weight is getattr(model.transformer.wte, "weight", None)
        head = TransposedLinear(model.lm_head)
        model.lm_head = head
        if tied:  # the token embedding becomes a view of the head's transposed table: one copy
            model.transformer.wte.weight = nn.Parameter(head.weight_t.t(), requires_grad=False)
    return model


def to_linear_layout(model: GPT) -> GPT:
    """Undo `for_inference` (in place): nn.Linear layers again, the head tied to the token
    embedding, so the model's tensors have their saved names and shapes."""
    wte = model.transformer.wte
    if isinstance(model.lm_head, PackedLinear) and isinstance(wte, nn.Embedding) \
            and torch.equal(model.lm_head.weight(), wte.weight):  # tied, in two layouts
        model.lm_head = nn.Linear(*reversed(wte.weight.shape), bias=False, device="meta")
        model.lm_head.weight = wte.weight
    for name, module in list(model.named_modules()):
        if isinstance(module, (TransposedLinear, PackedLinear)):
            weight = module.weight_t.t() if isinstance(module, TransposedLinear) else module.weight()
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
            lin.weight = nn.Parameter(weight, requires_grad=False)
            lin.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)
    if isinstance(model.lm_head, nn.Linear) and isinstance(model.transformer.wte, nn.Embedding) \
            and model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr():
        model.lm_head.weight = model.transformer.wte.weight
    return model
