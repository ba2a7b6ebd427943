"""Quantization and benchmark commands: quantize, bench."""

from __future__ import annotations

import json
import sys

from slm.recipes.bench import BenchConfig, compare, table
from slm.cli.options import add_dataclass_args, from_args
from slm.quant.quantize import QuantConfig

MODEL_HELP = ("model directory, run directory, Hugging Face directory or hub id, .gguf file, "
              "or the alias smollm2-135m-instruct")


def register(sub) -> None:
    p = sub.add_parser("quantize", help="write an int8/int4 copy of a model (slm GPT or Hugging Face causal LM)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output directory for the quantized model")
    add_dataclass_args(p, QuantConfig)
    p.add_argument("--json", action="store_true", help="print one JSON object summarizing the result")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("bench", help="measure models side by side: size, load time, peak RSS, speed, quality")
    p.add_argument("--model", required=True, action="append", dest="models", metavar="MODEL",
                   help=MODEL_HELP + "; repeat for each model (ratios are to the first)")
    add_dataclass_args(p, BenchConfig)
    p.add_argument("--json", action="store_true",
                   help="print a JSON list, one object per model (model, file_bytes, peak_rss_bytes, "
                        "prefill_tok_s, decode_tok_s, perplexity/execution_accuracy when measured)")
    p.set_defaults(func=cmd_bench)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_quantize(args) -> int:
    from slm.quant.artifact import quantize_to_dir

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


def cmd_bench(args) -> int:
    cfg = from_args(BenchConfig, args)
    rows = compare(args.models, cfg, progress)
    if args.json:
        print(json.dumps(rows))
    else:
        print(table(rows))
    return 0
