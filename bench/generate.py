"""Decode speed of a gpt2-shaped (124M) model on this CPU, side by side in one run.

batch 1, 16-token prompt, 256 new tokens, greedy, no early stop. Compared:
  slm-kv          slm with KV cache, decode layout (weights stored (in, out); slm generate's default)
  slm-kv-linear   slm with KV cache, plain nn.Linear layout (shows what the layout buys)
  slm-recompute   slm without cache: the whole window per token, as nanoGPT does
  slm-kv-bf16     slm with KV cache, bf16 weights
  hf              transformers GPT2LMHeadModel.generate on the same weights, fp32
Also measured: the machine's read bandwidth (a streaming sum over 1 GB), and for each
row the fraction of the bandwidth bound (weight bytes read per token x tok/s / bandwidth).

Run: .venv/bin/python bench/generate.py [--new-tokens 256] [--out bench/results/generate.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from slm.artifacts import model_tensors
from slm.config import preset
from slm.generate import GenerationStats, SamplingConfig, generate
from slm.inference import for_inference
from slm.model import GPT


def read_bandwidth_gbs() -> float:
    x = torch.ones(256 * 1024 * 1024)  # 1 GiB of fp32
    x.sum()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    return 5 * x.numel() * 4 / (time.perf_counter() - t) / 1e9


def weight_bytes_per_token(model: GPT) -> int:
    """Bytes streamed per decoded token: every weight except the position table (one row)."""
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen or "wpe" in name:
            continue
        seen.add(p.data_ptr())
        n += p.numel() * p.element_size()
    return n


def slm_row(name, model, prompt, n, kv, repeats):
    best = None
    for _ in range(repeats):
        stats = GenerationStats()
        toks = list(generate(model, prompt, SamplingConfig(max_new_tokens=n, temperature=0, kv_cache=kv), stats=stats))
        total = stats.prefill_seconds + stats.decode_seconds
        row = {"name": name, "tokens": toks, "tok_s": len(toks) / total, "decode_tok_s": stats.decode_tok_s,
               "prefill_seconds": stats.prefill_seconds}
        best = row if best is None or row["tok_s"] > best["tok_s"] else best
    best["weight_bytes"] = weight_bytes_per_token(model)
    return best


def hf_row(model_slm, prompt, n, repeats):
    import transformers

    from slm.interop.hf import config_to_hf, tensors_to_hf

    cfg = {k: v for k, v in config_to_hf(model_slm.config).items() if k != "architectures"}
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()
    hf.load_state_dict(tensors_to_hf(model_tensors(model_slm)), strict=False)
    idx = torch.tensor([prompt])
    best = None
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            out = hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=50256)
            dt = time.perf_counter() - t
            row = {"name": "hf", "tokens": out[0, len(prompt):].tolist(), "tok_s": n / dt, "decode_tok_s": None}
            best = row if best is None or row["tok_s"] > best["tok_s"] else best
    best["weight_bytes"] = weight_bytes_per_token(model_slm)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs per row")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate.json"))
    args = ap.parse_args()
    n = args.new_tokens

    torch.manual_seed(0)
    base = GPT(preset("gpt2")).eval()
    prompt = torch.randint(0, 50257, (16,)).tolist()
    bw = read_bandwidth_gbs()

    rows = [hf_row(base, prompt, n, args.repeats)]
    rows.append(slm_row("slm-kv-linear", base, prompt, n, True, args.repeats))
    rows.append(slm_row("slm-recompute", base, prompt, n, False, 1))
    fast = for_inference(base)
    rows.append(slm_row("slm-kv", fast, prompt, n, True, args.repeats))
    torch.manual_seed(0)
    bf16 = for_inference(GPT(preset("gpt2")).to(torch.bfloat16))
    rows.append(slm_row("slm-kv-bf16", bf16, prompt, n, True, args.repeats))

    by = {r["name"]: r for r in rows}
    ref = by["slm-kv"]["tokens"]
    for r in rows:
        r["same_tokens_as_slm_kv"] = r["tokens"] == ref
        r["bandwidth_fraction"] = r["weight_bytes"] * r["tok_s"] / (bw * 1e9)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "read_bandwidth_gbs": round(bw, 1), "torch": torch.__version__},
        "setup": {"model": "gpt2 (124M), random init seed 0", "batch": 1, "prompt_tokens": 16, "new_tokens": n,
                  "greedy": True},
        "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "tokens"} for r in rows],
        "ratios": {
            "kv_over_recompute": by["slm-kv"]["tok_s"] / by["slm-recompute"]["tok_s"],
            "kv_over_hf": by["slm-kv"]["tok_s"] / by["hf"]["tok_s"],
            "layout_gain": by["slm-kv"]["tok_s"] / by["slm-kv-linear"]["tok_s"],
            "bf16_over_fp32": by["slm-kv-bf16"]["tok_s"] / by["slm-kv"]["tok_s"],
        },
    }
    print(f"read bandwidth {bw:.1f} GB/s, {torch.get_num_threads()} threads; gpt2 124M, batch 1, 16 + {n} tokens")
    print(f"{'row':<15}{'tok/s':>8}{'decode tok/s':>14}{'weights MB':>12}{'bw frac':>9}  same tokens")
    for r in rows:
        dec = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        print(f"{r['name']:<15}{r['tok_s']:>8.1f}{dec:>14}{r['weight_bytes'] / 1e6:>12.0f}{r['bandwidth_fraction']:>9.2f}"
              f"  {r['same_tokens_as_slm_kv']}")
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
