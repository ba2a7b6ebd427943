"""Calibration for static int8: the range of every Linear layer's input over sample batches.

Static int8 fixes each layer's activation scale ahead of time, so it needs to see typical
inputs: `input_ranges` runs the fp32 model over token batches with a hook on each layer
and keeps the running minimum and maximum (torch.ao's MinMaxObserver). The batches come
from a data source (`calibration_batches`), by default the training stream.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from slm.errors import SlmError


def input_ranges(run: Callable[[torch.Tensor], object], modules: dict[str, nn.Module],
                 batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: tensor([min, max])} of the inputs each module saw while `run(idx)` ran."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}

    def hook(name):
        def record(_module, args):
            x = args[0].detach()
            lo[name] = min(lo.get(name, 0.0), float(x.min()))
            hi[name] = max(hi.get(name, 0.0), float(x.max()))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    n = 0
    try:
        with torch.inference_mode():
            for idx in batches:
                run(idx)
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise SlmError("calibration got no batches: the data source is empty")
    unseen = sorted(set(modules) - set(lo))
    if unseen:
        raise SlmError(f"calibration never reached {unseen[:3]}; is the model's forward using them?")
    return {name: torch.tensor([lo[name], hi[name]]) for name in modules}
