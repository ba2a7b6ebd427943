"""What the hardware can do: GPU specs (memory, peak FLOPs, an assumed price) and CPU measurements.

GPU peaks are the vendors' dense tensor-core numbers (bf16; TF32 for fp32 matmuls). A CPU has
no datasheet number that means much, so its peak is measured: the best FLOP rate of large
matmuls in the given dtype with the threads this process uses. Prices are rough on-demand cloud
rates, printed as assumptions and overridable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from slm.errors import SlmError
from slm.memory import peak_rss_bytes


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gb: float
    bf16_tflops: float
    fp32_tflops: float  # TF32 tensor cores
    price_per_hour: float  # USD, an assumption


GPUS = {
    "h100": GPUSpec("NVIDIA H100 SXM 80GB", 80, 989.4, 494.7, 2.50),
    "h200": GPUSpec("NVIDIA H200 SXM 141GB", 141, 989.4, 494.7, 3.50),
    "a100": GPUSpec("NVIDIA A100 SXM 80GB", 80, 312.0, 156.0, 1.50),
    "a100-40gb": GPUSpec("NVIDIA A100 40GB", 40, 312.0, 156.0, 1.20),
    "l4": GPUSpec("NVIDIA L4 24GB", 24, 121.0, 60.0, 0.80),
}
DEVICE_CHOICES = ["cpu", "cuda", *GPUS]


def gpu_spec(name: str) -> GPUSpec:
    if name not in GPUS:
        raise SlmError(f"unknown device {name!r}; choose one of: {', '.join(DEVICE_CHOICES)}")
    return GPUS[name]


def detect_gpu(index: int = 0) -> str | None:
    """The GPUS key of an attached CUDA device, if it is one we know."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(index).upper()
    for key in ("H200", "H100", "A100", "L4"):
        if key in name:
            if key == "A100" and torch.cuda.get_device_properties(index).total_memory < 60e9:
                return "a100-40gb"
            return key.lower()
    return None


def cpu_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.3, fresh: bool = False
                    ) -> float:
    """Best measured FLOP/s of an n x n matmul on this CPU with this process's threads (measured
    once per process and arguments; `fresh` measures again and keeps the better of the two)."""
    key = (dtype, n, seconds)
    if fresh or key not in _PEAKS:
        _PEAKS[key] = max(_PEAKS.get(key, 0.0), _measure_matmul(dtype, n, seconds))
    return _PEAKS[key]


_PEAKS: dict[tuple, float] = {}


def _measure_matmul(dtype: torch.dtype, n: int, seconds: float) -> float:
    g = torch.Generator().manual_seed(0)  # its own generator: measuring must not move a seeded run's RNG
    a = torch.randn(n, n, dtype=dtype, generator=g)
    b = torch.randn(n, n, dtype=dtype, generator=g)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype, fresh: bool = False) -> float | None:
    """Peak matmul FLOP/s of the device training runs on: measured on CPU (`fresh`: again), datasheet
    on a known GPU."""
    if device.type == "cpu":
        return cpu_matmul_peak(dtype, fresh=fresh)
    key = detect_gpu(device.index or 0) if device.type == "cuda" else None
    if key is None:
        return None
    spec = GPUS[key]
    return 1e12 * (spec.bf16_tflops if dtype == torch.bfloat16 else spec.fp32_tflops)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every allocation from its heap and keep freed memory for
    reuse (M_MMAP_MAX=0, a high M_TRIM_THRESHOLD). By default it maps allocations above 32 MB
    fresh from the OS and unmaps them on free, so a training step's large tensors (logits,
    activations) are page-faulted and zeroed anew every step, a large share of the cross-entropy's
    time on a CPU (bench/train.py). Process-wide; the peak is reused, never exceeded.
    Returns whether it applied (glibc only)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 40))


def peak_memory(device: torch.device) -> int:
    """Peak memory of this process so far: resident set on CPU, allocated bytes on a GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()
