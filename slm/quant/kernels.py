"""Integer matrix-multiply kernels this torch build offers on CPU, found at run time.

Quantized layers (layers.py) keep portable tensors: int8 weights with one fp32 scale per
output channel, or int4 groups. How they are multiplied is decided when a layer is built,
from what this torch provides (measured on the 124M model at batch 1: bench/quant.py):

- "native": slm's own int8 kernel (slm/kernels), built for this CPU on first use: it splits a
  batch-1 product over torch's threads, which no torch kernel does, and streams weights packed
  for AVX512-VNNI (plain vectorized loops elsewhere). The same math as fbgemm's.
- "fbgemm": the x86 int8 GEMM behind torch.ao's dynamic quantization
  (`quantized::linear_dynamic`, and `quantized::linear_with_input_q_dq_qweight_dq_output_fp32`
  for a calibrated input scale). torch.ao.quantization is deprecated in favour of torchao;
  these ops live in ATen, and should a later torch drop them the layers fall back below.
- "int_mm": `torch._int_mm` (int8 x int8 -> int32), the portable ATen op torchao builds on,
  with the activations quantized per row in Python.
- "int8pack": `aten._weight_int8pack_mm`, weight-only int8 with bf16 activations.
- "int4pack": `aten._weight_int4pack_mm_for_cpu`, int4 groups with bf16 activations.
- "reference": dequantize and multiply in fp32. Correct everywhere and slow: the last resort,
  and the yardstick in tests.

Each detector runs the op once on a tiny input, since an op can be registered and still
refuse this CPU (e.g. fbgemm on ARM). `SLM_QUANT_KERNEL=NAME` forces a kernel where it applies.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from slm import kernels as native

FBGEMM_ENGINES = ("x86", "fbgemm")


def forced_kernel() -> str | None:
    return os.environ.get("SLM_QUANT_KERNEL") or None


def _works(fn) -> bool:
    try:
        fn()
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def has_fbgemm() -> bool:
    """fbgemm int8 GEMMs with per-channel weights (x86 CPUs)."""

    def probe():
        # Read inside the probe: should torch.ao's engine setting go away, fall back, not crash.
        if torch.backends.quantized.engine not in FBGEMM_ENGINES:
            raise NotImplementedError(f"quantized engine {torch.backends.quantized.engine!r}")
        packed = fbgemm_pack(torch.ones(4, 8, dtype=torch.int8), torch.ones(4), None)
        torch.ops.quantized.linear_dynamic(torch.ones(1, 8), packed, False)
        torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(torch.ones(1, 8), 0.1, 0, packed)

    return _works(probe)


def has_native() -> bool:
    """slm's own kernels, when they build here (a C++ compiler is needed; slm/kernels)."""
    return native.available()


@functools.lru_cache(maxsize=None)
def has_int_mm() -> bool:
    return _works(lambda: torch._int_mm(torch.ones(1, 8, dtype=torch.int8), torch.ones(4, 8, dtype=torch.int8).t()))


@functools.lru_cache(maxsize=None)
def has_int8pack() -> bool:
    return _works(lambda: torch.ops.aten._weight_int8pack_mm(
        torch.ones(1, 64, dtype=torch.bfloat16), torch.ones(8, 64, dtype=torch.int8), torch.ones(8, dtype=torch.bfloat16)))


@functools.lru_cache(maxsize=None)
def has_int4pack() -> bool:
    def probe():
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 64, dtype=torch.int32), 1)
        sz = torch.ones(2, 16, 2, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(1, 64, dtype=torch.bfloat16), w, 32, sz)

    return _works(probe)


AVAILABLE = {"native": has_native, "fbgemm": has_fbgemm, "int_mm": has_int_mm, "int8pack": has_int8pack, "int4pack": has_int4pack, "reference": lambda: True}


def pick(candidates: tuple[str, ...], kernel: str | None = None) -> str:
    """The kernel to use: `kernel` (or $SLM_QUANT_KERNEL) if it applies and works here,
    else the first working one of `candidates` (fastest first; "reference" always works)."""
    wanted = kernel or forced_kernel()
    if wanted is not None and wanted in candidates and AVAILABLE[wanted]():
        return wanted
    return next(k for k in candidates if AVAILABLE[k]())


# ------------------------------------------------------------------------------ fbgemm


def fbgemm_pack(qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """Prepack int8 (out, in) weights with per-channel scales into fbgemm's layout (a copy)."""
    with warnings.catch_warnings():  # quantized tensors are deprecated with torch.ao: known, detected
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(
            qweight, scale.double(), torch.zeros(scale.numel(), dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qw, bias)


def fbgemm_unpack(packed) -> torch.Tensor:
    """The int8 (out, in) weights back from an fbgemm pack, exactly."""
    qw, _ = torch.ops.quantized.linear_unpack(packed)
    return qw.int_repr()


@functools.lru_cache(maxsize=None)
def fbgemm_reduce_range() -> bool:
    """Whether activations must use 7 bits: without VNNI, fbgemm multiplies uint8 by int8 in
    pairs summed into int16 (vpmaddubsw), which saturates with full-range activations. With
    VNNI (vpdpbusd accumulates in int32) the full 8 bits are exact, and twice as precise."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


def fbgemm_dynamic(x: torch.Tensor, packed) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, packed, fbgemm_reduce_range())


def fbgemm_static(x: torch.Tensor, packed, input_scale: float, input_zero_point: int) -> torch.Tensor:
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, input_scale, input_zero_point, packed)


# ------------------------------------------------------------------------------ int8pack / int4pack


def aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """`t`, or an aligned copy of it (tensors in a safetensors memory map may sit at any byte)."""
    return t if t.data_ptr() % alignment == 0 else t.clone()


def int8pack_mm(x: torch.Tensor, qweight: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), qweight, scale_bf16).to(x.dtype)


def int4pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """torch's CPU int4 layout from codes q (out, in) in [0, 15] and per-group scale and zero
    (out, in // group), meaning w = (q - 8) * scale + zero."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group_size,
                                                      scales_and_zeros).to(x.dtype)
