"""Plan before you spend: memory per device, whether it fits, FLOPs per token, time and cost.

Memory is counted from the model's shape, the way slm trains it (fp32 master weights, AdamW,
bf16 autocast or fp32, the chunked loss of losses.py):

- weights, gradients: 4 bytes per parameter; AdamW moments: 8 bytes per parameter (all divided
  by the number of devices under FSDP, plus the gathered unit being computed);
- activations kept for backward, per layer per token: 17 vectors of width d in fp32 (the
  residual input, LayerNorm outputs, q/k/v, attention output and its contiguous copy, the MLP's
  4d input and GELU output), or 38 bytes per width unit under bf16 autocast, where the residual
  stream stays fp32 and matmul inputs are bf16 copies; plus attention's log-sum-exp; with
  dropout, the masks and the materialized attention matrix;
- the loss: the head's weight gradient and one chunk of logits and probabilities (losses.py),
  bf16 copies under autocast;
- the runtime: this process's own footprint on CPU (Python, torch and libraries, measured), an
  assumed CUDA context on GPUs.

Time: on CPU, the measured speed of real training steps of the configuration (or, when a step
would take too long to measure, the measured matmul peak times an assumed MFU); on GPUs, the
datasheet peak times an assumed MFU. Every assumption is printed with the plan.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import psutil
import torch

from slm.config import ModelConfig
from slm.errors import SlmError
from slm.engine import losses
from slm.engine.hardware import DEVICE_CHOICES, GPUS, cpu_matmul_peak, detect_gpu, gpu_spec
from slm.runtime import AUTOCAST_DTYPES, DEFAULT_DTYPE, cpu_bf16_native, dtype_name

GIB = 1024**3
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # assumed: CUDA context + kernels, per GPU
GPU_MFU = 0.40  # assumed model FLOPs utilization on GPUs
CPU_MFU = 0.40  # assumed on CPU when a step is too slow to measure
HEADROOM = 0.90  # plan to use at most this share of a device's memory


@dataclass
class PlanRequest:
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch per device"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    dtype: str = field(default=DEFAULT_DTYPE, metadata={
        "help": "bf16 autocast or fp32 (auto: bf16 on GPUs and on CPUs with native bf16)",
        "choices": list(AUTOCAST_DTYPES)})
    device: str = field(default="cpu", metadata={
        "help": "cpu (measured here), cuda (the attached GPU) or a GPU type", "choices": DEVICE_CHOICES})
    num_gpus: int = field(default=1, metadata={"help": "data-parallel devices (processes on cpu)"})
    fsdp: bool = field(default=False, metadata={"help": "shard weights, gradients and optimizer states (FSDP)"})
    tokens: float | None = field(default=None, metadata={"help": "training tokens to estimate time and cost for"})
    price_per_gpu_hour: float | None = field(default=None, metadata={
        "help": "USD per device-hour (default: a rough cloud price per GPU type)"})
    mfu: float | None = field(default=None, metadata={"help": f"assumed GPU MFU (default: {GPU_MFU})"})
    memory_gb: float | None = field(default=None, metadata={
        "help": "device memory to plan for, GB (default: detected, or the datasheet)"})

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "num_gpus"):
            if getattr(self, name) < 1:
                raise SlmError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.dtype = dtype_name(self.dtype, AUTOCAST_DTYPES)
        if self.dtype == "auto":
            self.dtype = "bf16" if self.device != "cpu" or cpu_bf16_native() else "fp32"
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise SlmError(f"mfu must be in (0, 1], got {self.mfu}")

    @property
    def block_size(self) -> int:
        return self.model.block_size


def activation_bytes(cfg: ModelConfig, batch_size: int, bf16: bool) -> int:
    """Tensors saved for backward by one micro-batch's forward pass (see the module docstring)."""
    B, T, d, L, H = batch_size, cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head
    per_layer = B * T * d * (38 if bf16 else 68)
    per_layer += B * H * T * 4  # attention log-sum-exp
    per_layer += 2 * 2 * B * T * 4  # LayerNorm mean and rstd
    if cfg.dropout > 0:
        per_layer += 2 * B * T * d  # residual dropout masks
        per_layer += B * H * T * T * ((2 if bf16 else 4) * 2 + 1)  # attention weights, dropped copy, mask
    final = B * T * d * 4 + 2 * B * T * 4  # final LayerNorm input and stats
    return L * per_layer + final + 2 * B * T * 8  # + token ids and targets


def loss_bytes(cfg: ModelConfig, batch_size: int, bf16: bool) -> int:
    """The chunked loss: hidden-state and head-weight gradients, one chunk's logits and
    probabilities, the bf16 head weight under autocast."""
    V, d, N = cfg.vocab_size, cfg.n_embd, batch_size * cfg.block_size
    rows = min(losses.CHUNK_ROWS, N)
    chunk = rows * V * (4 if bf16 else 8) + V * d * (2 if bf16 else 4)  # logits + probabilities, a grad_w term
    weight_cast = V * d * 2 if bf16 else 0
    return N * d * 4 + V * d * 4 + chunk + weight_cast


def memory_breakdown(req: PlanRequest, runtime_bytes: int) -> dict[str, int]:
    cfg = req.model
    n = cfg.num_params()
    shards = req.num_gpus if req.fsdp else 1
    bf16 = req.dtype == "bf16"
    weights = 4 * n // shards
    out = {
        "weights": weights,
        "gradients": 4 * n // shards,
        "optimizer": 8 * n // shards,
        "activations": activation_bytes(cfg, req.batch_size, bf16),
        "loss": loss_bytes(cfg, req.batch_size, bf16),
        # autocast keeps bf16 copies of the block weights for backward
        "casts": 2 * cfg.num_params(non_embedding=True) if bf16 else 0,
        "runtime": runtime_bytes,
    }
    if req.fsdp and shards > 1:
        block = cfg.num_params(non_embedding=True) // cfg.n_layer
        out["fsdp_gathered"] = 2 * 4 * block  # the unit in use and the one prefetched, unsharded
    return out


def device_memory(req: PlanRequest) -> tuple[int, str]:
    """(bytes, where the number comes from) for one device."""
    if req.memory_gb is not None:
        return int(req.memory_gb * 1e9), "given"
    if req.device == "cpu":
        proc = psutil.Process().memory_info().rss
        return psutil.virtual_memory().available + proc, "available RAM"
    if req.device == "cuda":
        if not torch.cuda.is_available():
            raise SlmError("--device cuda, but no CUDA GPU is attached; name a GPU type (e.g. --device h100)")
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    spec = gpu_spec(req.device)
    return int(spec.memory_gb * 1e9), spec.name


def runtime_bytes(device: str) -> int:
    return psutil.Process().memory_info().rss if device == "cpu" else CUDA_CONTEXT_BYTES


def fits(req: PlanRequest, runtime: int) -> tuple[bool, int, int]:
    need = sum(memory_breakdown(req, runtime).values())
    have, _ = device_memory(req)
    procs = req.num_gpus if req.device == "cpu" else 1  # CPU "devices" are processes sharing RAM
    return need * procs <= HEADROOM * have, need, have


def alternative(req: PlanRequest, runtime: int) -> PlanRequest | None:
    """A configuration that fits: smaller micro-batches with more accumulation (same tokens per
    step), then shorter contexts, then FSDP across the GPUs asked for."""
    cands = []
    b, g = req.batch_size, req.grad_accum
    while b > 1:
        b, g = b // 2, g * 2
        cands.append(dataclasses.replace(req, batch_size=b, grad_accum=g))
    T = req.block_size
    while T > 128:
        T //= 2
        cands.append(dataclasses.replace(req, batch_size=1, grad_accum=req.batch_size * req.grad_accum,
                                         model=dataclasses.replace(req.model, block_size=T)))
    if req.num_gpus > 1 and not req.fsdp and req.device != "cpu":
        cands += [dataclasses.replace(c, fsdp=True) for c in [req, *cands]]
    for c in cands:
        if fits(c, runtime)[0]:
            return c
    return None


def measure_cpu_tokens_per_s(req: PlanRequest, steps: int = 2) -> float:
    """Tokens/s of real training steps (slm's train step) of this configuration on this CPU."""
    from slm.engine.config import TrainConfig
    from slm.engine.gpt import RandomBatches, gpt_task
    from slm.engine.trainer import Trainer

    torch.manual_seed(0)
    task = gpt_task(req.model, RandomBatches(req.model, req.batch_size))
    cfg = TrainConfig(batch_size=req.batch_size, grad_accum=req.grad_accum, dtype=req.dtype, max_steps=steps + 1,
                      device="cpu")
    trainer = Trainer(task, cfg, progress=None)
    trainer.progress.enabled = False
    trainer.train_step()  # warm-up: allocations, optimizer state
    t = time.perf_counter()
    tokens = sum(trainer.train_step().tokens for _ in range(steps))
    return tokens / (time.perf_counter() - t)


def make_plan(req: PlanRequest, measure: bool = True) -> dict:
    """The whole plan as a JSON-able dict."""
    cfg = req.model
    runtime = runtime_bytes(req.device)
    mem = memory_breakdown(req, runtime)
    ok, need, have = fits(req, runtime)
    _, have_src = device_memory(req)
    fpt = cfg.flops_per_token(cfg.block_size)
    tokens_per_step = req.batch_size * req.grad_accum * cfg.block_size * req.num_gpus
    assumptions = [f"AdamW with fp32 master weights; {'bf16 autocast' if req.dtype == 'bf16' else 'fp32'} "
                   f"activations; at most {HEADROOM:.0%} of device memory used"]
    out = {
        "model": cfg.to_dict(),
        "params": cfg.num_params(),
        "batch_size": req.batch_size, "grad_accum": req.grad_accum, "block_size": cfg.block_size,
        "dtype": req.dtype, "device": req.device, "num_gpus": req.num_gpus, "fsdp": req.fsdp,
        "tokens_per_step": tokens_per_step,
        "memory_per_device": mem,
        "memory_per_device_total": need,
        "device_memory": have,
        "device_memory_source": have_src,
        "fits": ok,
        "flops_per_token": fpt,
    }
    # throughput
    if req.device == "cpu":
        peak = cpu_matmul_peak(torch.bfloat16 if req.dtype == "bf16" else torch.float32)
        est_step = tokens_per_step * fpt / (peak * CPU_MFU)
        if measure and ok and est_step < 30:
            tok_s = measure_cpu_tokens_per_s(dataclasses.replace(req, num_gpus=1))
            out["throughput_source"] = "measured: 2 training steps of this configuration on this CPU"
            if tok_s * fpt > peak:  # the peak was measured while other programs ran: again, and never below
                peak = max(cpu_matmul_peak(torch.bfloat16 if req.dtype == "bf16" else torch.float32, fresh=True),
                           tok_s * fpt)  # what training just reached
        else:
            tok_s = peak * CPU_MFU / fpt
            out["throughput_source"] = (f"estimated: measured {req.dtype} matmul peak {peak / 1e9:.0f} GFLOP/s x "
                                        f"assumed MFU {CPU_MFU:.0%}")
        out["peak_flops"] = peak
        out["mfu"] = tok_s * fpt / peak
        price = req.price_per_gpu_hour
    else:
        spec = GPUS.get(detect_gpu() if req.device == "cuda" else req.device)
        if spec is None:
            raise SlmError(f"no datasheet for {req.device!r}; name the GPU type with --device "
                           f"({', '.join(GPUS)})")
        peak = 1e12 * (spec.bf16_tflops if req.dtype == "bf16" else spec.fp32_tflops)
        mfu = req.mfu if req.mfu is not None else GPU_MFU
        tok_s = req.num_gpus * peak * mfu / fpt
        out["throughput_source"] = (f"estimated: {spec.name} peak {peak / 1e12:.0f} TFLOP/s "
                                    f"({'bf16' if req.dtype == 'bf16' else 'TF32'} dense) x assumed MFU {mfu:.0%}"
                                    f"{' x ' + str(req.num_gpus) + ' GPUs' if req.num_gpus > 1 else ''}")
        out["peak_flops"] = peak
        out["mfu"] = mfu
        price = req.price_per_gpu_hour if req.price_per_gpu_hour is not None else spec.price_per_hour
        if req.price_per_gpu_hour is None:
            assumptions.append(f"price ${spec.price_per_hour:.2f} per GPU-hour (on-demand cloud, rough; "
                               f"set --price-per-gpu-hour)")
        assumptions.append(f"CUDA context {CUDA_CONTEXT_BYTES / GIB:.1f} GiB per GPU")
    out["tokens_per_s"] = tok_s
    if req.tokens:
        seconds = req.tokens / tok_s
        out["tokens"] = req.tokens
        out["seconds"] = seconds
        out["device_hours"] = seconds / 3600 * req.num_gpus
        out["cost"] = out["device_hours"] * price if price is not None else None
    out["assumptions"] = assumptions
    if not ok:
        alt = alternative(req, runtime)
        out["alternative"] = None if alt is None else {
            "batch_size": alt.batch_size, "grad_accum": alt.grad_accum, "block_size": alt.block_size,
            "fsdp": alt.fsdp, "memory_per_device_total": sum(memory_breakdown(alt, runtime).values())}
    return out


def alternative_flags(alt: dict) -> str:
    flags = f"--batch-size {alt['batch_size']} --grad-accum {alt['grad_accum']}"
    flags += f" --block-size {alt['block_size']}"
    return flags + (" --fsdp" if alt["fsdp"] else "")


def format_plan(p: dict) -> str:
    def gb(x):
        return f"{x / GIB:.2f} GiB"

    m = p["model"]
    lines = [f"model: {p['params'] / 1e6:.1f}M parameters ({m['n_layer']} layers, width {m['n_embd']}, "
             f"context {m['block_size']})",
             f"batch: {p['batch_size']} x {p['block_size']} tokens per micro-batch, {p['grad_accum']} micro-batches"
             f" per step{' per device' if p['num_gpus'] > 1 else ''}, {p['tokens_per_step']:,} tokens per step",
             f"memory per {'process' if p['device'] == 'cpu' else 'device'} ({p['dtype']}"
             f"{', FSDP over ' + str(p['num_gpus']) if p['fsdp'] else ''}):"]
    for k, v in p["memory_per_device"].items():
        lines.append(f"  {k:<14} {gb(v):>12}")
    lines.append(f"  {'total':<14} {gb(p['memory_per_device_total']):>12}   of {gb(p['device_memory'])} "
                 f"({p['device_memory_source']})")
    lines.append("fits: " + ("yes" if p["fits"] else "NO"))
    if not p["fits"]:
        alt = p.get("alternative")
        lines.append("  a configuration that fits: " + (f"{alternative_flags(alt)} ({gb(alt['memory_per_device_total'])})"
                                                        if alt else "none of smaller micro-batches, shorter "
                                                        "contexts or FSDP; choose a smaller model"))
    lines.append(f"FLOPs per token (training): {p['flops_per_token'] / 1e6:.1f} MFLOP")
    lines.append(f"throughput: {p['tokens_per_s']:,.0f} tokens/s ({p['throughput_source']}; MFU {p['mfu']:.0%})")
    if "seconds" in p:
        cost = f", ${p['cost']:,.2f}" if p.get("cost") is not None else ""
        lines.append(f"{p['tokens']:,.0f} tokens: {_human_time(p['seconds'])}, "
                     f"{p['device_hours']:,.1f} device-hours{cost}")
    lines.append("assumptions: " + "; ".join(p["assumptions"]))
    return "\n".join(lines)


def _human_time(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def check_fits(req: PlanRequest) -> dict | None:
    """The plan if the configuration will not fit the device, else None (no measuring)."""
    runtime = runtime_bytes(req.device)
    if fits(req, runtime)[0]:
        return None
    return make_plan(req, measure=False)

