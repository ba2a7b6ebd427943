"""Quantization recipe: open a model, calibrate if the method needs it, quantize, write the artifact.

`quantize_to_dir(source, out, cfg)` is what `slm quantize` does. The methods are slm/quant's
(quantize.py, calibrate.py), the artifact format slm/quant/artifact.py's; this file composes
them for anything `open_model` loads: slm GPTs, fine-tunes, Hugging Face causal LMs.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import torch.nn as nn

from slm.artifacts import GPT_QUANTIZED, HF_QUANTIZED
from slm.errors import SlmError
from slm.inference import to_linear_layout
from slm.interop.hf_causal import HFCausalLM
from slm.loading import open_model
from slm.model import GPT
from slm.quant.artifact import write_quantized
from slm.quant.calibrate import calibration_batches, calibration_data, input_ranges
from slm.quant.quantize import QuantConfig, is_linear, quantize_model, quantized_state, resolve_method


def quantize_to_dir(source: str, out: str | Path, cfg: QuantConfig, calibration=None) -> dict:
    """Quantize the model `source` names into the directory `out`; returns a summary.
    static-int8 calibrates on batches from `cfg`'s calibration data (calibrate.py), or on the
    token batches `calibration(tokenizer, block_size)` yields when given."""
    out = Path(out)
    if Path(source).exists() and out.exists() and out.resolve() == Path(source).resolve():
        raise SlmError(f"--out {out} is the model being quantized; write the quantized copy elsewhere")
    loaded = open_model(source)
    if loaded.kind in (GPT_QUANTIZED, HF_QUANTIZED):
        raise SlmError(f"{source} is already quantized ({loaded.kind}); quantize the float model it came from")
    if isinstance(loaded.model, GPT):
        root = run = to_linear_layout(loaded.model)  # saved names and shapes
        embedding, head = "transformer.wte", "lm_head"
    elif isinstance(loaded.model, HFCausalLM):
        root, run = loaded.model.hf, loaded.model
        embedding, head = module_names(root)
    else:
        raise SlmError(f"{source}: quantizing a {type(loaded.model).__name__} is not supported")
    cfg = resolve_method(cfg, root)
    tokenizer = loaded.tokenizer
    float_bytes = sum(t.numel() * 4 for t in unique_tensors(root))

    ranges, calibrated_on = None, None
    if cfg.method == "static-int8":
        block = loaded.model.config.block_size
        if calibration is None:
            data = calibration_data(str(source), cfg)
            batches = calibration_batches(data, cfg, tokenizer, str(source), block)
            calibrated_on = {"source": data.source, "batches": len(batches), "batch_shape": list(batches[0].shape)}
        else:
            batches = calibration(tokenizer, block)
        linears = {n: m for n, m in root.named_modules() if is_linear(m)}
        ranges = input_ranges(run, linears, batches)
    info = quantize_model(root, cfg, embedding, head, ranges)
    if calibrated_on:
        info["calibration"] = calibrated_on
    tensors, aliases = quantized_state(root, info)
    info["aliases"] = aliases
    info["source"] = {"model": str(source), "kind": loaded.kind}
    written = write_quantized(out, root, tokenizer, info, tensors, {"created_by": "slm quantize"})
    n_linear = sum(1 for s in info["modules"].values() if s["type"] != "int8-embedding")
    return {"out": str(out), "kind": written["kind"], "method": cfg.method,
            "quantized_modules": len(info["modules"]), "quantized_linear": n_linear,
            "float_modules": info["float_modules"], "float_bytes": float_bytes, "calibration": calibrated_on,
            "file_bytes": written["weights"]["bytes"], "size_ratio": written["weights"]["bytes"] / float_bytes}


def module_names(hf_model: nn.Module) -> tuple[str, str | None]:
    """(token embedding, output layer) module names of a transformers model."""
    names = {id(m): n for n, m in hf_model.named_modules()}
    emb, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    return names[id(emb)], (names[id(head)] if head is not None else None)


def unique_tensors(root: nn.Module):
    seen = set()
    for t in chain(root.parameters(), root.buffers()):
        if t.data_ptr() not in seen and t.is_floating_point():
            seen.add(t.data_ptr())
            yield t
