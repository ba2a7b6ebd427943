"""The `export` command: an slm model as a transformers directory or a GGUF file."""

from __future__ import annotations

import json

from slm.cli.options import add_dtype, add_json, add_model, add_out

# slm's dtype names -> GGUF weight types (auto: the exact one)
GGUF_TYPES = {"auto": "f32", "fp32": "f32", "fp16": "f16", "q8_0": "q8_0"}


def register(sub) -> None:
    p = sub.add_parser("export", help="export an slm model for transformers (hf) or llama.cpp/Ollama (gguf)")
    add_model(p, help="slm model directory (or a run directory)")
    p.add_argument("--format", required=True, choices=["hf", "gguf"], help="hf: a transformers directory; gguf: one file")
    add_out(p, "output directory (hf) or .gguf file (gguf)")
    add_dtype(p, tuple(GGUF_TYPES), "GGUF weight type: fp32 (f32), fp16 (f16) or llama.cpp's int8 q8_0 (auto: fp32); "
                                    "the hf export is fp32")
    add_json(p, '{"format", "out", "dtype", "bytes"}')
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from slm.errors import SlmError
    from slm.interop.export import export_gguf, export_hf

    dtype = GGUF_TYPES[args.dtype]
    if args.format == "hf":
        if dtype != "f32":
            raise SlmError("--dtype applies to --format gguf; the hf export is fp32")
        out = export_hf(args.model, args.out)
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    else:
        out = export_gguf(args.model, args.out, dtype)
        size = out.stat().st_size
    if args.json:
        print(json.dumps({"format": args.format, "out": str(out), "dtype": dtype, "bytes": size}))
    else:
        print(f"wrote {out} ({args.format}, {dtype}, {size / 1e6:.1f} MB)")
    return 0
