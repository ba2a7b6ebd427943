"""Data loader throughput and memory, side by side in one run.

Corpus: the wiki-vital rows (FineWeb-Edu column layout) repeated into one ~20 MB parquet file
in a temporary directory. Every loader makes the same thing: (x, y) int64 batches of 8 x 1024
tokens of the train split (98% by text hash), shuffled with a buffer of 8192 documents.

  talk loop          Hugging Face `datasets` streaming + filter (split) + shuffle, per-document
                     encode_ordinary, a Python list buffer re-sliced per block, torch.tensor per block
  talk, no tokenize  the same loop's reading, filtering and shuffling alone (where its time goes)
  slm, 1 process     TokenStream: text column only, one tokenizer call per ~64k characters, numpy
                     packing, a background thread (the default)
  slm, synchronous   the same without the background thread (prefetch 0)
  slm, 2 workers     TokenStream with two loader processes
  tokenizer alone    tiktoken over the same documents with nothing else: the one-process ceiling

Memory: peak RSS of a fresh process streaming the ~20 MB corpus and a 100x copy (~2 GB, in
the same temporary directory, removed afterwards): 20M tokens of train batches, and a full
read pass over every file (a split holding 0.01% of the documents, so reading dominates).

Run: .venv/bin/python bench/data.py [--seconds 8] [--out bench/results/data.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

T, B = 1024, 8


def build_corpus(d: Path, target_mb: float = 20.0) -> Path:
    from slm.data.wiki_vital import ensure_wiki_vital

    table = pa.concat_tables(pq.read_table(f) for f in sorted(ensure_wiki_vital().iterdir()))
    one = sum(f.stat().st_size for f in ensure_wiki_vital().iterdir()) / 1e6
    table = pa.concat_tables([table] * max(1, round(target_mb / one)))
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, d / "part-00000.parquet", row_group_size=1000, compression="zstd")
    return d


def talk_loop(files: list[str], seconds: float, tokenize: bool = True) -> dict:
    """The loop as the talk writes it (tokenize=False: reading, filtering, shuffling only)."""
    import torch
    from datasets import load_dataset

    from slm.data.documents import Splitter
    from slm.tokenizer import get_tokenizer

    enc, eot = get_tokenizer().encoding, get_tokenizer().eot_id
    split = Splitter(1.0, 1.0)
    ds = load_dataset("parquet", data_files=files, split="train", streaming=True)
    ds = ds.filter(lambda ex: split.split_of(ex["text"]) == "train").shuffle(seed=0, buffer_size=8192)
    buf: list[int] = []
    xs, ys = [], []
    tokens = docs = chars = 0
    t0 = None
    it = iter(ds)
    for ex in it:
        if t0 is None:
            t0 = time.perf_counter()  # start-up (resolving files, filling the shuffle buffer) not timed
        docs += 1
        chars += len(ex["text"])
        if tokenize:
            buf.extend(enc.encode_ordinary(ex["text"]))
            buf.append(eot)
            while len(buf) >= T + 1:
                block, buf = buf[:T + 1], buf[T:]
                xs.append(torch.tensor(block[:-1]))
                ys.append(torch.tensor(block[1:]))
                if len(xs) == B:
                    torch.stack(xs), torch.stack(ys)
                    xs, ys = [], []
                    tokens += B * T
        dt = time.perf_counter() - t0
        if dt >= seconds:
            break
    del it  # closing a datasets stream waits for its reader threads (seconds): not part of the loop
    return {"tokens_per_s": round(tokens / dt) if tokenize else None, "docs_per_s": round(docs / dt),
            "mb_per_s": round(chars / dt / 1e6, 2), "seconds": round(dt, 2)}


def slm_loader(d: Path, seconds: float, **overrides) -> dict:
    from slm.data import DataConfig
    from slm.data.report import bench_source

    r = bench_source(DataConfig(source=str(d), **overrides), seconds=seconds, block_size=T, batch_size=B)
    return {k: r[k] for k in ("tokens_per_s", "docs_per_s", "mb_per_s", "seconds", "startup_s")}


def tokenizer_alone(d: Path, seconds: float) -> dict:
    from slm.data import DataConfig, resolve_source
    from slm.data.producer import Producer

    texts = pq.read_table(next(d.glob("*.parquet")), columns=["text"]).column("text").to_pylist()
    p = Producer(DataConfig(source=str(d)), resolve_source(str(d)), "train")
    tokens = chars = 0
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        j, n = i, 0
        while j < len(texts) and n < 1 << 16:
            n += len(texts[j])
            j += 1
        tokens += len(p.encode(texts[i:j])[0])
        chars += n
        i = j % len(texts)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": round(tokens / dt), "mb_per_s": round(chars / dt / 1e6, 2), "seconds": round(dt, 2)}


RSS_RUN = """
import json, sys, time
from slm.data import DataConfig, TokenStream
from slm.memory import peak_rss_bytes
d, mode = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if mode == "train":
    s = TokenStream(DataConfig(source=d), block_size=1024, batch_size=8, seed=0)
    it = iter(s)
    for _ in range(20_000_000 // 8192):
        next(it)
else:  # a full pass that reads every row and tokenizes 0.01% of them
    s = TokenStream(DataConfig(source=d, val_percent=0.01), split="val", block_size=64, batch_size=1, loop=False)
    for _ in s:
        pass
print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "rows_read": s.stats.get("rows", 0),
                  "seconds": round(time.perf_counter() - t, 1)}))
"""


def rss_run(d: Path, mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", RSS_RUN, str(d), mode], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0, help="measured time per loader and repeat")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best is kept")
    ap.add_argument("--no-memory", action="store_true", help="skip the 2 GB memory check")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="slm-bench-data-"))
    try:
        small = build_corpus(tmp / "small")
        files = [str(f) for f in sorted(small.glob("*.parquet"))]
        mb = sum(os.path.getsize(f) for f in files) / 1e6
        ways = {
            "talk loop": lambda: talk_loop(files, args.seconds),
            "talk loop, no tokenizing": lambda: talk_loop(files, args.seconds, tokenize=False),
            "slm, 1 process (background thread)": lambda: slm_loader(small, args.seconds),
            "slm, synchronous (prefetch 0)": lambda: slm_loader(small, args.seconds, prefetch=0),
            "slm, 2 loader processes": lambda: slm_loader(small, args.seconds, num_workers=2),
            "tokenizer alone": lambda: tokenizer_alone(small, args.seconds),
        }
        best: dict[str, dict] = {}
        for rep in range(args.repeats):
            for name, fn in ways.items():
                r = fn()
                key = "tokens_per_s" if r.get("tokens_per_s") else "docs_per_s"
                if name not in best or r[key] > best[name][key]:
                    best[name] = r
                tps = (r["tokens_per_s"] or 0) / 1e6
                print(f"[{rep}] {name:<40}{tps:6.2f}M tok/s {r.get('docs_per_s', '-'):>10} docs/s", file=sys.stderr)
        talk = best["talk loop"]["tokens_per_s"]
        slm = best["slm, 1 process (background thread)"]["tokens_per_s"]
        out = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_average_before": load_before,
            "corpus": {"parquet_mb": round(mb, 1), "files": len(files)},
            "batch": [B, T],
            "rows": [{"way": k, **v} for k, v in best.items()],
            "slm_vs_talk": round(slm / talk, 2),
            "slm_vs_tokenizer_alone": round(slm / best["tokenizer alone"]["tokens_per_s"], 2),
        }
        if not args.no_memory:
            large = tmp / "large"
            large.mkdir()
            for i in range(100):
                shutil.copyfile(files[0], large / f"part-{i:05d}.parquet")
            mem = {}
            for name, d in (("20 MB", small), ("2 GB", large)):
                for mode in ("train", "scan"):
                    mem[f"{name} {mode}"] = rss_run(d, mode)
                    print(f"{name} {mode}: {mem[f'{name} {mode}']}", file=sys.stderr)
            out["memory"] = {
                "corpus_mb": {"small": round(mb, 1), "large": round(mb * 100, 1)},
                "runs": mem,
                "growth_bytes": {m: mem[f"2 GB {m}"]["peak_rss_bytes"] - mem[f"20 MB {m}"]["peak_rss_bytes"]
                                 for m in ("train", "scan")},
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'way':<40}{'tokens/s':>12}{'docs/s':>10}{'MB/s':>8}")
    for r in out["rows"]:
        tps = f"{r['tokens_per_s'] / 1e6:.2f}M" if r.get("tokens_per_s") else "-"
        print(f"{r['way']:<40}{tps:>12}{r.get('docs_per_s', '-'):>10}{r['mb_per_s']:>8}")
    print(f"slm / talk loop: {out['slm_vs_talk']}x; slm / tokenizer alone: {out['slm_vs_tokenizer_alone']}")
    if "memory" in out:
        print("peak RSS growth, 20 MB -> 2 GB corpus: " + ", ".join(
            f"{m} {v / 2**20:+.1f} MiB" for m, v in out["memory"]["growth_bytes"].items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
