"""Calibration for static int8: the range of every Linear layer's input over sample batches.

Static int8 fixes each layer's activation scale ahead of time, so it needs to see typical
inputs: `input_ranges` runs the fp32 model over token batches with a hook on each layer
and keeps the running minimum and maximum (torch.ao's MinMaxObserver). The batches come
from the train split of a data source (`calibration_batches`): `--calib-data`, else the
data the model was trained on when `--model` is a training run, else wiki-vital
(`calibration_data`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from slm.artifacts import read_run_config
from slm.data import DataConfig, TokenStream
from slm.errors import SlmError
from slm.quant.quantize import QuantConfig
from slm.tokenizer import require_gpt2


def calibration_data(model: str, cfg: QuantConfig) -> DataConfig:
    """What static int8 calibrates on: `cfg.calib_data`, else the data of the training run
    that `model` is (or is a checkpoint of), else the embedded corpus wiki-vital."""
    if cfg.calib_data:
        return DataConfig(source=cfg.calib_data)
    path = Path(model)
    for run_dir in (path, path.parent) if path.is_dir() else ():
        run = read_run_config(run_dir)
        if run.get("data"):  # a few batches: no loader processes
            return dataclasses.replace(DataConfig(**run["data"]), num_workers=0)
    return DataConfig()


def calibration_batches(data: DataConfig, cfg: QuantConfig, tokenizer, model: str, block_size: int
                        ) -> list[torch.Tensor]:
    """Up to `cfg.calib_batches` batches of token ids from the train split of `data`."""
    require_gpt2(tokenizer, model, "static-int8 cannot calibrate it on them; use dynamic-int8 or weight-int8")
    T = min(cfg.calib_seq_len, block_size)
    stream = TokenStream(data, split="train", block_size=T, batch_size=cfg.calib_batch_size, loop=False, seed=0)
    with contextlib.closing(stream):
        batches = [x for x, _ in itertools.islice(stream, cfg.calib_batches)]
    if not batches:
        raise SlmError(f"the train split of {data.source} is too small for one calibration batch of "
                       f"{cfg.calib_batch_size} x {T} tokens; give more data or a smaller --calib-batch-size")
    return batches


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
