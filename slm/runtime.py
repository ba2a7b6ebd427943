"""Where and in what precision to run: the device and dtype vocabulary every command shares.

One vocabulary of dtype names, `fp32`, `bf16` and `fp16` (with `f32`, `f16`, `float32`, ...
accepted as spellings of the same), plus `auto`, every command's default. What `auto` means
depends on what the dtype is for:

- training and evaluation (`--dtype` of train, finetune, eval, plan): the autocast dtype,
  bf16 where the hardware computes it natively (CUDA GPUs with bf16, CPUs with AVX-512 BF16
  or AMX), else fp32;
- weights for inference (`--dtype` of generate): fp32;
- exported files (`slm export --dtype`): fp32, or llama.cpp's q8_0 when asked for.
"""

from __future__ import annotations

import torch

from slm.errors import SlmError

AUTO = "auto"
DEFAULT_DEVICE = AUTO
DEFAULT_DTYPE = AUTO
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPELLINGS = {"f32": "fp32", "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "f16": "fp16",
             "float16": "fp16", "half": "fp16"}
AUTOCAST_DTYPES = (AUTO, "fp32", "bf16")  # what training and evaluation compute in
WEIGHT_DTYPES = (AUTO, "fp32", "bf16", "fp16")  # what inference keeps weights in


def resolve_device(name: str = DEFAULT_DEVICE) -> torch.device:
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SlmError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SlmError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None


def dtype_name(text: str, allowed: tuple[str, ...] = (AUTO, *DTYPES)) -> str:
    """The canonical name of a dtype spelling, refused when not one of `allowed`."""
    name = SPELLINGS.get(str(text).lower(), str(text).lower())
    if name not in allowed:
        raise SlmError(f"dtype {text!r} is not one of {', '.join(allowed)} here")
    return name


def resolve_dtype(name: str) -> torch.dtype:
    """The weight dtype for inference (`auto`: fp32)."""
    name = dtype_name(name, WEIGHT_DTYPES)
    return torch.float32 if name == AUTO else DTYPES[name]


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for training and evaluation: under `auto`, bf16 where the hardware has it natively."""
    name = dtype_name(name, AUTOCAST_DTYPES)
    if name != AUTO:
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16_native() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast when `dtype` is bf16; a no-op context for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX-512 BF16 or AMX)."""
    caps = torch.backends.cpu.get_cpu_capability()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        flags = ""
    return "avx512_bf16" in flags or "amx_bf16" in flags or caps.startswith("AMX")
