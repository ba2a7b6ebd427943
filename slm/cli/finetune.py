"""Fine-tuning commands: finetune, eval-sql, sql-data."""

from __future__ import annotations

import json
import sys

from slm.cli.options import add_dataclass_args, from_args
from slm.tasks.examples import FORMATS

MODEL_HELP = ("model directory (slm, fine-tune output, training run, Hugging Face), hub id, .gguf file, "
              "or the alias smollm2-135m-instruct")


def register(sub) -> None:
    from slm.recipes.config import EvalSqlConfig, FinetuneConfig, FinetuneTrainConfig, LoraSettings

    p = sub.add_parser("finetune", help="fine-tune a model on examples (LoRA or full), with slm's training loop")
    add_dataclass_args(p, FinetuneConfig)
    p.add_argument("--out", required=True, help="output directory: adapter, merged model, checkpoints, metrics.jsonl")
    add_dataclass_args(p, LoraSettings)
    add_dataclass_args(p, FinetuneTrainConfig, exclude=("fsdp", "memory_gb", "check_memory"))
    p.add_argument("--resume", action="store_true", help="continue the fine-tune in --out from its last checkpoint")
    p.add_argument("--json", action="store_true", help="print the run summary as one JSON object")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval-sql", help="execution accuracy of a model's SQL, run in SQLite")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="examples: .jsonl, .json, .parquet or hf:DATASET[:SPLIT]")
    p.add_argument("--format", choices=list(FORMATS), help="data layout (default: detected from the columns)")
    add_dataclass_args(p, EvalSqlConfig)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object: {"n", "execution_accuracy", "exact_match", "invalid_rate", '
                        '"skipped_contexts", ...}')
    p.set_defaults(func=cmd_eval_sql)

    p = sub.add_parser("sql-data", help="write verified synthetic text-to-SQL examples (offline default data)")
    p.add_argument("--out", required=True, help="output .jsonl file (gretel layout)")
    p.add_argument("--n", type=int, default=2000, help="number of examples (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--domains", nargs="+", help="databases to draw from (default: all)")
    p.set_defaults(func=cmd_sql_data)


def cmd_finetune(args) -> int:
    from slm.recipes.config import FinetuneConfig, FinetuneTrainConfig, LoraSettings
    from slm.recipes.finetune import finetune, print_summary

    summary = finetune(from_args(FinetuneConfig, args), from_args(LoraSettings, args),
                       from_args(FinetuneTrainConfig, args), args.out, resume=args.resume)
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
        print(summary.get("out", args.out))
    return 0


def cmd_eval_sql(args) -> int:
    from slm.tasks.examples import load_examples
    from slm.recipes.config import EvalSqlConfig
    from slm.tasks.sql.scoring import evaluate, model_replier
    from slm.loading import open_model
    from slm.runtime import resolve_device

    cfg = from_args(EvalSqlConfig, args)
    examples, fmt, stats = load_examples(args.data, args.format)
    loaded = open_model(args.model, device=resolve_device(args.device))
    report = {"model": loaded.name, **evaluate(examples, model_replier(loaded, cfg.max_new_tokens), cfg)}
    report["data"] = {"source": args.data, "format": fmt, **stats.summary()}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['model']} on {report['n']} examples of {args.data} ({fmt}):")
    print(f"  execution accuracy {report['execution_accuracy']:.1%}  exact match {report['exact_match']:.1%}  "
          f"invalid {report['invalid_rate']:.1%}")
    methods = ", ".join(f"{k}: {v}" for k, v in report["method"].items()) or "none"
    print(f"  judged on: {methods} (test suite = {report['test_suite_databases']} seeded databases per "
          f"schema-only context; gold result empty everywhere for {report['gold_empty_everywhere']})")
    if report["skipped_contexts"]:
        print(f"  skipped {report['skipped_contexts']} examples whose context does not run in SQLite: "
              f"{report['skipped_reasons']}")
    for ex in report["examples"]:
        print(f"\n  [{'right' if ex['correct'] else 'wrong'}] {ex['question']}")
        print(f"    gold: {ex['gold']}")
        print(f"    pred: {ex['predicted']}" + (f"  ({ex['error']})" if ex["error"] else ""))
    return 0


def cmd_sql_data(args) -> int:
    from slm.tasks.sql.synthetic import generate_examples, write_jsonl

    rows = generate_examples(args.n, args.seed, args.domains)
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} verified examples to {args.out}", file=sys.stderr)
    return 0
