"""Where and in what precision to run: device and dtype names shared by every command."""

from __future__ import annotations

import torch

from slm.errors import SlmError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SlmError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SlmError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SlmError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
