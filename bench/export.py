"""Decode speed of the same weights in slm, llama.cpp and transformers, side by side in one run.

A gpt2-shaped (124M) random-init model (seed 0, token embedding scaled x3 so that its
predictions are peaked rather than uniform, which makes greedy agreement and perplexity
meaningful; the speed is the same) is saved as an slm directory, exported with
`slm export` to a transformers directory and to GGUF f32 and q8_0, and each runtime decodes
256 new tokens greedily after the same 16-token prompt, batch 1, --threads threads (2), best of
N runs:
  slm-fp32        slm's generate loop, KV cache, decode layout (slm generate's default)
  slm-fp32-native the same with SLM_FP32_KERNEL=native: slm's native fp32 kernel and fused
                  decoding step (slm/inference.py; not the default, see there)
  slm-int8        the same loop on `slm quantize`'s default (dynamic int8) copy of the model
  llamacpp-f32    llama.cpp (llama-cpp-python) on the f32 GGUF
  llamacpp-q8_0   llama.cpp on the q8_0 GGUF
  transformers    GPT2LMHeadModel.generate on the HF export, fp32
tok/s counts the 256 new tokens over the whole call (prompt included, the same for every row);
decode tok/s leaves out the first token (the prompt's forward pass); cpu tok/s divides by the
process's CPU time instead of wall time: with --threads 1 on a machine shared with other work,
it measures each runtime's own cost, which wall time does not (and which, with several
threads, spin-waiting inflates). Also reported: whether
greedy tokens agree with slm's, and the q8_0 perplexity change vs f32 in llama.cpp on 256
tokens the model itself sampled (temperature 1).

llama.cpp rows need `pip install 'slm[llama]'` (llama-cpp-python builds from source, ~5-30 min).

Run: .venv/bin/python bench/export.py [--new-tokens 256] [--repeats 3] [--threads 2] [--out bench/results/export.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from slm.artifacts import load_model, save_model
from slm.config import preset
from slm.generate import GenerationStats, SamplingConfig, generate
from slm.inference import for_inference
from slm.interop.export import export_gguf, export_hf
from slm.loading import open_model
from slm.model import GPT
from slm.recipes.quantize import quantize_to_dir
from slm.quant.quantize import QuantConfig

def best(fn, repeats):
    rows = [fn() for _ in range(repeats)]
    return max(rows, key=lambda r: r["tok_s"])


def slm_row(model, prompt, n, repeats):
    def once():
        stats = GenerationStats()
        cfg = SamplingConfig(max_new_tokens=n, temperature=0)
        cpu = time.process_time()
        toks = list(generate(model, prompt, cfg, vocab_limit=50257, stats=stats))
        return {"tokens": toks, "tok_s": len(toks) / (stats.prefill_seconds + stats.decode_seconds),
                "decode_tok_s": stats.decode_tok_s, "cpu_tok_s": n / (time.process_time() - cpu)}

    return {"name": "slm-fp32", **best(once, repeats)}


def llama_row(name, path, prompt, n, repeats, threads):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def once():
        toks, t0, first, cpu = [], time.perf_counter(), None, time.process_time()
        for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            first = first or time.perf_counter()
            toks.append(t)
            if len(toks) == n:
                break
        end = time.perf_counter()
        return {"tokens": toks, "tok_s": n / (end - t0), "decode_tok_s": (n - 1) / (end - first),
                "cpu_tok_s": n / (time.process_time() - cpu)}

    return {"name": name, **best(once, repeats), "file_bytes": Path(path).stat().st_size}


def hf_row(hf_dir, prompt, n, repeats):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    idx = torch.tensor([prompt])

    def once():
        with torch.inference_mode():
            t, cpu = time.perf_counter(), time.process_time()
            out = model.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=50256)
            dt = time.perf_counter() - t
        return {"tokens": out[0, len(prompt):].tolist(), "tok_s": n / dt, "decode_tok_s": None,
                "cpu_tok_s": n / (time.process_time() - cpu)}

    return {"name": "transformers", **best(once, repeats)}


def llama_perplexity(path, ids, threads) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, logits_all=True, verbose=False)
    llm.eval(ids)
    logits = torch.tensor(llm.scores[: len(ids)])
    lp = torch.log_softmax(logits[:-1].float(), -1)
    return math.exp(-lp.gather(-1, torch.tensor(ids[1:])[:, None]).mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="best of N runs per row")
    ap.add_argument("--threads", type=int, default=2, help="threads for every runtime")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "export.json"))
    args = ap.parse_args()
    n, threads = args.new_tokens, args.threads
    torch.set_num_threads(threads)

    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
        print("llama-cpp-python is not installed (pip install 'slm[llama]'): llama.cpp rows are skipped")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = GPT(preset("gpt2"))
        with torch.no_grad():
            model.transformer.wte.weight.mul_(3)
        model_dir = save_model(tmp / "gpt2", model)
        del model
        prompt = torch.randint(0, 50257, (16,)).tolist()
        export_hf(model_dir, tmp / "hf")
        slm_model = for_inference(load_model(model_dir)[0])
        rows = [slm_row(slm_model, prompt, n, args.repeats)]
        with mock.patch.dict(os.environ, {"SLM_FP32_KERNEL": "native"}):
            native = for_inference(load_model(model_dir)[0])
        rows.append({**slm_row(native, prompt, n, args.repeats), "name": "slm-fp32-native"})
        del native
        quantize_to_dir(str(model_dir), tmp / "gpt2-int8", QuantConfig())  # slm's default int8 method
        rows.append({**slm_row(open_model(tmp / "gpt2-int8").model, prompt, n, args.repeats), "name": "slm-int8"})
        # Text the model itself samples: what perplexity is measured on.
        sample = [50256] + list(generate(slm_model, [50256], SamplingConfig(max_new_tokens=255, temperature=1.0, seed=0),
                                         vocab_limit=50257))
        ppl = {}
        if have_llama:
            for dtype in ("f32", "q8_0"):
                path = export_gguf(model_dir, tmp / f"gpt2-{dtype}.gguf", dtype)
                rows.append(llama_row(f"llamacpp-{dtype}", path, prompt, n, args.repeats, threads))
                ppl[dtype] = llama_perplexity(path, sample, threads)
        rows.append(hf_row(tmp / "hf", prompt, n, args.repeats))

    by = {r["name"]: r for r in rows}
    ref = by["slm-fp32"]["tokens"]
    for r in rows:
        r["same_tokens_as_slm"] = r["tokens"] == ref
        r["tokens_agreeing_with_slm"] = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref)) if a != b),
                                             min(len(r["tokens"]), len(ref)))
    def ratio(a, b, key="tok_s"):
        return by[a][key] / by[b][key]

    ratios = {"slm_fp32_over_transformers": ratio("slm-fp32", "transformers")}
    ratios["slm_int8_over_slm_fp32"] = ratio("slm-int8", "slm-fp32")
    ratios["slm_int8_over_slm_fp32_native"] = ratio("slm-int8", "slm-fp32-native")
    if have_llama:
        ratios["slm_int8_over_llamacpp_q8_0"] = ratio("slm-int8", "llamacpp-q8_0")
        ratios["slm_int8_over_llamacpp_q8_0_cpu_time"] = ratio("slm-int8", "llamacpp-q8_0", "cpu_tok_s")
        ratios["slm_fp32_over_llamacpp_f32"] = ratio("slm-fp32", "llamacpp-f32")
        ratios["slm_fp32_over_llamacpp_f32_cpu_time"] = ratio("slm-fp32", "llamacpp-f32", "cpu_tok_s")
        ratios["slm_fp32_native_over_llamacpp_f32"] = ratio("slm-fp32-native", "llamacpp-f32")
        ratios["llamacpp_q8_0_over_f32"] = ratio("llamacpp-q8_0", "llamacpp-f32")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                    "torch": torch.__version__, "load_avg_1m_at_end": os.getloadavg()[0]},
        "setup": {"model": "gpt2 (124M) random init seed 0, embedding x3", "batch": 1, "prompt_tokens": 16, "new_tokens": n,
                  "greedy": True, "repeats": args.repeats},
        "rows": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "tokens"} for r in rows],
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": {"slm_fp32_over_llamacpp_f32": 0.6, "slm_int8_over_llamacpp_q8_0": 1.0},
    }
    if ppl:
        result["llamacpp_perplexity"] = {"f32": round(ppl["f32"], 3), "q8_0": round(ppl["q8_0"], 3),
                                         "q8_0_relative_change": round(ppl["q8_0"] / ppl["f32"] - 1, 5)}
    print(f"gpt2 124M, batch 1, 16 + {n} tokens, {threads} threads, best of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'row':<16}{'tok/s':>8}{'decode tok/s':>14}{'cpu tok/s':>11}  greedy tokens == slm")
    for r in rows:
        dec = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        print(f"{r['name']:<16}{r['tok_s']:>8.1f}{dec:>14}{r['cpu_tok_s']:>11.1f}  {r['same_tokens_as_slm']} "
              f"({r['tokens_agreeing_with_slm']} agree)")
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}x")
    if ppl:
        print(f"llama.cpp perplexity f32 {ppl['f32']:.2f}, q8_0 {ppl['q8_0']:.2f} "
              f"({100 * (ppl['q8_0'] / ppl['f32'] - 1):+.3f} %)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
