"""Quantized layers: int8 and int4 linear layers and an int8 embedding table.

The math, in one place:
- int8 weights, symmetric, one scale per output channel: w ~ q * scale, q in [-127, 127].
- int4 weights, asymmetric groups of `group_size` inputs: w ~ (q - 8) * scale + zero, q in
  [0, 15], scale and zero per (output, group) in bf16 (torch's CPU int4 kernel's convention).
- activations of int8 layers: "dynamic" quantizes each input row on the fly; "static" uses
  the input range [lo, hi] measured on calibration data (calibrate.py), as uint8 with a zero
  point for the native and fbgemm kernels and symmetric int8 elsewhere; "weight" leaves them
  in floating point (bf16 into the weight-only kernel).

Each layer keeps or rebuilds the portable tensors (`tensors()`, what an artifact stores) and
runs with the fastest kernel this torch offers (kernels.py), chosen when it is built.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slm import kernels as native
from slm.errors import SlmError
from slm.quant import kernels

INT8_KERNELS = {
    "dynamic": ("native", "fbgemm", "int_mm", "reference"),
    "static": ("native", "fbgemm", "int_mm", "reference"),
    "weight": ("int8pack", "reference"),
}
INT4_KERNELS = ("int4pack", "reference")


# ------------------------------------------------------------------------------ the math


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (q int8 (out, in), scale fp32 (out,))."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 groups: (q uint8 (out, in) in [0, 15], scale, zero bf16 (out, in // group))."""
    n, k = w.shape
    if k % group_size:
        raise SlmError(f"int4 groups of {group_size} do not divide {k} input features")
    wg = w.detach().float().view(n, k // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    return q.to(torch.uint8).view(n, k), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    g = k // scale.shape[1]
    wg = (q.float().view(n, k // g, g) - 8) * scale.float()[..., None] + zero.float()[..., None]
    return wg.view(n, k)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(out, in) codes in [0, 15] -> (out, in // 2) bytes, even inputs in the low nibble."""
    return (q[:, 1::2] << 4 | q[:, ::2]).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)


# ------------------------------------------------------------------------------ layers


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights, per-channel scales, and dynamic, static or no
    activation quantization. A tied head passes the embedding's tensors (shared, not copied,
    except that the native and fbgemm kernels keep their own packed copy)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 activation: str = "dynamic", input_range: torch.Tensor | None = None, kernel: str | None = None):
        super().__init__()
        if activation not in INT8_KERNELS:
            raise SlmError(f"unknown int8 activation scheme {activation!r}; choose one of {', '.join(INT8_KERNELS)}")
        if (activation == "static") != (input_range is not None):
            raise SlmError("static int8, and only static int8, takes a calibrated input range")
        self.out_features, self.in_features = qweight.shape
        self.activation = activation
        self.kernel = kernels.pick(INT8_KERNELS[activation], kernel)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("input_range", None if input_range is None else input_range.float())
        if input_range is not None:
            lo, hi = min(float(input_range[0]), 0.0), max(float(input_range[1]), 0.0)
            levels = 127 if self.kernel == "fbgemm" and kernels.fbgemm_reduce_range() else 255  # see there
            self._uint8_scale = max(hi - lo, 1e-12) / levels  # native and fbgemm: uint8 with a zero point
            self._uint8_zero = int(round(-lo / self._uint8_scale))
            self._int8_scale = max(-lo, hi, 1e-12) / 127  # elsewhere: symmetric
        self._packed = None
        if self.kernel == "native":
            self._packed = native.pack_int8(qweight)
            self._row_sums = qweight.sum(dim=1, dtype=torch.int32)
            self._native_input = (self._uint8_scale, self._uint8_zero) if activation == "static" else (0.0, 0)
            self.qweight = None  # the packed copy holds the weights; tensors() unpacks them
        elif self.kernel == "fbgemm":
            self._packed = kernels.fbgemm_pack(qweight, self.scale, self.bias)
            self.qweight = None  # fbgemm holds the weights; tensors() unpacks them
        else:  # int8pack loads weights with aligned SIMD loads: copy a misaligned tensor
            self.register_buffer("qweight", kernels.aligned(qweight) if self.kernel == "int8pack" else qweight)
        self._scale_bf16 = self.scale.to(torch.bfloat16) if self.kernel == "int8pack" else None

    def weight_int8(self) -> torch.Tensor:
        if self.kernel == "native":
            return native.unpack_int8(self._packed, self.out_features, self.in_features)
        return self.qweight if self.qweight is not None else kernels.fbgemm_unpack(self._packed)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.weight_int8(), "scale": self.scale}
        if self.bias is not None:
            out["bias"] = self.bias
        if self.input_range is not None:
            out["input_range"] = self.input_range
        return out

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric int8 codes and scales of the input: per row (dynamic) or calibrated (static)."""
        if self.activation == "static":
            s = torch.full((x.shape[0], 1), self._int8_scale)
        else:
            s = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp_(min=1e-12)
        return torch.round(x / s).clamp_(-127, 127).to(torch.int8), s

    @property
    def fusable(self) -> bool:  # see slm.model.Block.decode_step
        return self.kernel == "native"

    def fused(self, x: torch.Tensor, norm: nn.LayerNorm | None = None, residual: torch.Tensor | None = None):
        """`residual + self(norm(x))` in one call (the native kernel only)."""
        return native.linear_int8(x, self._packed, self.scale, self._row_sums, self.bias, self.out_features,
                                  *self._native_input, norm, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":  # any leading dims, in one call (decoding is bound by per-op costs)
            return self.fused(x)
        if self.kernel == "fbgemm":  # any leading dims; fbgemm adds the bias
            if self.activation == "dynamic":
                return kernels.fbgemm_dynamic(x.float(), self._packed)
            return kernels.fbgemm_static(x.float(), self._packed, self._uint8_scale, self._uint8_zero)
        shape = x.shape[:-1] + (self.out_features,)
        x2 = _as_2d(x).float()
        if self.kernel == "int8pack":
            y = kernels.int8pack_mm(x2, self.qweight, self._scale_bf16)
        elif self.kernel == "int_mm":
            xq, xs = self._quantize_input(x2)
            y = torch._int_mm(xq, self.qweight.t()).float() * (xs * self.scale)
        else:  # reference: the same math in fp32
            if self.activation != "weight":
                xq, xs = self._quantize_input(x2)
                x2 = xq.float() * xs
            y = x2 @ dequantize_int8(self.qweight, self.scale).t()
        if self.bias is not None:
            y = y + self.bias
        return y.view(shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activation={self.activation}, kernel={self.kernel}")


class Int4Linear(nn.Module):
    """`nn.Linear` with int4 weights in groups of `group_size` inputs; activations in bf16."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None = None, kernel: str | None = None):
        """`qweight`: packed nibbles (out, in // 2) uint8, as `pack_nibbles` makes them."""
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = self.in_features // scale.shape[1]
        # torch's int4 CPU layout needs the outputs in tiles of 16.
        self.kernel = kernels.pick(INT4_KERNELS if self.out_features % 16 == 0 else ("reference",), kernel)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("zero", zero.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("qweight", qweight)
        if self.kernel == "int4pack":
            self._packed, self._scales_and_zeros = kernels.int4pack(unpack_nibbles(qweight), self.scale, self.zero)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scale": self.scale, "zero": self.zero}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1] + (self.out_features,)
        x2 = _as_2d(x).float()
        if self.kernel == "int4pack":
            y = kernels.int4pack_mm(x2, self._packed, self.group_size, self._scales_and_zeros)
        else:
            w = dequantize_int4(unpack_nibbles(self.qweight), self.scale, self.zero)
            y = x2.to(torch.bfloat16).float() @ w.t()
        if self.bias is not None:
            y = y + self.bias
        return y.view(shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, kernel={self.kernel}")


class Int8Embedding(nn.Module):
    """An embedding table stored int8 with one scale per row (per token)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scale": self.scale}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.qweight[idx].float() * self.scale[idx].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"
