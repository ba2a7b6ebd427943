"""The fine-tune recipe: a base model, LoRA (or full) weights, completion-only batches and loss,
run by slm's training loop (`slm.engine.trainer.Trainer`).

What this recipe plugs into the trainer (`TrainTask`):
- `module`: `CompletionLoss`, the model plus a loss over completion tokens only; the output
  head runs only on positions that have a target (the SQL answer is ~10% of each sequence,
  and the head is a fifth of SmolLM2's FLOPs);
- `batches`: `encode.BatchSampler`, resumable;
- `eval_batches`: the held-out examples ("val" halves for periodic evaluation, "test" for the end);
- `save_model` / `load_model`: a checkpoint is itself a fine-tune artifact (LoRA: the adapter
  and its config.json, a few MB; full: a standalone model), so `--model RUN/step-N` works.

Everything else (AdamW, schedule, accumulation, clipping, bf16 autocast, guards, checkpoints,
resume, metrics.jsonl, progress) is the trainer's, exactly as `slm train` uses it.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from slm.artifacts import read_tensors, write_json
from slm.errors import SlmError
from slm.finetune.artifact import Base, finetune_config, load_base, save_standalone, write_finetune
from slm.recipes.config import FinetuneConfig, FinetuneTrainConfig, LoraSettings
from slm.tasks.examples import load_examples, split_holdout
from slm.tasks.encode import IGNORE, BatchSampler, Encoded, collate, encode_all
from slm.lora import apply_lora, checkpoint_activations, inner_module, save_adapter, trainable_share
from slm.model import GPT
from slm.engine.losses import linear_cross_entropy
from slm.engine.trainer import Trainer, TrainTask
from slm.recipes.pretrain import RunLock, has_run

SUMMARY_FILE = "finetune_summary.json"


class CompletionLoss(nn.Module):
    """`module(idx, targets) -> mean loss` over the completion tokens (targets != -100)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h, head = hidden_and_head(self.model, idx)
        keep = targets != IGNORE
        return linear_cross_entropy(h[keep], head, targets[keep])


def hidden_and_head(model: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states (B, T, d) and the output head's weight (V, d)."""
    if isinstance(model, GPT):
        return model.hidden_states(idx), model.lm_head.weight
    hf = model.hf
    head = hf.get_output_embeddings()
    cfg = hf.config
    if getattr(head, "bias", None) is not None or getattr(cfg, "final_logit_softcapping", None) or \
            getattr(cfg, "logit_scale", None):
        raise SlmError(f"{type(hf).__name__} transforms its logits beyond a plain head; slm finetune cannot train it")
    return hf.base_model(input_ids=idx, use_cache=False).last_hidden_state, head.weight


class EvalBatches:
    """Fixed batches of held-out examples, shortest first (little padding)."""

    def __init__(self, data: list[Encoded], batch_size: int, pad_id: int):
        self.data = sorted(data, key=len)
        self.batch_size, self.pad_id = batch_size, pad_id

    def __iter__(self):
        for i in range(0, len(self.data), self.batch_size):
            yield collate(self.data[i:i + self.batch_size], self.pad_id)


def _pad_id(tokenizer) -> int:
    pad = getattr(getattr(tokenizer, "hf", None), "pad_token_id", None)
    return pad if pad is not None else tokenizer.eot_id


def make_task(base: Base, method: str, peft_model, train: BatchSampler, val: list[Encoded], test: list[Encoded],
              batch_size: int) -> TrainTask:
    module = CompletionLoss(base.model)
    pad = _pad_id(base.tokenizer)

    def save_model(directory: Path, state_dict: dict, metadata: dict) -> None:
        # The weights come from the live model, which outside FSDP (refused) equals `state_dict`.
        if peft_model is not None:
            save_adapter(peft_model, directory)
            write_json(directory / "config.json", finetune_config(base, method, ".", None, metadata))
        else:
            save_standalone(base.model, base, directory, metadata)

    def load_model(directory: Path) -> dict:
        # Frozen base weights never change: reading the trained ones into the live model and
        # returning its whole state gives the trainer the checkpoint's full state dict.
        if peft_model is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(peft_model, read_tensors(directory / "adapter_model.safetensors"))
        else:
            inner_module(base.model).load_state_dict(read_tensors(directory / "model.safetensors"), strict=False)
        return module.state_dict()

    n_params = sum(p.numel() for p in base.model.parameters())
    return TrainTask(module=module, batches=train, save_model=save_model, load_model=load_model,
                     eval_batches=lambda split: EvalBatches(val if split == "val" else test, batch_size, pad),
                     flops_per_token=(4 if method == "lora" else 6) * n_params)


def finetune(fcfg: FinetuneConfig, lcfg: LoraSettings, tcfg: FinetuneTrainConfig, out: str | Path,
             resume: bool = False, quiet: bool = False) -> dict:
    """Fine-tune `fcfg.base` on `fcfg.data` into `out`; returns the summary (also in out/finetune_summary.json)."""
    from slm.engine import distributed as D
    from slm.engine.metrics import Progress

    out = Path(out)
    if fcfg.data is None:
        raise SlmError("give the training examples with --data (e.g. a file written by `slm sql-data`)")
    if tcfg.fsdp:
        raise SlmError("slm finetune does not shard with FSDP; the models it tunes fit one device (use DDP)")
    if fcfg.epochs is not None and tcfg.max_steps is not None:
        raise SlmError("give --max-steps or --epochs, not both")
    if fcfg.epochs is None and tcfg.max_steps is None and tcfg.max_minutes is None:
        raise SlmError("say how long to train: --max-steps N, --epochs E or --max-minutes M")
    if not resume and (has_run(out) or (out / "config.json").exists()):
        raise SlmError(f"{out} already holds a fine-tune; pass --resume to continue it, or choose another --out")
    info = D.setup(tcfg.device)
    try:
        progress = Progress(tcfg.log_every, enabled=info.is_main and not quiet)
        say = progress.message
        t0 = time.perf_counter()
        examples, fmt, load_stats = load_examples(fcfg.data, fcfg.format, fcfg.limit)
        if fcfg.val_data:
            train_ex, held = examples, load_examples(fcfg.val_data, fcfg.format)[0][: fcfg.holdout_max]
        else:
            train_ex, held = split_holdout(examples, fcfg.holdout_fraction, fcfg.holdout_max)
        base = load_base(fcfg.base, info.device)
        tok = base.tokenizer
        train_enc, enc_stats = encode_all(tok, train_ex, fcfg.max_seq_len, fcfg.truncation)
        held_enc, _ = encode_all(tok, held, fcfg.max_seq_len, fcfg.truncation)
        val_enc, test_enc = held_enc[::2], held_enc[1::2]
        say(f"data: {fcfg.data} ({fmt}): {len(train_ex)} training examples, {enc_stats.kept} kept, "
            f"{enc_stats.truncated} truncated, {enc_stats.dropped} dropped (> {fcfg.max_seq_len} tokens); "
            f"held out {len(val_enc)} val + {len(test_enc)} test")
        torch.manual_seed(tcfg.seed)
        if fcfg.activation_checkpointing:
            checkpoint_activations(base.model)
        peft_model = None
        if fcfg.method == "lora":
            peft_model = apply_lora(base.model, lcfg)
        trainable, total = trainable_share(base.model)
        say(f"base: {base.spec} ({base.kind}); {fcfg.method}: {trainable:,} of {total:,} parameters trainable "
            f"({100 * trainable / total:.2f}%)")
        sampler = BatchSampler(train_enc, tcfg.batch_size, seed=tcfg.seed, pad_id=_pad_id(tok))
        if fcfg.epochs is not None:
            tcfg.max_steps = max(1, math.ceil(fcfg.epochs * sampler.batches_per_epoch / tcfg.grad_accum))
        task = make_task(base, fcfg.method, peft_model, sampler, val_enc, test_enc, tcfg.batch_size)
        task.module.train()
        meta = {"created_by": "slm finetune", "base": base.spec, "method": fcfg.method}
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
        with RunLock(out) if info.is_main else contextlib.nullcontext():
            trainer = Trainer(task, tcfg, out, info, progress, metadata=meta)
            if resume:
                trainer.resume()
            summary = trainer.fit()
            if summary["stopped"] == "signal" or not info.is_main:
                return summary
            settings = {"finetune": _jsonable(fcfg), "lora": _jsonable(lcfg) if peft_model else None,
                        "train": _jsonable(tcfg)}
            summary.update({
                "out": str(out), "base": base.spec, "method": fcfg.method,
                "trainable_params": trainable, "total_params": total, "trainable_share": round(trainable / total, 5),
                "data": {"source": fcfg.data, "format": fmt, **load_stats.summary()}, "examples": enc_stats.summary(),
                "total_seconds": round(time.perf_counter() - t0, 1),
            })
            write_finetune(out, base, fcfg.method, peft_model, fcfg.merge, {**meta, "settings": settings,
                                                                             "results": _results(summary)})
            write_json(out / SUMMARY_FILE, summary)
            say(f"wrote {out}" + (" (adapter + merged model)" if fcfg.merge and peft_model else ""))
        return summary
    finally:
        D.teardown()


def _jsonable(cfg) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(cfg), default=str))


def _results(summary: dict) -> dict:
    keys = ("steps", "tokens", "final_val_loss", "test_loss", "tokens_per_s", "wall_seconds", "trainable_share")
    return {k: summary.get(k) for k in keys}


def print_summary(summary: dict) -> None:
    from slm.engine.trainer import describe_summary

    print(f"fine-tuned {summary['base']} ({summary['method']}; {100 * summary['trainable_share']:.2f}% of "
          f"parameters trained; {summary['examples']['kept']} examples, {summary['examples']['dropped']} dropped "
          f"as too long)", file=sys.stderr)
    print(describe_summary(summary), file=sys.stderr)
