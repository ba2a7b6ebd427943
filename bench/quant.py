"""Quantization on this CPU: kernels side by side, then whole models against the targets.

1. kernels: the 124M model's 48 block matrices and its 50304 x 768 head at batch 1 (one
   decoded token's matmuls), fp32 against every int8/int4 path torch 2.13 and torchao offer
   here, each with its error against fp32 (relative L2, one layer, Gaussian input).
2. gpt2-shaped (124M) slm model, random init: fp32 against each method through `slm bench`
   (each model in a fresh process). Targets for the default int8 method: decode >= 3x fp32,
   weights <= 35 %, peak RSS <= 50 %.
3. quality: a trained tiny model (`slm train` on wiki-vital; `make demo`'s run when present, else
   trained here) on the held-out val split, perplexity of fp32
   against every method and head/embedding choice. Target: <= 2 % rise for the default.
4. SmolLM2-135M against its int8 copy: the SQL fine-tune given by --sql-model (scored on
   --sql-data), else the offline alias dequantized to fp32. Targets: decode >= 1.5x, execution
   accuracy drop <= 2 points.

Run: .venv/bin/python bench/quant.py [--sections kernels,gpt2,quality,smollm2] [--tiny-model DIR] [--rounds N]
                                     [--sql-model DIR --sql-data FILE]
Writes bench/results/quant.json (the sections run; other sections' earlier results are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from slm.cli import passive_omp_threads

passive_omp_threads()  # as the slm command does, before torch is imported

import torch  # noqa: E402
import torch.nn as nn

from slm.recipes.bench import BenchConfig, compare, weights_bytes  # noqa: E402
from slm.artifacts import save_model
from slm.config import preset
from slm.model import GPT
from slm.recipes.quantize import quantize_to_dir
from slm.quant.layers import Int4Linear, Int8Linear, pack_nibbles, quantize_int4, quantize_int8
from slm.quant.quantize import QuantConfig

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12 + [(768, 50304)]  # (in, out)
FP32_BYTES = sum(i * o for i, o in SHAPES) * 4


def timed(step, repeats: int) -> float:
    """Median seconds of `step()` after a warm-up."""
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def kernel_rows(repeats: int, compile_: bool) -> list[dict]:
    torch.manual_seed(0)
    linears = [nn.Linear(i, o) for i, o in SHAPES]
    for lin in linears:
        nn.init.normal_(lin.weight, std=0.02)
    inputs = [torch.randn(1, i) for i, _ in SHAPES]
    probe = torch.randn(1, 768)
    ref = linears[2](probe).detach()

    def row(name, modules, note="", dtype=torch.float32):
        def step():
            with torch.inference_mode():
                for m, x in zip(modules, inputs):
                    m(x.to(dtype))

        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                err = float((modules[2](probe.to(dtype)).float() - ref).norm() / ref.norm())
            setup = time.perf_counter() - t0
            sec = timed(step, repeats)
        except Exception as e:  # a path this torch/CPU does not support: say why
            return {"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", "note": note}
        return {"name": name, "ms": round(sec * 1e3, 2), "rel_error": round(err, 4), "note": note,
                "first_call_s": round(setup, 2)}

    rows = []
    from slm import kernels
    from slm.inference import PackedLinear, TransposedLinear

    rows.append(row("fp32, (in, out) layout (slm decode layout)", [TransposedLinear(l) for l in linears]))
    rows.append(row("fp32, nn.Linear", linears))
    if kernels.available():
        rows.append(row("fp32, slm native kernel (SLM_FP32_KERNEL=native)", [PackedLinear(l) for l in linears]))

    def slm_int8(activation, kernel):
        out = []
        for lin in linears:
            q, s = quantize_int8(lin.weight)
            out.append(Int8Linear(q, s, lin.bias, activation, kernel=kernel))
        return out

    if kernels.available():
        rows.append(row("slm dynamic-int8, slm native kernel (default)", slm_int8("dynamic", "native")))
    rows.append(row("slm dynamic-int8, fbgemm (fallback without a C++ compiler)", slm_int8("dynamic", "fbgemm")))
    rows.append(row("slm dynamic-int8, torch._int_mm (fallback)", slm_int8("dynamic", "int_mm")))
    rows.append(row("slm weight-int8, aten._weight_int8pack_mm (bf16 act.)", slm_int8("weight", "int8pack")))
    int4 = []
    for lin in linears:
        q, sc, z = quantize_int4(lin.weight, 64)
        int4.append(Int4Linear(pack_nibbles(q), sc, z, lin.bias, kernel="int4pack"))
    rows.append(row("slm weight-int4 g64, aten._weight_int4pack_mm_for_cpu (bf16 act.)", int4))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        ao = [quantize_dynamic(nn.Sequential(l), {nn.Linear}, dtype=torch.qint8)[0] for l in linears]
    rows.append(row("torch.ao quantize_dynamic (deprecated API)", ao, "same fbgemm kernel, per-tensor weights"))

    def dyn4(lin):
        n, k = lin.weight.shape
        q, sc, z = quantize_int4(lin.weight, 32)  # symmetric groups would do; the layout is what is timed
        packed = torch.ops.aten._dyn_quant_pack_4bit_weight(pack_nibbles(q), sc.float(), lin.bias, 32, k, n)
        return lambda x: torch.ops.aten._dyn_quant_matmul_4bit(x, packed, 32, k, n)

    rows.append(row("aten._dyn_quant_matmul_4bit (KleidiAI on ARM)", [dyn4(l) for l in linears],
                    "error not meaningful: asymmetric groups fed as symmetric"))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                              Int8WeightOnlyConfig, quantize_)
    except ImportError as e:
        rows.append({"name": "torchao", "error": str(e)})
        return rows
    configs = [("Int8DynamicActivationInt8WeightConfig", Int8DynamicActivationInt8WeightConfig(), torch.float32),
               ("Int8WeightOnlyConfig", Int8WeightOnlyConfig(), torch.float32),
               ("Int4WeightOnlyConfig(group_size=64)", Int4WeightOnlyConfig(group_size=64), torch.bfloat16)]
    for name, cfg, dtype in configs:
        try:
            mods = [nn.Linear(i, o).to(dtype) for i, o in SHAPES]
            for m, l in zip(mods, linears):
                m.load_state_dict(l.state_dict())
            stack = nn.Sequential(*mods)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_(stack, cfg)
        except Exception as e:
            rows.append({"name": f"torchao {name}", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
            continue
        rows.append(row(f"torchao {name}, eager", list(stack), dtype=dtype))
        if compile_:
            rows.append(compiled_row(f"torchao {name}, torch.compile", stack, inputs, probe, ref, dtype, repeats))
    return rows


def compiled_row(name, stack, inputs, probe, ref, dtype, repeats) -> dict:
    """One token's matmuls as one compiled graph (compiling module by module would hit
    dynamo's recompile limit: the modules share one code object)."""
    def token(xs):
        return [m(x) for m, x in zip(stack, xs)]

    try:
        fn = torch.compile(token)
        xs = [x.to(dtype) for x in inputs]
        t0 = time.perf_counter()
        with torch.inference_mode():
            err = float((fn([probe.to(dtype) if i == 2 else x for i, x in enumerate(xs)])[2].float() - ref).norm()
                        / ref.norm())
        setup = time.perf_counter() - t0

        def step():
            with torch.inference_mode():
                fn(xs)

        sec = timed(step, repeats)
    except Exception as e:
        return {"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    return {"name": name, "ms": round(sec * 1e3, 2), "rel_error": round(err, 4), "note": f"compiled in {setup:.0f} s",
            "first_call_s": round(setup, 2)}


def model_rows(workdir: Path, specs: dict[str, tuple[str, QuantConfig | None]], cfg: BenchConfig) -> list[dict]:
    """Quantize each variant of `specs` ({name: (source, QuantConfig or None)}) and bench all."""
    paths = {}
    for name, (source, qcfg) in specs.items():
        if qcfg is None:
            paths[name] = source
            continue
        t = time.perf_counter()
        summary = quantize_to_dir(source, workdir / name, qcfg)
        print(f"quantized {name} in {time.perf_counter() - t:.1f} s: {summary['file_bytes'] / 1e6:.1f} MB", flush=True)
        paths[name] = str(workdir / name)
    rows = compare(list(paths.values()), cfg, progress=lambda m: print(m, flush=True))
    for name, row in zip(paths, rows):
        row["name"] = name
    return rows


def print_models(rows: list[dict]) -> None:
    print(f"{'model':<28}{'file MB':>9}{'x':>6}{'RSS MB':>8}{'x':>6}{'load s':>7}{'prefill':>9}{'decode':>8}{'x':>6}"
          f"{'greedy=':>8}")
    for r in rows:
        x = r["ratios"]
        print(f"{r['name']:<28}{r['file_bytes'] / 1e6:>9.1f}{x['file_bytes']:>6.2f}{r['peak_rss_bytes'] / 1e6:>8.0f}"
              f"{x['peak_rss_bytes']:>6.2f}{r['load_seconds']:>7.2f}{r['prefill_tok_s']:>9.0f}{r['decode_tok_s']:>8.1f}"
              f"{x['decode_tok_s']:>6.2f}{str(r['greedy_prefix_match']):>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20, help="timed repeats per kernel row")
    ap.add_argument("--rounds", type=int, default=2, help="slm bench rounds (best of, interleaved)")
    ap.add_argument("--skip-compile", action="store_true", help="no torch.compile rows (they compile for minutes)")
    ap.add_argument("--sections", default="kernels,gpt2,quality,smollm2", help="comma-separated parts to run")
    ap.add_argument("--tiny-model", default="demo-out/tiny-wiki-vital",
                    help="trained tiny model or run directory; trained with `slm train` when missing")
    ap.add_argument("--tiny-steps", type=int, default=400, help="steps of `slm train` when training the tiny model")
    ap.add_argument("--sql-model", help="SmolLM2 SQL fine-tune (slm finetune --merge output) for the smollm2 section")
    ap.add_argument("--sql-data", help="text-to-SQL JSONL scoring the smollm2 section's models (execution accuracy)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant.json"))
    args = ap.parse_args()
    # Sections run at different times: each keeps its own machine record, and a run of some
    # sections leaves the others' results in the file.
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "date": time.strftime("%Y-%m-%d")}

    def done(section: str, started: tuple) -> None:
        result.setdefault("machine", {})[section] = {**machine, "load_average": started,
                                                     "load_average_end": os.getloadavg()}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    sections = set(args.sections.split(","))
    if "kernels" in sections:
        started = os.getloadavg()
        print("== kernels: one token's matmuls of the 124M model (48 block matrices + head), batch 1", flush=True)
        rows = kernel_rows(args.repeats, not args.skip_compile)
        fp32 = rows[0]["ms"]
        for r in rows:
            if "ms" in r:
                r["speedup_vs_fp32"] = round(fp32 / r["ms"], 2)
                print(f"{r['name']:<70}{r['ms']:>8.2f} ms  x{r['speedup_vs_fp32']:<5} err {r['rel_error']:.4f}  "
                      f"{r['note']}")
            else:
                print(f"{r['name']:<70} unavailable: {r['error']}")
        result["kernels"] = rows
        done("kernels", started)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, section in (("gpt2", gpt2_section), ("quality", quality_section), ("smollm2", smollm2_section)):
            if name in sections:
                started = os.getloadavg()
                section(work, args, result)
                done(name, started)

    print(f"wrote {args.out}")


def gpt2_section(work: Path, args, result: dict) -> None:
    """The 124M slm model: fp32 against each method and head/embedding choice."""
    torch.manual_seed(0)
    save_model(work / "gpt2-fp32", GPT(preset("gpt2")))
    src = str(work / "gpt2-fp32")
    print("== gpt2-shaped slm model (124M, random init), each in a fresh process", flush=True)
    variants = {
        "fp32": (src, None),
        "dynamic-int8 (default)": (src, QuantConfig()),  # auto = dynamic-int8 for slm GPTs
        "dynamic-int8, head fp32": (src, QuantConfig(exclude=["lm_head"])),
        "dynamic-int8, emb fp32": (src, QuantConfig(exclude=["transformer.wte"])),
        "weight-int8": (src, QuantConfig(method="weight-int8")),
        "weight-int4": (src, QuantConfig(method="weight-int4")),
    }
    gpt2 = model_rows(work, variants, BenchConfig(rounds=args.rounds))
    print_models(gpt2)
    result["gpt2"] = gpt2
    d = gpt2[1]["ratios"]
    result["targets_gpt2"] = {"decode_x": d["decode_tok_s"], "decode_ok": d["decode_tok_s"] >= 3.0,
                              "size": d["file_bytes"], "size_ok": d["file_bytes"] <= 0.35,
                              "rss": d["peak_rss_bytes"], "rss_ok": d["peak_rss_bytes"] <= 0.5}
    print("targets (dynamic-int8 vs fp32):", result["targets_gpt2"], flush=True)


def quality_section(work: Path, args, result: dict) -> None:
    """Perplexity of a trained tiny model on held-out text, fp32 against every method and
    head/embedding choice (in this process: quality does not depend on the process)."""
    from slm.data import DataConfig, TokenStream
    from slm.loading import open_model
    from slm.recipes.evaluate import loss_module, split_loss

    src = args.tiny_model
    if not Path(src).exists():  # the same command a user runs; --seed fixes the result
        print(f"== training the tiny model: slm train, {args.tiny_steps} steps on wiki-vital -> {src}", flush=True)
        subprocess.run([sys.executable, "-m", "slm", "train", "--data", "wiki-vital", "--preset", "tiny",
                        "--batch-size", "8", "--block-size", "256", "--lr", "1e-3", "--warmup-steps", "20",
                        "--max-steps", str(args.tiny_steps), "--eval-every", "100", "--seed", "0", "--out", src],
                       check=True)
    data = DataConfig(source="wiki-vital")
    train = iter(TokenStream(data, split="train", block_size=256, batch_size=4, seed=0))
    calibration = [next(train)[0] for _ in range(16)]  # 16 batches of 4 x 256 training tokens
    variants = {"fp32": None, "dynamic-int8 (default)": QuantConfig(),
                "dynamic-int8, head fp32": QuantConfig(exclude=["lm_head"]),
                "dynamic-int8, emb fp32": QuantConfig(exclude=["transformer.wte"]),
                "dynamic-int8, head+emb fp32": QuantConfig(exclude=["lm_head", "transformer.wte"]),
                "weight-int8": QuantConfig(method="weight-int8"),
                "weight-int4": QuantConfig(method="weight-int4"),
                "static-int8 (16 x 4 x 256 training tokens)": QuantConfig(method="static-int8")}
    print(f"== quality: {src}, perplexity on wiki-vital's val split", flush=True)
    out = []
    for name, qcfg in variants.items():
        path = src
        if qcfg is not None:
            path = str(work / f"tiny-{len(out)}")
            quantize_to_dir(src, path, qcfg, calibration=lambda tokenizer, block: calibration)
        m = open_model(path)
        r = split_loss(loss_module(m, path), 256, data, "val")
        row = {"name": name, "perplexity": r["perplexity"], "eval_tokens": r["tokens"],
               "file_bytes": weights_bytes(m.path)}  # a run dir: the checkpoint loaded, without optimizer state
        row["perplexity_change"] = row["perplexity"] / out[0]["perplexity"] - 1 if out else 0.0
        out.append(row)
        print(f"{name:<44} ppl {row['perplexity']:9.3f}  {row['perplexity_change']:+7.2%}  "
              f"{row['file_bytes'] / 1e6:7.1f} MB", flush=True)
    result["quality_tiny"] = out
    rise = out[1]["perplexity_change"]
    result["targets_quality"] = {"ppl_rise": rise, "ppl_ok": rise <= 0.02}
    print("target (default int8 perplexity rise <= 2 %):", result["targets_quality"], flush=True)


def smollm2_section(work: Path, args, result: dict) -> None:
    """SmolLM2-135M against its int8 copy: the SQL fine-tune given by --sql-model (an `slm finetune
    --merge` output, scored on --sql-data), else the alias (a GGUF file) saved once as fp32."""
    if args.sql_model:
        src, what = Path(args.sql_model), f"SQL fine-tune {args.sql_model}"
    else:
        from slm.interop.hf_causal import load_hf

        model, tok = load_hf("smollm2-135m-instruct")
        src, what = work / "smollm2-fp32", "SmolLM2-135M-Instruct (fp32 from the offline GGUF)"
        model.hf.save_pretrained(src)
        tok.hf.save_pretrained(src)
        del model
    print(f"== {what} against int8", flush=True)
    smol = model_rows(work, {"fp32": (str(src), None), "weight-int8 (default)": (str(src), QuantConfig()),
                             "dynamic-int8": (str(src), QuantConfig(method="dynamic-int8")),
                             "dynamic-int8, lm_head+down_proj fp32": (
                                 str(src), QuantConfig(method="dynamic-int8", exclude=["lm_head", "down_proj"])),
                             "weight-int4": (str(src), QuantConfig(method="weight-int4"))},
                      BenchConfig(rounds=args.rounds, sql_data=args.sql_data))
    print_models(smol)
    result["smollm2"] = {"model": what, "sql_data": args.sql_data, "rows": smol}
    x = smol[1]["ratios"]["decode_tok_s"]
    targets = {"decode_x": x, "decode_ok": x >= 1.5}  # the default (weight-int8) against fp32
    if args.sql_data:
        drop = 100 * (smol[0]["execution_accuracy"] - smol[1]["execution_accuracy"])
        targets.update(ea_drop_points=drop, ea_ok=drop <= 2.0)
    result["targets_smollm2"] = targets
    print("targets (SmolLM2 int8: decode >= 1.5x fp32, execution accuracy drop <= 2 points):", targets, flush=True)


if __name__ == "__main__":
    main()
