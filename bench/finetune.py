"""Fine-tuning for text-to-SQL on this CPU: execution accuracy before vs after, side by side.

Parts (each runs the user's commands, `slm finetune` / `slm eval-sql` / `slm train`, as
separate processes, so each one's peak memory is its own):

  bird       SmolLM2-135M-Instruct + LoRA (slm finetune's defaults, --max-steps 150) trained on
             the BIRD rows of ../shared/data/text_to_sql/dev.jsonl from all but the last 6
             databases; evaluated on N rows (sqlite_ok) of those 6 unseen databases, base vs tuned,
             plus the tuned model on the synthetic test set (transfer).
  synthetic  the offline generator: LoRA on `slm sql-data` (seed 0), evaluated on another
             seed's examples (same 5 schemas, new rows, values and questions), base vs tuned.
  tiny       an slm `tiny` GPT trained from scratch (`slm train`, wiki-vital, a few minutes), then
             the same LoRA pipeline on the synthetic data, before vs after.

Run: .venv/bin/python bench/finetune.py [--parts bird synthetic tiny] [--eval-rows 64] [--reuse]
Writes bench/results/finetune.json (the parts run; other parts' earlier results are kept).
Each step's JSON is kept in --work; with --reuse a step already there is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLM = str(ROOT / ".venv" / "bin" / "slm")
DEV = ROOT.parent / "shared" / "data" / "text_to_sql" / "dev.jsonl"


REUSE = False  # --reuse: a step whose JSON is already in the work directory is not run again


def slm(*args, log: Path) -> dict:
    """Run `slm ARGS --json`; returns its JSON (stderr goes to `log`, the JSON beside it)."""
    saved = log.with_suffix(".json")
    if REUSE and saved.is_file():
        print(f"  slm {args[0]}: reusing {saved}", file=sys.stderr)
        return json.loads(saved.read_text())
    t0 = time.time()
    with open(log, "w") as err:
        out = subprocess.run([SLM, *map(str, args), "--json"], stdout=subprocess.PIPE, stderr=err, text=True)
    if out.returncode != 0:
        sys.exit(f"slm {args[0]} failed; see {log}:\n" + log.read_text()[-2000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_seconds"] = round(time.time() - t0, 1)
    saved.write_text(json.dumps(res) + "\n")
    print(f"  slm {args[0]} done in {res['process_seconds']:.0f} s", file=sys.stderr)
    return res


def write_jsonl(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def split_bird(work: Path, n_eval: int) -> tuple[Path, Path, dict]:
    """The acceptance's split: the last 6 databases (by name) are unseen; N shuffled rows of them."""
    rows = [json.loads(line) for line in open(DEV)]
    held_dbs = set(sorted({r["db_id"] for r in rows})[-6:])
    train = [r for r in rows if r["db_id"] not in held_dbs]
    evalrows = [r for r in rows if r["db_id"] in held_dbs and r.get("sqlite_ok")]
    random.Random(0).shuffle(evalrows)
    info = {"train_rows": len(train), "train_databases": len({r["db_id"] for r in train}),
            "eval_databases": sorted(held_dbs), "eval_rows": len(evalrows[:n_eval])}
    return write_jsonl(train, work / "bird_train.jsonl"), write_jsonl(evalrows[:n_eval], work / "bird_eval.jsonl"), info


def scores(r: dict) -> dict:
    keys = ("n", "execution_accuracy", "exact_match", "invalid_rate", "skipped_contexts", "method", "seconds")
    return {k: r[k] for k in keys}


def training(s: dict) -> dict:
    keys = ("steps", "tokens", "wall_seconds", "tokens_per_s", "trainable_params", "total_params", "trainable_share",
            "peak_memory_bytes", "final_val_loss", "test_loss", "examples")
    return {k: s.get(k) for k in keys}


def part_bird(work: Path, n_eval: int, syn_eval: Path, steps: int) -> dict:
    train, held, info = split_bird(work, n_eval)
    out = {"data": info}
    out["before"] = scores(slm("eval-sql", "--model", "smollm2-135m-instruct", "--data", held, "--limit", n_eval,
                               log=work / "bird_before.log"))
    ft = work / "bird_ft"
    out["training"] = training(slm("finetune", "--base", "smollm2-135m-instruct", "--data", train, "--method", "lora",
                                   "--max-steps", steps, "--out", ft, "--merge", log=work / "bird_ft.log"))
    out["after"] = scores(slm("eval-sql", "--model", ft, "--data", held, "--limit", n_eval, log=work / "bird_after.log"))
    out["after_on_synthetic"] = scores(slm("eval-sql", "--model", ft, "--data", syn_eval, "--limit", n_eval,
                                           log=work / "bird_on_syn.log"))
    return out


def part_synthetic(work: Path, n_eval: int, syn_train: Path, syn_eval: Path, steps: int) -> dict:
    out = {"before": scores(slm("eval-sql", "--model", "smollm2-135m-instruct", "--data", syn_eval, "--limit", n_eval,
                                log=work / "syn_before.log"))}
    ft = work / "syn_ft"
    out["training"] = training(slm("finetune", "--base", "smollm2-135m-instruct", "--data", syn_train, "--method",
                                   "lora", "--max-steps", steps, "--out", ft, "--merge", log=work / "syn_ft.log"))
    out["after"] = scores(slm("eval-sql", "--model", ft, "--data", syn_eval, "--limit", n_eval, log=work / "syn_after.log"))
    return out


def part_tiny(work: Path, n_eval: int, syn_train: Path, syn_eval: Path, steps: int, pretrain_minutes: float) -> dict:
    run = work / "tiny_run"
    pre = slm("train", "--data", "wiki-vital", "--preset", "tiny", "--block-size", 512, "--max-minutes",
              pretrain_minutes, "--out", run, log=work / "tiny_train.log")
    out = {"pretraining": {k: pre.get(k) for k in ("steps", "tokens", "wall_seconds", "final_val_loss", "tokens_per_s")}}
    out["before"] = scores(slm("eval-sql", "--model", run, "--data", syn_eval, "--limit", n_eval,
                               "--max-new-tokens", 96, log=work / "tiny_before.log"))
    ft = work / "tiny_ft"
    out["training"] = training(slm("finetune", "--base", run, "--data", syn_train, "--method", "lora", "--max-steps",
                                   steps, "--max-seq-len", 512, "--out", ft, "--merge", log=work / "tiny_ft.log"))
    out["after"] = scores(slm("eval-sql", "--model", ft, "--data", syn_eval, "--limit", n_eval, "--max-new-tokens", 96,
                              log=work / "tiny_after.log"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["bird", "synthetic", "tiny"], choices=["bird", "synthetic", "tiny"])
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--pretrain-minutes", type=float, default=15.0)
    ap.add_argument("--work", default=str(ROOT / "bench" / "work-finetune"), help="scratch directory (kept for logs)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"))
    ap.add_argument("--reuse", action="store_true", help="reuse the JSON of steps already run in --work")
    args = ap.parse_args()
    global REUSE
    REUSE = args.reuse
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if "bird" in args.parts and not DEV.is_file():
        sys.exit(f"no BIRD rows at {DEV}")
    syn_train, syn_eval = work / "syn_train.jsonl", work / "syn_eval.jsonl"
    subprocess.run([SLM, "sql-data", "--out", syn_train, "--n", "3000", "--seed", "0"], check=True)
    subprocess.run([SLM, "sql-data", "--out", syn_eval, "--n", str(args.eval_rows), "--seed", "1"], check=True)
    # Parts run at different times; each keeps its own machine state, and a run of some parts
    # leaves the others' results in the file.
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for part in args.parts:
        print(f"== {part}", file=sys.stderr)
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "load_average_start": os.getloadavg(), "steps": args.steps, "eval_rows": args.eval_rows,
                   "date": time.strftime("%Y-%m-%d")}
        if part == "bird":
            results["bird"] = part_bird(work, args.eval_rows, syn_eval, args.steps)
        elif part == "synthetic":
            results["synthetic"] = part_synthetic(work, args.eval_rows, syn_train, syn_eval, args.steps)
        else:
            results["tiny"] = part_tiny(work, args.eval_rows, syn_train, syn_eval, args.steps, args.pretrain_minutes)
        results[part]["machine"] = {**machine, "load_average_end": os.getloadavg()}
        out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'part':<10} {'before EA':>10} {'after EA':>9} {'before EM':>10} {'after EM':>9} {'invalid b/a':>12}")
    for part in args.parts:
        r = results[part]
        b, a = r["before"], r["after"]
        print(f"{part:<10} {b['execution_accuracy']:>10.1%} {a['execution_accuracy']:>9.1%} {b['exact_match']:>10.1%} "
              f"{a['exact_match']:>9.1%} {b['invalid_rate']:>5.0%}/{a['invalid_rate']:<5.0%}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
