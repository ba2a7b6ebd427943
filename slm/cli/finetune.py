"""Fine-tuning commands: finetune, and sql-data (the offline text-to-SQL examples it is taught with)."""

from __future__ import annotations

import json
import sys

from slm.cli.options import add_dataclass_args, add_json, add_out, from_args


def register(sub) -> None:
    from slm.lora import LoraSettings
    from slm.recipes.config import FinetuneConfig, FinetuneTrainConfig

    p = sub.add_parser("finetune", help="fine-tune a model on examples (LoRA or full), with slm's training loop")
    add_dataclass_args(p, FinetuneConfig)
    add_out(p, "output directory: adapter, merged model, checkpoints, metrics.jsonl")
    add_dataclass_args(p, LoraSettings)
    add_dataclass_args(p, FinetuneTrainConfig, exclude=("fsdp", "memory_gb", "check_memory"))
    p.add_argument("--resume", action="store_true", help="continue the fine-tune in --out from its last checkpoint")
    add_json(p, "the run summary as one JSON object")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("sql-data", help="write verified synthetic text-to-SQL examples (offline default data)")
    add_out(p, "output .jsonl file (gretel layout)")
    p.add_argument("--n", type=int, default=2000, help="number of examples (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--domains", nargs="+", help="databases to draw from (default: all)")
    p.set_defaults(func=cmd_sql_data)


def cmd_finetune(args) -> int:
    from slm.lora import LoraSettings
    from slm.recipes.config import FinetuneConfig, FinetuneTrainConfig
    from slm.recipes.finetune import finetune, print_summary

    summary = finetune(from_args(FinetuneConfig, args), from_args(LoraSettings, args),
                       from_args(FinetuneTrainConfig, args), args.out, resume=args.resume)
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
        print(summary.get("out", args.out))
    return 0


def cmd_sql_data(args) -> int:
    from slm.tasks.sql.synthetic import generate_examples, write_jsonl

    rows = generate_examples(args.n, args.seed, args.domains)
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} verified examples to {args.out}", file=sys.stderr)
    return 0
