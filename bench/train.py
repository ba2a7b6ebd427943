"""Training-step speed on this CPU: slm's train step vs a plain AdamW loop over transformers' GPT-2.

`tiny` preset (6 layers, width 384, vocab 50304), batch 8 x 256, random tokens. Rows:
  slm fp32 / bf16             slm's Trainer.train_step, as `slm train` runs it (fused AdamW, chunked
                              linear+cross-entropy, glibc malloc keeping freed memory), fp32 or bf16 autocast
  slm bf16 + compile          the same with torch.compile (compile time reported separately)
  hf fp32 / bf16              GPT2LMHeadModel of the same shape (vocab 50304, no dropout, SDPA attention),
                              `loss = model(input_ids, labels=input_ids).loss; loss.backward(); AdamW.step()`
  hf bf16, malloc keeps memory  the same loop with slm's allocator setting (how much of the gap it is)
Each row runs in its own process (the allocator setting and compilation are per process). Rounds
are interleaved (one row at a time, every row a few steps per round, with all cores and with one
thread: on a busy machine a second OpenMP thread can wait so long for a core that one thread is
faster), so load changes hit all rows alike; each row's tokens/s is its median over rounds. MFU is
against this machine's measured fp32 and bf16 matmul peaks (2048^3, best of several, all cores).

Run: .venv/bin/python bench/train.py [--rounds 4] [--steps 2] [--no-compile] [--out bench/results/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from slm.config import preset
from slm.engine.config import TrainConfig
from slm.engine.hardware import cpu_matmul_peak, keep_freed_memory
from slm.engine.trainer import Trainer
from slm.engine.gpt import RandomBatches, gpt_task

B, T = 8, 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROWS = ["slm fp32", "slm bf16", "slm bf16 + compile", "hf fp32", "hf bf16", "hf bf16, malloc keeps memory"]


def slm_row(dtype: str, compile: bool):
    torch.manual_seed(0)
    cfg = preset("tiny")
    trainer = Trainer(gpt_task(cfg, RandomBatches(cfg, B)), TrainConfig(batch_size=B, dtype=dtype, compile=compile))
    trainer.progress.enabled = False
    return lambda: trainer.train_step().tokens


def hf_row(dtype: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = preset("tiny")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                       n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    batches = iter(RandomBatches(cfg, B))

    def step():
        x, _ = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return x.numel()

    return step


def make_row(name: str):
    dtype = "bf16" if "bf16" in name else "fp32"
    if name.startswith("slm"):
        return slm_row(dtype, "compile" in name)
    if "malloc" in name:
        keep_freed_memory()
    return hf_row(dtype)


def worker(name: str) -> None:
    """One row in its own process: warm up, then run the steps the parent asks for."""
    step = make_row(name)
    t = time.perf_counter()
    step()
    step()
    print(json.dumps({"warmup_seconds": time.perf_counter() - t}), flush=True)
    for line in sys.stdin:
        n, threads = map(int, line.split())
        torch.set_num_threads(threads)
        t = time.perf_counter()
        tokens = sum(step() for _ in range(n))
        print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t}), flush=True)


def ask(proc: subprocess.Popen, line: str | None = None) -> dict:
    if line is not None:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    out = proc.stdout.readline()
    if not out:
        raise SystemExit(f"a benchmark worker died (exit code {proc.wait()})")
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="steps per row per round")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)

    load_before = os.getloadavg()
    peaks = {name: cpu_matmul_peak(dtype, 2048, 3.0) for name, dtype in DTYPES.items()}
    print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    names = [n for n in ROWS if not (args.no_compile and "compile" in n)]
    procs, warmups = {}, {}
    for name in names:  # started one at a time: each warms up alone
        procs[name] = subprocess.Popen([sys.executable, __file__, "--worker", name], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        warmups[name] = ask(procs[name])["warmup_seconds"]
        print(f"{name}: warm-up (2 steps{', compilation' if 'compile' in name else ''}) {warmups[name]:.0f} s",
              flush=True)
    threads = sorted({torch.get_num_threads(), 1}, reverse=True)
    rates: dict[tuple[str, int], list[float]] = {(n, th): [] for n in names for th in threads}
    for r in range(args.rounds):
        for th in threads:
            for name in names:
                res = ask(procs[name], f"{args.steps} {th}")
                rates[name, th].append(res["tokens"] / res["seconds"])
            print(f"round {r + 1}, {th} thread(s): " + ", ".join(f"{n} {rates[n, th][-1]:,.0f}" for n in names),
                  flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    compile_seconds = warmups.get("slm bf16 + compile")
    cpu_matmul_peak.cache_clear()
    for name, dtype in DTYPES.items():  # the machine's capability: the better measurement, before or after
        peaks[name] = max(peaks[name], cpu_matmul_peak(dtype, 2048, 3.0))
    fpt = preset("tiny").flops_per_token(T)
    table = []
    for (name, th), rs in rates.items():
        tok_s = statistics.median(rs)
        dtype = "bf16" if "bf16" in name else "fp32"
        table.append({"row": name, "threads": th, "tokens_per_s": tok_s, "step_seconds": B * T / tok_s,
                      "mfu_vs_fp32_peak": tok_s * fpt / peaks["fp32"], "mfu_vs_bf16_peak": tok_s * fpt / peaks["bf16"],
                      "mfu_vs_own_dtype_peak": tok_s * fpt / peaks[dtype], "all_rounds": rs})

    def best(rows):
        return max(rows, key=lambda r: r["tokens_per_s"])

    # the target compares with the plain loop as people run it (default allocator), each at its best
    # dtype (and thread count); per thread count too
    slm_rows = [r for r in table if r["row"].startswith("slm")]
    hf_rows = [r for r in table if r["row"] in ("hf fp32", "hf bf16")]
    best_slm, best_hf = best(slm_rows), best(hf_rows)
    ratio = best_slm["tokens_per_s"] / best_hf["tokens_per_s"]
    eager = best([r for r in slm_rows if "compile" not in r["row"]])  # like for like: neither loop compiled
    ratio_eager = eager["tokens_per_s"] / best_hf["tokens_per_s"]
    ratio_by_threads = {th: best([r for r in slm_rows if r["threads"] == th])["tokens_per_s"]
                        / best([r for r in hf_rows if r["threads"] == th])["tokens_per_s"] for th in threads}
    print("\n| row | threads | tokens/s | s/step | MFU vs own-dtype peak | MFU vs bf16 peak |\n|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['row']} | {r['threads']} | {r['tokens_per_s']:,.0f} | {r['step_seconds']:.2f} | "
              f"{100 * r['mfu_vs_own_dtype_peak']:.1f}% | {100 * r['mfu_vs_bf16_peak']:.1f}% |")
    print(f"\nbest slm ({best_slm['row']}, {best_slm['threads']} thr) / best hf ({best_hf['row']}, "
          f"{best_hf['threads']} thr): {ratio:.2f}x (target >= 2.0x); at equal threads: "
          + ", ".join(f"{th} thr {x:.2f}x" for th, x in ratio_by_threads.items())
          + f"; without torch.compile ({eager['row']}, {eager['threads']} thr): {ratio_eager:.2f}x")
    if compile_seconds is not None:
        print(f"torch.compile: first two steps took {compile_seconds:.0f} s")
    result = {"preset": "tiny", "batch": [B, T], "flops_per_token": fpt, "peaks_flops": peaks, "rows": table,
              "best_slm": [best_slm["row"], best_slm["threads"]], "best_hf": [best_hf["row"], best_hf["threads"]],
              "ratio": ratio, "ratio_by_threads": ratio_by_threads, "ratio_without_compile": ratio_eager,
              "compile_warmup_seconds": compile_seconds, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "load_before": load_before, "load_after": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
