"""Data commands: `slm data inspect SOURCE` and `slm data bench SOURCE`."""

from __future__ import annotations

import json
import sys

from slm.cli.options import add_dataclass_args, add_json, from_args
from slm.data.config import DataConfig

# Flags that make no sense for inspecting (which reads in file order, in this process).
_INSPECT_EXCLUDE = ("source", "shuffle_buffer", "num_workers", "prefetch")


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect a data source or measure the loader's speed")
    data = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    q = data.add_parser("inspect", help="files, columns, a sample, document/token statistics, splits, skipped input")
    q.add_argument("source", metavar="SOURCE", help=DataConfig.__dataclass_fields__["source"].metadata["help"])
    add_dataclass_args(q, DataConfig, exclude=_INSPECT_EXCLUDE)
    q.add_argument("--max-docs", type=int, default=20_000,
                   help="statistics over the first N documents (default: 20000)")
    add_json(q)
    q.set_defaults(func=cmd_inspect)

    q = data.add_parser("bench", help="end-to-end loader throughput (tokens/s, documents/s, MB/s) and peak RSS")
    q.add_argument("source", metavar="SOURCE", help=DataConfig.__dataclass_fields__["source"].metadata["help"])
    add_dataclass_args(q, DataConfig, exclude=("source",))
    q.add_argument("--seconds", type=float, default=10.0, help="how long to measure (default: 10)")
    q.add_argument("--block-size", type=int, default=1024, help="tokens per row (default: 1024)")
    q.add_argument("--batch-size", type=int, default=8, help="rows per batch (default: 8)")
    q.add_argument("--split", choices=["train", "val", "test"], default="train", help="(default: train)")
    add_json(q)
    q.set_defaults(func=cmd_bench)


def _config(args) -> DataConfig:
    return from_args(DataConfig, args, base={"source": args.source})


def cmd_inspect(args) -> int:
    from slm.data.report import inspect_source

    r = inspect_source(_config(args), max_docs=args.max_docs)
    if args.json:
        print(json.dumps(r))
        return 0
    print(r["description"])
    for f in r["file_list"]:
        print(f"  {f['name']}  {f['format']}  {f['bytes'] if f['bytes'] is not None else '?'} bytes")
    if r["files"] > len(r["file_list"]):
        print(f"  ... {r['files'] - len(r['file_list'])} more")
    if r["columns"]:
        print(f"columns: {', '.join(r['columns'])} (text field: {r['text_field']})")
    scope = f"first {r['documents']:,}" if r["truncated"] else f"all {r['documents']:,}"
    t = r["tokens_per_document"]
    print(f"documents ({scope}): {r['documents']:,}, tokens {r['tokens']:,}, characters {r['chars']:,}")
    print(f"tokens per document: mean {t['mean']}, median {t['median']}, p95 {t['p95']}, max {t['max']}")
    s = r["splits"]
    print(f"splits: train {s['train']:,}, val {s['val']:,}, test {s['test']:,} "
          f"(val {r['split_percent']['val']}%, test {r['split_percent']['test']}% by text hash)")
    skipped = ", ".join(f"{k} {v:,}" for k, v in r["skipped"].items()) or "nothing"
    print(f"skipped: {skipped}")
    if r["sample"]:
        print(f"sample: {r['sample']}")
    return 0


def cmd_bench(args) -> int:
    from slm.data.report import bench_source

    cfg = _config(args)
    print(f"streaming {cfg.source} for {args.seconds:g} s ...", file=sys.stderr)
    r = bench_source(cfg, seconds=args.seconds, block_size=args.block_size, batch_size=args.batch_size,
                     split=args.split)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['source']} ({r['split']}, batches of {r['batch_size']}x{r['block_size']}, "
          f"{r['num_workers']} worker processes): {r['tokens_per_s'] / 1e6:.2f}M tokens/s, "
          f"{r['docs_per_s']:,.0f} documents/s, {r['mb_per_s']} MB/s of text")
    print(f"  {r['tokens']:,} tokens in {r['seconds']} s after a {r['startup_s']} s start, {r['passes']} pass(es); "
          f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    if r["skipped"]:
        print("  skipped: " + ", ".join(f"{k} {v:,}" for k, v in r["skipped"].items()))
    return 0
