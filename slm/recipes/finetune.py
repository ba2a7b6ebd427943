"""Fine-tuning recipe: a base model, LoRA (or full) weights, completion-only batches and loss,
run by the engine.

What this recipe plugs into the trainer (`TrainTask`):
- `module`: `CompletionLoss`, the model plus a loss over completion tokens only; the output
  head runs only on positions that have a target (an answer is a small part of each sequence,
  and the head a large part of a small model's FLOPs);
- `batches`: `tasks.encode.BatchSampler`, resumable;
- `eval_batches`: the held-out examples ("val" halves for periodic evaluation, "test" for the end);
- `save_model` / `load_model`: a checkpoint is itself a fine-tune artifact (LoRA: the adapter
  and its config.json, a few MB; full: a standalone model), so `--model RUN/step-N` works.

The run directory at the end (`write_finetune`):

    OUT/config.json   {"format": "slm", "kind": "finetune", "base": SPEC, "base_kind": "hf"|"gpt",
                       "method": "lora"|"full", "tokenizer": {identity}, "adapter": "adapter"|null,
                       "model": "model"|null, "metadata": {settings, data, results}}
    OUT/adapter/      the LoRA adapter alone (peft format; Hugging Face tokenizer files beside it)
    OUT/model/        a standalone model (`--merge`, or `--method full`): a Hugging Face model
                      directory with its tokenizer, or an slm model directory
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from slm.artifacts import FINETUNE, HF_KIND, header, read_tensors, save_model
from slm.engine.losses import IGNORE_INDEX, linear_cross_entropy
from slm.engine.metrics import describe_summary
from slm.engine.run import Run
from slm.engine.trainer import TrainTask
from slm.errors import SlmError
from slm.io import write_json
from slm.loading import Base, load_base
from slm.lora import LoraSettings, apply_lora, checkpoint_activations, inner_module, merge, save_adapter, trainable_share
from slm.model import GPT
from slm.recipes.config import FinetuneConfig, FinetuneTrainConfig
from slm.tasks.encode import BatchSampler, Encoded, collate, encode_all
from slm.tasks.examples import load_examples, split_holdout

SUMMARY_FILE = "finetune_summary.json"
SETTINGS_FILE = "finetune_config.json"


class CompletionLoss(nn.Module):
    """`module(idx, targets) -> mean loss` over the completion tokens (targets != -100)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h, head = hidden_and_head(self.model, idx)
        keep = targets != IGNORE_INDEX
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

    def close(self) -> None:
        pass


def _pad_id(tokenizer) -> int:
    pad = getattr(getattr(tokenizer, "hf", None), "pad_token_id", None)
    return pad if pad is not None else tokenizer.eot_id


def make_task(base: Base, method: str, peft_model, train: BatchSampler, val: list[Encoded], test: list[Encoded],
              batch_size: int) -> TrainTask:
    module = CompletionLoss(base.model)
    pad = _pad_id(base.tokenizer)

    def save_model_dir(directory: Path, state_dict: dict, metadata: dict) -> None:
        # The weights come from the live model, which outside FSDP (refused) equals `state_dict`.
        if peft_model is not None:
            save_adapter(peft_model, directory)
            write_json(directory / "config.json", finetune_header(base, method, ".", None, metadata))
        else:
            save_standalone(base.model, base, directory, metadata)

    def load_model_dir(directory: Path) -> dict:
        # Frozen base weights never change: reading the trained ones into the live model and
        # returning its whole state gives the trainer the checkpoint's full state dict.
        if peft_model is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(peft_model, read_tensors(directory / "adapter_model.safetensors"))
        else:
            inner_module(base.model).load_state_dict(read_tensors(directory / "model.safetensors"), strict=False)
        return module.state_dict()

    n_params = sum(p.numel() for p in base.model.parameters())
    return TrainTask(module=module, batches=train, save_model=save_model_dir, load_model=load_model_dir,
                     eval_batches=lambda split: EvalBatches(val if split == "val" else test, batch_size, pad),
                     flops_per_token=(4 if method == "lora" else 6) * n_params)


def finetune(fcfg: FinetuneConfig, lcfg: LoraSettings, tcfg: FinetuneTrainConfig, out: str | Path,
             resume: bool = False, quiet: bool = False) -> dict:
    """Fine-tune `fcfg.base` on `fcfg.data` into `out`; returns the summary (also in out/finetune_summary.json)."""
    if fcfg.data is None:
        raise SlmError("give the training examples with --data (e.g. a file written by `slm sql-data`)")
    if tcfg.fsdp:
        raise SlmError("slm finetune does not shard with FSDP; the models it tunes fit one device (use DDP)")
    if fcfg.epochs is not None and tcfg.max_steps is not None:
        raise SlmError("give --max-steps or --epochs, not both")
    if fcfg.epochs is None and tcfg.max_steps is None and tcfg.max_minutes is None:
        raise SlmError("say how long to train: --max-steps N, --epochs E or --max-minutes M")
    with Run(out, tcfg, resume=resume, quiet=quiet, what="fine-tune", command="slm finetune",
             config_file=SETTINGS_FILE, summary_file=SUMMARY_FILE, markers=("config.json",),
             check_length=False) as run:
        t0 = time.perf_counter()
        examples, fmt, load_stats = load_examples(fcfg.data, fcfg.format, fcfg.limit)
        if fcfg.val_data:
            train_ex, held = examples, load_examples(fcfg.val_data, fcfg.format)[0][: fcfg.holdout_max]
        else:
            train_ex, held = split_holdout(examples, fcfg.holdout_fraction, fcfg.holdout_max)
        base = load_base(fcfg.base, run.info.device)
        tok = base.tokenizer
        train_enc, enc_stats = encode_all(tok, train_ex, fcfg.max_seq_len, fcfg.truncation)
        held_enc, _ = encode_all(tok, held, fcfg.max_seq_len, fcfg.truncation)
        val_enc, test_enc = held_enc[::2], held_enc[1::2]
        run.report(f"data: {fcfg.data} ({fmt}): {len(train_ex)} training examples, {enc_stats.kept} kept, "
                   f"{enc_stats.truncated} truncated, {enc_stats.dropped} dropped (> {fcfg.max_seq_len} tokens); "
                   f"held out {len(val_enc)} val + {len(test_enc)} test")
        torch.manual_seed(tcfg.seed)
        if fcfg.activation_checkpointing:
            checkpoint_activations(base.model)
        peft_model = apply_lora(base.model, lcfg) if fcfg.method == "lora" else None
        trainable, total = trainable_share(base.model)
        run.report(f"base: {base.spec} ({base.kind}); {fcfg.method}: {trainable:,} of {total:,} parameters "
                   f"trainable ({100 * trainable / total:.2f}%)")
        sampler = BatchSampler(train_enc, tcfg.batch_size, seed=tcfg.seed, pad_id=_pad_id(tok))
        if fcfg.epochs is not None:
            tcfg.max_steps = max(1, math.ceil(fcfg.epochs * sampler.batches_per_epoch / tcfg.grad_accum))
        task = make_task(base, fcfg.method, peft_model, sampler, val_enc, test_enc, tcfg.batch_size)
        task.module.train()
        meta = {"created_by": "slm finetune", "base": base.spec, "method": fcfg.method}
        settings = {"finetune": _jsonable(fcfg), "lora": _jsonable(lcfg) if peft_model else None,
                    "train": _jsonable(tcfg)}
        run.start(config=settings)
        summary = run.fit(task, metadata=meta)
        if summary["stopped"] == "signal" or not run.is_main:
            return summary
        summary.update({
            "out": str(out), "base": base.spec, "method": fcfg.method,
            "trainable_params": trainable, "total_params": total, "trainable_share": round(trainable / total, 5),
            "data": {"source": fcfg.data, "format": fmt, **load_stats.summary()}, "examples": enc_stats.summary(),
            "total_seconds": round(time.perf_counter() - t0, 1),
        })
        write_finetune(out, base, fcfg.method, peft_model, fcfg.merge, {**meta, "settings": settings,
                                                                        "results": _results(summary)})
        run.finish(summary)
        run.report(f"wrote {out}" + (" (adapter + merged model)" if fcfg.merge and peft_model else ""))
        return summary


# ---------------------------------------------------------------------------- the fine-tune artifact


def finetune_header(base: Base, method: str, adapter: str | None, model: str | None, metadata: dict) -> dict:
    """config.json of a fine-tune artifact; `adapter`/`model` are paths relative to it ("." = beside it)."""
    return header(FINETUNE, base.tokenizer.identity, metadata, base=base.spec, base_kind=base.kind, method=method,
                  adapter=adapter, model=model)


def save_standalone(model: nn.Module, base: Base, directory: Path, metadata: dict) -> None:
    if isinstance(model, GPT):
        save_model(directory, model, base.tokenizer, metadata)
    else:
        model.hf.save_pretrained(str(directory))
        base.tokenizer.hf.save_pretrained(str(directory))


def write_finetune(out: str | Path, base: Base, method: str, peft_model=None, merge_adapter: bool = False,
                   metadata: dict | None = None) -> dict:
    """Write the adapter (LoRA) and/or the standalone model, then config.json, which names
    only what is complete."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = model = None
    if peft_model is not None:
        save_adapter(peft_model, out / "adapter")
        if base.kind == HF_KIND:
            base.tokenizer.hf.save_pretrained(str(out / "adapter"))
        adapter = "adapter"
    if method == "full" or merge_adapter:
        if peft_model is not None:
            merge(peft_model)  # in place: base.model now holds the merged weights
        base.model.eval()
        save_standalone(base.model, base, out / "model", {"created_by": "slm finetune", "base": base.spec})
        model = "model"
    cfg = finetune_header(base, method, adapter, model, metadata or {})
    write_json(out / "config.json", cfg)
    return cfg


def _jsonable(cfg) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


def _results(summary: dict) -> dict:
    keys = ("steps", "tokens", "final_val_loss", "test_loss", "tokens_per_s", "wall_seconds", "trainable_share")
    return {k: summary.get(k) for k in keys}


def print_summary(summary: dict) -> None:
    print(f"fine-tuned {summary['base']} ({summary['method']}; {100 * summary['trainable_share']:.2f}% of "
          f"parameters trained; {summary['examples']['kept']} examples, {summary['examples']['dropped']} dropped "
          f"as too long)", file=sys.stderr)
    print(describe_summary(summary), file=sys.stderr)
