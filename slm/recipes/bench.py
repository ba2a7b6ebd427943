"""`slm bench`: models side by side on this machine, each measured in a fresh process.

For each model: weights file size, load time, peak RSS, prefill tokens/s (a 512-token
prompt), decode tokens/s (batch 1, 256 new tokens, greedy, KV cache, no early stop; the best
of `repeats` generations, as other programs on the machine slow some), and, when asked,
perplexity on a validation split and SQL execution accuracy.

Each model runs in its own subprocess (`python -m slm.recipes.bench MODEL`), so its peak RSS is
its own and not what an earlier model left behind; the subprocess imports only what loading
that model needs (no transformers for slm models). `rss_baseline_bytes` is the RSS before
the model is loaded (the Python interpreter, torch and the tokenizer), so the model's own
share is the difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from slm.errors import SlmError
from slm.memory import peak_rss_bytes

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass
class BenchConfig:
    prompt_tokens: int = field(default=512, metadata={"help": "prompt length for the prefill measurement"})
    new_tokens: int = field(default=256, metadata={"help": "tokens decoded one at a time (greedy, KV cache)"})
    repeats: int = field(default=2, metadata={
        "help": "generations per model process; speeds are the best one's (other programs slow some)"})
    rounds: int = field(default=1, metadata={
        "help": "fresh processes per model, interleaved across models; speeds are the best round's"})
    data: str | None = field(default=None, metadata={"help": "data source whose validation split gives perplexity"})
    eval_tokens: int = field(default=32768, metadata={"help": "validation tokens for perplexity"})
    sql_data: str | None = field(default=None, metadata={
        "help": "text-to-SQL JSONL file: measure execution accuracy with slm eval-sql's evaluator"})

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens", "repeats", "rounds", "eval_tokens"):
            if getattr(self, name) < 1:
                raise SlmError(f"{name} must be at least 1, got {getattr(self, name)}")


def weights_bytes(spec: str) -> int | None:
    """Bytes of the weight files a model spec names (None for a hub id or alias)."""
    path = Path(spec)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        from slm.engine.checkpoints import OPTIMIZER_FILE  # a training checkpoint's AdamW state is not the model

        return sum(p.stat().st_size for p in path.rglob("*")
                   if p.suffix in WEIGHT_SUFFIXES and p.name != OPTIMIZER_FILE and p.is_file())
    from slm.interop.hf_causal import ALIASES, resolve_alias

    return resolve_alias(spec).stat().st_size if spec in ALIASES else None


# ------------------------------------------------------------------------------ in the subprocess


def measure(spec: str, cfg: BenchConfig) -> dict:
    """Every measurement of one model, in this process (run it in a fresh one)."""
    import torch

    from slm.generate import GenerationStats, SamplingConfig, generate
    from slm.loading import open_model
    from slm.tokenizer import require_gpt2

    baseline = peak_rss_bytes()
    t0 = time.perf_counter()
    loaded = open_model(spec, device="cpu")
    load_seconds = time.perf_counter() - t0
    model, tok = loaded.model, loaded.tokenizer
    if cfg.data:  # before the speed runs, not after
        require_gpt2(tok, spec, "its perplexity on --data would mean nothing; leave --data out for this model")
    block = model.config.block_size
    prompt_len = min(cfg.prompt_tokens, max(1, block - cfg.new_tokens))
    new = min(cfg.new_tokens, block - prompt_len)
    gen = torch.Generator().manual_seed(0)
    vocab = min(tok.n_vocab, getattr(model.config, "vocab_size", tok.n_vocab))
    prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()  # speed does not depend on text
    sampling = SamplingConfig(max_new_tokens=new, temperature=0)
    list(generate(model, prompt[:8], SamplingConfig(max_new_tokens=4, temperature=0)))  # warm-up
    prefill = decode = 0.0
    for _ in range(cfg.repeats):
        stats = GenerationStats()
        tokens = list(generate(model, prompt, sampling, vocab_limit=tok.n_vocab, stats=stats))
        prefill, decode = max(prefill, stats.prefill_tok_s), max(decode, stats.decode_tok_s)
    row = {
        "model": spec, "kind": loaded.kind,
        "file_bytes": weights_bytes(loaded.path if Path(spec).is_dir() else spec),  # a run dir: the checkpoint loaded
        "load_seconds": round(load_seconds, 3),
        "rss_baseline_bytes": baseline,
        "peak_rss_bytes": peak_rss_bytes(),
        "prompt_tokens": prompt_len, "new_tokens": len(tokens),
        "prefill_tok_s": round(prefill, 2),
        "decode_tok_s": round(decode, 2),
        "threads": torch.get_num_threads(),
        "greedy_tokens": tokens,
    }
    # Quality last: what it imports and allocates is not the model's, and peak RSS is read above.
    if cfg.data:
        row.update(val_perplexity(loaded, spec, cfg))
    if cfg.sql_data:
        row.update(sql_accuracy(loaded, cfg.sql_data))
    return row


def val_perplexity(loaded, spec: str, cfg: BenchConfig) -> dict:
    """Perplexity on the first `cfg.eval_tokens` tokens of the val split of `cfg.data`, as
    `slm eval` measures it, in blocks of the model's context, one sequence at a time (a batch's
    logits would be batch x context x vocab floats)."""
    from slm.data import DataConfig
    from slm.recipes.evaluate import loss_module, split_loss

    r = split_loss(loss_module(loaded, spec), loaded.model.config.block_size, DataConfig(source=cfg.data), "val",
                   max_tokens=cfg.eval_tokens, batch_size=1)
    return {"perplexity": r["perplexity"], "eval_tokens": r["tokens"]}


def sql_accuracy(loaded, sql_data: str) -> dict:
    """Execution accuracy with `slm eval-sql`'s evaluator and its default settings."""
    from slm.tasks.examples import load_examples
    from slm.tasks.sql.scoring import EvalSqlConfig, evaluate, model_replier

    cfg = EvalSqlConfig()
    examples, _, _ = load_examples(sql_data)
    r = evaluate(examples, model_replier(loaded, cfg.max_new_tokens), cfg, progress=False)
    if r["n"] == 0:
        raise SlmError(f"no example of {sql_data} could be judged (skipped: {r['skipped_reasons']})")
    return {"execution_accuracy": r["execution_accuracy"], "sql_examples": r["n"]}


# ------------------------------------------------------------------------------ in the parent


def run_one(spec: str, cfg: BenchConfig) -> dict:
    cmd = [sys.executable, "-m", "slm.recipes.bench", spec, "--config", json.dumps(cfg.__dict__)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        raise SlmError(f"benchmarking {spec} failed: {lines[-1] if lines else 'exit code ' + str(proc.returncode)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(specs: list[str], cfg: BenchConfig, progress=None) -> list[dict]:
    """Every model measured `cfg.rounds` times, interleaved; per model the best speeds, the
    lowest load time and the highest peak RSS, then ratios to the first model. Quality
    (perplexity, SQL accuracy) does not change between rounds: it is measured in the first."""
    if cfg.data:  # fail before any model is measured
        from slm.data import DataConfig, check_source

        check_source(DataConfig(source=cfg.data), split="val")
    speed_only = dataclasses.replace(cfg, data=None, sql_data=None)
    best: dict[str, dict] = {}
    for r in range(cfg.rounds):
        for spec in specs:
            if progress:
                progress(f"round {r + 1}/{cfg.rounds}: {spec}")
            row = run_one(spec, cfg if r == 0 else speed_only)
            if spec not in best:
                best[spec] = row
                continue
            b = best[spec]
            for k in ("prefill_tok_s", "decode_tok_s"):
                b[k] = max(b[k], row[k])
            b["load_seconds"] = min(b["load_seconds"], row["load_seconds"])
            b["peak_rss_bytes"] = max(b["peak_rss_bytes"], row["peak_rss_bytes"])
    rows = [best[s] for s in specs]
    ref_tokens = rows[0]["greedy_tokens"]
    for row in rows:
        tokens = row.pop("greedy_tokens")
        # Leading greedy tokens identical to the first model's (same prompt, same tokenizer).
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), min(len(tokens), len(ref_tokens)))
        row["greedy_prefix_match"] = same if row["prompt_tokens"] == rows[0]["prompt_tokens"] else None
    for row in rows:
        row["ratios"] = {k: (row[k] / rows[0][k] if row.get(k) and rows[0].get(k) else None)
                         for k in ("file_bytes", "peak_rss_bytes", "prefill_tok_s", "decode_tok_s", "load_seconds")}
    return rows


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def table(rows: list[dict]) -> str:
    """The side-by-side table, ratios to the first model in parentheses."""
    cols = [("file", "file_bytes", _fmt_bytes), ("load", "load_seconds", lambda v: f"{v:.2f} s"),
            ("peak RSS", "peak_rss_bytes", _fmt_bytes), ("prefill", "prefill_tok_s", lambda v: f"{v:.0f} tok/s"),
            ("decode", "decode_tok_s", lambda v: f"{v:.1f} tok/s")]
    if any("perplexity" in r for r in rows):
        cols.append(("perplexity", "perplexity", lambda v: f"{v:.3f}"))
    if any("execution_accuracy" in r for r in rows):
        cols.append(("SQL exec acc", "execution_accuracy", lambda v: f"{v:.1%}"))
    head = ["model"] + [c[0] for c in cols]
    lines = []
    for r in rows:
        cells = [Path(r["model"]).name or r["model"]]
        for _, key, fmt in cols:
            v = r.get(key)
            cell = "-" if v is None else fmt(v)
            ratio = r["ratios"].get(key) if key in r["ratios"] else (v / rows[0][key] if v and rows[0].get(key) else None)
            if r is not rows[0] and ratio is not None:
                cell += f" (x{ratio:.2f})"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]

    def fmt_line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([fmt_line(head)] + [fmt_line(c) for c in lines])


def main(argv: list[str] | None = None) -> int:
    """The subprocess: measure one model, print one JSON object."""
    ap = argparse.ArgumentParser(prog="python -m slm.recipes.bench")
    ap.add_argument("model")
    ap.add_argument("--config", default="{}", help="BenchConfig fields as JSON")
    args = ap.parse_args(argv)
    try:
        row = measure(args.model, BenchConfig(**json.loads(args.config)))
    except SlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
