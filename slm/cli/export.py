"""The `export` command: an slm model as a transformers directory or a GGUF file."""

from __future__ import annotations

import json

from slm.interop.gguf import DTYPES


def register(sub) -> None:
    p = sub.add_parser("export", help="export an slm model for transformers (hf) or llama.cpp/Ollama (gguf)")
    p.add_argument("--model", required=True, help="slm model directory (or a run directory)")
    p.add_argument("--format", required=True, choices=["hf", "gguf"], help="hf: a transformers directory; gguf: one file")
    p.add_argument("--out", required=True, help="output directory (hf) or .gguf file (gguf)")
    p.add_argument("--dtype", choices=DTYPES, default="f32", help="GGUF weight type (default: f32)")
    p.add_argument("--json", action="store_true", help='print {"format", "out", "dtype", "bytes"}')
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from slm.errors import SlmError
    from slm.interop.export import export_gguf, export_hf

    if args.format == "hf":
        if args.dtype != "f32":
            raise SlmError("--dtype applies to --format gguf; the hf export is fp32")
        out = export_hf(args.model, args.out)
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    else:
        out = export_gguf(args.model, args.out, args.dtype)
        size = out.stat().st_size
    if args.json:
        print(json.dumps({"format": args.format, "out": str(out), "dtype": args.dtype, "bytes": size}))
    else:
        print(f"wrote {out} ({args.format}, {args.dtype}, {size / 1e6:.1f} MB)")
    return 0
