"""Core commands: init, convert, info, tokenize, generate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from slm.artifacts import read_artifact, resolve_artifact_dir, save_model
from slm.cli.options import add_dataclass_args, add_device, add_dtype, add_json, add_model, add_out, from_args, given
from slm.config import PRESETS, ModelConfig, resolve_model_config
from slm.generate import GenerationStats, SamplingConfig, generate
from slm.model import GPT
from slm.runtime import WEIGHT_DTYPES, resolve_device, resolve_dtype
from slm.tokenizer import get_tokenizer


def add_model_shape_args(p: argparse.ArgumentParser) -> None:
    """--preset plus one flag per ModelConfig field, for commands that build a model."""
    p.add_argument("--preset", choices=list(PRESETS), help="named model size (default: tiny)")
    add_dataclass_args(p, ModelConfig, exclude=("vocab_size",))


def model_config_from_args(args) -> ModelConfig:
    return resolve_model_config(args.preset, **given(args, ModelConfig))


def register(sub) -> None:
    p = sub.add_parser("init", help="write a freshly initialized model directory")
    add_model_shape_args(p)
    add_out(p, "output model directory")
    p.add_argument("--seed", type=int, default=0, help="initialization seed (default: 0)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("convert", help="convert GPT-2 weights (Hugging Face or GGUF) into an slm model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="local Hugging Face GPT-2 directory")
    src.add_argument("--from-gguf", metavar="FILE", help="GPT-2 GGUF file (f32, f16 or q8_0; dequantized to fp32)")
    add_out(p, "output model directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="show a model's shape, parameter counts and tokenizer")
    p.add_argument("--model", help="slm model or run directory (instead of a preset or shape flags)")
    add_model_shape_args(p)
    add_json(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tokenize", help="print the GPT-2 token ids of a text")
    p.add_argument("text")
    add_json(p, '{"ids": [...], "tokenizer": {...}}')
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("generate", help="sample text from a model, streaming tokens to stdout")
    add_model(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    add_dataclass_args(p, SamplingConfig)
    add_dtype(p, WEIGHT_DTYPES, "weight precision (auto: fp32)")
    add_device(p)
    add_json(p, 'one JSON object: {"text", "tokens", "prefill_tok_s", "decode_tok_s", ...}')
    p.set_defaults(func=cmd_generate)


def cmd_init(args) -> int:
    cfg = model_config_from_args(args)
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    save_model(args.out, model, metadata={"created_by": "slm init", "preset": args.preset, "seed": args.seed})
    print(f"wrote {args.out}: {model.num_params() / 1e6:.2f}M parameters "
          f"({cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, context {cfg.block_size})")


def cmd_convert(args) -> int:
    if args.from_gguf:
        from slm.interop.gguf import read_gguf_gpt2

        cfg, tensors, meta = read_gguf_gpt2(args.from_gguf)
        source = {"gguf": str(args.from_gguf), **({"gguf_metadata": meta} if meta else {})}
    else:
        from slm.interop.hf import load_hf_gpt2

        cfg, tensors = load_hf_gpt2(args.from_hf)
        source = {"hf": str(args.from_hf)}
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight
    save_model(args.out, model, metadata={"created_by": "slm convert", "source": source})
    print(f"wrote {args.out}: {model.num_params() / 1e6:.2f}M parameters from {args.from_hf or args.from_gguf}")


def describe(cfg: ModelConfig) -> dict:
    return {
        "model": cfg.to_dict(),
        "params": cfg.num_params(),
        "non_embedding_params": cfg.num_params(non_embedding=True),
        "flops_per_token_train": cfg.flops_per_token(),
    }


def cmd_info(args) -> int:
    if args.model:
        art = read_artifact(resolve_artifact_dir(Path(args.model)))
        out = describe(art.model) | {"tokenizer": art.tokenizer.to_dict(), "path": str(art.path),
                                     "slm_version": art.raw.get("slm_version"), "metadata": art.metadata}
    else:
        out = describe(model_config_from_args(args)) | {"preset": args.preset or "tiny"}
    if args.json:
        print(json.dumps(out))
        return 0
    m = out["model"]
    print(f"{'model ' + out['path'] if 'path' in out else 'preset ' + out['preset']}")
    print(f"  layers {m['n_layer']}, heads {m['n_head']}, width {m['n_embd']}, context {m['block_size']}, "
          f"vocab {m['vocab_size']}, bias {m['bias']}")
    print(f"  parameters {out['params']:,} ({out['params'] / 1e6:.1f}M); non-embedding "
          f"{out['non_embedding_params']:,} ({out['non_embedding_params'] / 1e6:.1f}M)")
    print(f"  training FLOPs per token {out['flops_per_token_train']:.3g}")
    if "tokenizer" in out:
        t = out["tokenizer"]
        print(f"  tokenizer {t['name']} fingerprint {t['fingerprint']}")


def cmd_tokenize(args) -> int:
    tok = get_tokenizer()
    ids = tok.encode(args.text)
    if args.json:
        print(json.dumps({"ids": ids, "tokenizer": tok.identity.to_dict()}))
    else:
        print(" ".join(map(str, ids)))


def cmd_generate(args) -> int:
    from slm.loading import open_model

    cfg = from_args(SamplingConfig, args)
    loaded = open_model(args.model, device=resolve_device(args.device), dtype=resolve_dtype(args.dtype))
    tok, block = loaded.tokenizer, loaded.model.config.block_size
    prompt = tok.encode(args.prompt) if args.prompt else tok.start_ids
    if len(prompt) > block:
        print(f"note: the prompt has {len(prompt)} tokens; only the last {block} fit the context window",
              file=sys.stderr)
    stats = GenerationStats()
    decoder = tok.stream_decoder()
    pieces = []
    if not args.json:
        sys.stdout.write(args.prompt)
    for t in generate(loaded.model, prompt, cfg, stop_ids=tok.stop_ids, vocab_limit=tok.n_vocab, stats=stats):
        pieces.append(decoder.add(t))
        if not args.json:
            sys.stdout.write(pieces[-1])
            sys.stdout.flush()
    pieces.append(decoder.flush())
    text = "".join(pieces)
    if args.json:
        print(json.dumps({
            "text": text,
            "tokens": stats.new_tokens,
            "prompt_tokens": stats.prompt_tokens,
            "finish_reason": stats.finish_reason,
            "prefill_tok_s": round(stats.prefill_tok_s, 2),
            "decode_tok_s": round(stats.decode_tok_s, 2),
            "prefill_seconds": round(stats.prefill_seconds, 4),
            "decode_seconds": round(stats.decode_seconds, 4),
        }))
    else:
        sys.stdout.write(pieces[-1] + "\n")
        print(f"[{stats.new_tokens} tokens, {stats.finish_reason}; prefill {stats.prefill_tok_s:.1f} tok/s, "
              f"decode {stats.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    return 0
