"""Quantization command: quantize."""

from __future__ import annotations

import json

from slm.cli.options import add_dataclass_args, add_json, add_model, add_out, from_args
from slm.quant.quantize import QuantConfig


def register(sub) -> None:
    p = sub.add_parser("quantize", help="write an int8/int4 copy of a model (slm GPT or Hugging Face causal LM)")
    add_model(p)
    add_out(p, "output directory for the quantized model")
    add_dataclass_args(p, QuantConfig)
    add_json(p, "one JSON object summarizing the result")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from slm.recipes.quantize import quantize_to_dir

    cfg = from_args(QuantConfig, args)
    summary = quantize_to_dir(args.model, args.out, cfg)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"wrote {summary['out']} ({summary['kind']}, {summary['method']}): {summary['quantized_modules']} modules quantized, "
          f"{len(summary['float_modules'])} kept float {summary['float_modules'][:4]}")
    print(f"weights {summary['file_bytes'] / 1e6:.1f} MB, {summary['size_ratio']:.0%} of fp32 "
          f"({summary['float_bytes'] / 1e6:.1f} MB)")
    if summary["calibration"]:
        c = summary["calibration"]
        print(f"calibrated on {c['batches']} batches of {' x '.join(map(str, c['batch_shape']))} tokens "
              f"from the train split of {c['source']}")
    return 0
