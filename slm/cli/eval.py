"""Evaluation commands: eval (loss and perplexity), eval-sql (text-to-SQL execution accuracy),
bench (models side by side: size, memory, speed, quality)."""

from __future__ import annotations

import json
import sys

from slm.cli.options import add_data, add_dataclass_args, add_device, add_dtype, add_json, add_model, from_args, given
from slm.data.config import DataConfig
from slm.runtime import AUTOCAST_DTYPES


def register(sub) -> None:
    from slm.recipes.bench import BenchConfig
    from slm.tasks.examples import FORMATS
    from slm.tasks.sql.scoring import EvalSqlConfig

    p = sub.add_parser("eval", help="loss and perplexity of a model on a split of a data source")
    add_model(p)
    add_data(p)
    p.add_argument("--split", choices=["val", "test", "train"], default="val", help="(default: val)")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens (default: the whole split)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: 8)")
    p.add_argument("--block-size", type=int, help="tokens per sequence (default: the model's context)")
    add_device(p)
    add_dtype(p, AUTOCAST_DTYPES, "autocast dtype (auto: bf16 where the hardware has native bf16, else fp32)")
    add_json(p, '{"loss", "perplexity", "tokens", ...}')
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-sql", help="execution accuracy of a model's SQL, run in SQLite")
    add_model(p)
    p.add_argument("--data", required=True, help="examples: .jsonl, .json, .parquet or hf:DATASET[:SPLIT]")
    p.add_argument("--format", choices=list(FORMATS), help="data layout (default: detected from the columns)")
    add_dataclass_args(p, EvalSqlConfig)
    add_device(p)
    add_json(p, 'one JSON object: {"n", "execution_accuracy", "exact_match", "invalid_rate", "skipped_contexts", ...}')
    p.set_defaults(func=cmd_eval_sql)

    p = sub.add_parser("bench", help="measure models side by side: size, load time, peak RSS, speed, quality")
    add_model(p, repeat=True)
    add_dataclass_args(p, BenchConfig)
    add_json(p, "a JSON list, one object per model (model, file_bytes, peak_rss_bytes, prefill_tok_s, "
                "decode_tok_s, perplexity/execution_accuracy when measured)")
    p.set_defaults(func=cmd_bench)


def cmd_eval(args) -> int:
    from slm.recipes.evaluate import evaluate_model

    data = DataConfig(**given(args, DataConfig))
    r = evaluate_model(args.model, data, split=args.split, max_tokens=args.max_tokens, batch_size=args.batch_size,
                       block_size=args.block_size, device=args.device, dtype=args.dtype)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} on {r['split']} of {r['source']}: loss {r['loss']:.4f}, perplexity "
              f"{r['perplexity']:.2f} ({r['tokens']:,} tokens)")
    return 0


def cmd_eval_sql(args) -> int:
    from slm.loading import open_model
    from slm.runtime import resolve_device
    from slm.tasks.examples import load_examples
    from slm.tasks.sql.scoring import EvalSqlConfig, evaluate, model_replier

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


def cmd_bench(args) -> int:
    from slm.recipes.bench import BenchConfig, compare, table

    cfg = from_args(BenchConfig, args)
    rows = compare(args.models, cfg, lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(rows))
    else:
        print(table(rows))
    return 0
