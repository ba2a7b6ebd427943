"""Does `slm plan` predict the memory `slm train` really uses? Predicted vs measured peak RSS on CPU.

Each configuration runs `slm train` for a few steps on wiki-vital in a fresh process; the run
summary holds the plan's predicted peak (`planned_memory_bytes`: weights, gradients, AdamW,
activations, loss workspace, casts, and the process's own footprint measured just before the
model is built) and the measured peak resident set (`peak_memory_bytes`, ru_maxrss), which
includes evaluation and checkpoint saving. Target: within 25%.

Run: .venv/bin/python bench/plan_memory.py [--out bench/results/plan_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "tiny fp32 8x256": ["--preset", "tiny", "--batch-size", "8", "--dtype", "fp32"],
    "tiny bf16 8x256": ["--preset", "tiny", "--batch-size", "8", "--dtype", "bf16"],
    "tiny fp32 2x128": ["--preset", "tiny", "--batch-size", "2", "--block-size", "128", "--dtype", "fp32"],
    "8x512 bf16 4x512": ["--n-layer", "8", "--n-head", "8", "--n-embd", "512", "--block-size", "512",
                         "--batch-size", "4", "--dtype", "bf16"],
}


def measure(name: str, flags: list[str], workdir: Path) -> dict:
    cmd = [sys.executable, "-m", "slm", "train", "--data", "wiki-vital", *flags, "--max-steps", "3",
           "--eval-every", "0", "--eval-batches", "1", "--out", str(workdir / name.replace(" ", "_")), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"{name}: slm train failed: {r.stderr[-2000:]}")
    s = json.loads(r.stdout)
    planned, peak = s["planned_memory_bytes"], s["peak_memory_bytes"]
    return {"config": name, "planned_bytes": planned, "peak_rss_bytes": peak, "ratio": planned / peak,
            "tokens_per_s": s["tokens_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan_memory.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "slm", "data", "inspect", "wiki-vital", "--max-docs", "10"],
                       capture_output=True, cwd=ROOT)  # builds the wiki-vital cache outside the measured runs
        for name, flags in CONFIGS.items():
            row = measure(name, flags, Path(tmp))
            rows.append(row)
            print(f"{name:<18} planned {row['planned_bytes'] / 2**30:6.2f} GiB   measured peak RSS "
                  f"{row['peak_rss_bytes'] / 2**30:6.2f} GiB   planned/measured {row['ratio']:.2f}", flush=True)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"largest deviation: {100 * worst:.0f}% (target: within 25%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "largest_deviation": worst, "load": os.getloadavg()},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
