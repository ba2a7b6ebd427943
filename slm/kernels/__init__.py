"""slm's native CPU kernels (csrc/), compiled for this machine on first use.

Decoding one token multiplies a single row by every weight matrix and runs a dozen small ops
per layer, so on a CPU it is bound by how fast weights stream from memory and by per-op
dispatch. torch runs a one-row matrix product on one core (for fp32 and for int8 alike), and
its attention path costs ~10 ops per layer. These kernels are what slm needs beyond torch:
- `linear_int8` / `linear_fp32`: one-row-friendly products split over torch's threads, on
  weights packed in tiles that stream in order (int8: AVX512-VNNI; plain vectorized loops
  elsewhere). Used by slm's int8 layers (slm/quant) and its fp32 decode layout (slm/inference.py).
- `decode_attention`: attention of one new position against the KV cache, cache update
  included (slm/model.py).
bench/README.md (quant.py, export.py) has the measurements that motivate each.

They are torch operators (`torch.ops.slm.*`) built with torch's extension builder and run on
torch's own thread pool, so they share torch's threads instead of competing with them. The
build takes a few seconds and is cached per source, torch version and CPU (it is compiled with
-march=native) under $SLM_KERNEL_CACHE, default ~/.cache/slm/kernels. It needs a C++ compiler;
without one, `available()` is False, a warning says why, and slm uses torch's kernels.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

TILE = 16  # output rows per packed tile, in both linear kernels
SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("int8_linear.cpp", "linear.cpp", "attention.cpp"))


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _cflags() -> list[str]:
    flags = ["-O3", "-fopenmp"]  # -fopenmp: torch's parallel_for runs on torch's OpenMP threads
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    return flags


def cache_dir() -> Path:
    return Path(os.environ.get("SLM_KERNEL_CACHE") or Path.home() / ".cache" / "slm" / "kernels")


def build_name() -> str:
    """Names the build by everything that changes the binary, so a stale one is never loaded."""
    parts = [p.read_text() for p in SOURCES] + [torch.__version__, " ".join(_cflags()), platform.machine(), _cpu_flags()]
    return "slm_kernels_" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def load() -> str | None:
    """Load the kernels, building them if needed: None when they work, else why they don't."""
    try:
        from torch.utils import cpp_extension

        name = build_name()
        directory = cache_dir() / name
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / f"{name}.so").exists():
            print(f"slm: compiling its native CPU kernels for this machine (once, ~15 s) into {directory}",
                  file=sys.stderr, flush=True)
        # Builds only when the library is missing (a file lock guards concurrent builds), then loads it.
        cpp_extension.load(name, [str(s) for s in SOURCES], extra_cflags=_cflags(), extra_ldflags=["-fopenmp"],
                           build_directory=str(directory), is_python_module=False)
        return None
    except Exception as e:  # a missing compiler or ninja, a failed build: fall back, and say so
        lines = str(e).strip().splitlines() or [""]
        why = next((line.strip() for line in lines if "error:" in line), lines[-1])  # the compiler's first error
        warnings.warn(f"slm's native CPU kernels are unavailable ({type(e).__name__}: {why}); "
                      "slm uses torch's slower kernels. They need a C++ compiler (e.g. apt install g++) and ninja "
                      "(pip install ninja).", stacklevel=2)
        return str(e)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernels built and run here (`SLM_NATIVE_KERNELS=0` turns them off)."""
    if os.environ.get("SLM_NATIVE_KERNELS", "1") == "0" or load() is not None:
        return False
    try:  # run once: a library can load and still not run on this CPU
        linear_int8(torch.ones(1, 8), pack_int8(torch.ones(4, 8, dtype=torch.int8)), torch.ones(4),
                    torch.full((4,), 8, dtype=torch.int32), None, 4)
        return True
    except RuntimeError:
        return False


def pack_int8(qweight: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) -> the tiles `linear_int8` streams (zero padded)."""
    return torch.ops.slm.pack_int8(qweight)


def unpack_int8(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    return torch.ops.slm.unpack_int8(packed, out_features, in_features)


def linear_int8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, row_sums: torch.Tensor,
                bias: torch.Tensor | None, out_features: int, input_scale: float = 0.0, input_zero: int = 0,
                norm: torch.nn.LayerNorm | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) times int8 weights (per-row `scale`, `row_sums` = their int32 row sums), in
    fp32: each row of x quantized to uint8 by its own range, or by `input_scale`/`input_zero`
    if > 0. `norm` is applied to x first and `residual` added to the result, in the same call."""
    return torch.ops.slm.linear_int8(x, packed, scale, row_sums, bias, out_features, input_scale, input_zero,
                                     *_norm_args(norm), residual)


def pack_fp32(weight: torch.Tensor) -> torch.Tensor:
    """fp32 (out, in) -> (ceil(out / 16), in, 16) tiles, what `linear_fp32` streams (zero padded)."""
    return torch.ops.slm.pack_fp32(weight)


def linear_fp32(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                norm: torch.nn.LayerNorm | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) fp32 -> (..., out_features); `norm` and `residual` as in `linear_int8`."""
    return torch.ops.slm.linear_fp32(x, packed, bias, out_features, *_norm_args(norm), residual)


def _norm_args(norm: torch.nn.LayerNorm | None) -> tuple:
    return (None, None, 1e-5) if norm is None else (norm.weight, norm.bias, norm.eps)


def decode_attention(qkv: torch.Tensor, kv: torch.Tensor, pos: int) -> torch.Tensor:
    """qkv (B, 1, 3C) of one new position; kv (2, B, H, L, D) the cache, updated at `pos`."""
    return torch.ops.slm.decode_attention(qkv, kv, pos)
