"""Quantization methods applied to a model's modules, the same way for slm GPTs and HF models.

What is quantized (names are module names; `--exclude` keeps any of them in fp32):
- every Linear layer (attention, MLP, the LM head): int8 per output channel, or int4 groups
  for weight-int4;
- the token embedding: int8 per row. When the head is tied to it (slm GPTs, SmolLM2), both
  read one int8 table, stored once. Excluding one of the pair quantizes the other alone.
- kept in fp32: LayerNorm/RMSNorm weights, biases, the position table of slm GPTs (one row
  per token is read, 3 MB for gpt2), and anything excluded.

Every quantized module is described by a small JSON spec (`{"type": "int8", "activation":
"dynamic"}`, ...) and a few tensors; `build_module` turns the two into a layer. Quantizing
and loading an artifact both go through it, so a saved model runs the code that was tested.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from slm.errors import SlmError
from slm.quant.layers import Int4Linear, Int8Embedding, Int8Linear, pack_nibbles, quantize_int4, quantize_int8

# method -> (how Linear layers are stored, activation scheme of int8 layers)
METHODS = {
    "dynamic-int8": ("int8", "dynamic"),
    "weight-int8": ("int8", "weight"),
    "static-int8": ("int8", "static"),
    "weight-int4": ("int4", "weight"),
}
# "auto", the default, is the fastest method that kept quality in bench/quant.py (numbers in
# bench/README.md): dynamic-int8 for slm GPTs, weight-int8 for Hugging Face models (dynamic-int8's
# per-call int8 activations cost a SmolLM2 SQL fine-tune its accuracy, weight-int8's did not).
AUTO = {"gpt": "dynamic-int8", "hf": "weight-int8"}
TABLE = ("qweight", "scale")  # what a tied head takes from its embedding
# weight-int4 keeps the head (and its tied embedding) int8: the head decides every token,
# and llama.cpp's 4-bit types keep it at 6+ bits for the same reason.
INT4_HEAD = {"type": "int8", "activation": "dynamic"}


@dataclass
class QuantConfig:
    method: str = field(default="auto", metadata={
        "help": "auto (dynamic-int8 for slm models, weight-int8 for Hugging Face ones), dynamic-int8 (weights "
                "int8, activations quantized per call), weight-int8 (activations stay bf16), weight-int4, "
                "static-int8 (activation ranges calibrated on --calib-data)", "choices": ["auto", *METHODS]})
    exclude: list[str] = field(default_factory=list, metadata={
        "help": "module names kept in fp32, comma- or space-separated; a name matches itself and any "
                "module ending in .NAME, globs allowed (e.g. lm_head, transformer.wte, 'transformer.h.0.*')"})
    group_size: int = field(default=64, metadata={"help": "inputs per int4 group (weight-int4)"})
    calib_data: str | None = field(default=None, metadata={
        "help": "static-int8: data source whose train split it calibrates on (default: the data of the "
                "training run --model names, else wiki-vital)"})
    calib_batches: int = field(default=16, metadata={"help": "static-int8: calibration batches"})
    calib_batch_size: int = field(default=4, metadata={"help": "static-int8: sequences per calibration batch"})
    calib_seq_len: int = field(default=256, metadata={
        "help": "static-int8: tokens per calibration sequence (at most the model's context)"})

    def __post_init__(self):
        if self.method != "auto" and self.method not in METHODS:
            raise SlmError(f"unknown quantization method {self.method!r}; choose auto or one of {', '.join(METHODS)}")
        self.exclude = [p.strip() for item in self.exclude for p in item.split(",") if p.strip()]
        if self.group_size < 2 or self.group_size & (self.group_size - 1):
            raise SlmError(f"group_size must be a power of two >= 2, got {self.group_size}")
        for name in ("calib_batches", "calib_batch_size", "calib_seq_len"):
            if getattr(self, name) < 1:
                raise SlmError(f"{name} must be at least 1, got {getattr(self, name)}")


def resolve_method(cfg: QuantConfig, root: nn.Module) -> QuantConfig:
    """`cfg` with "auto" replaced by the method chosen for `root`'s family (see AUTO)."""
    if cfg.method != "auto":
        return cfg
    from slm.model import GPT

    return replace(cfg, method=AUTO["gpt" if isinstance(root, GPT) else "hf"])


def excluded(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) of an nn.Linear or a transformers Conv1D (stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    return module.weight.t(), module.bias


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


# ------------------------------------------------------------------------------ specs <-> modules


def quantized_tensors(spec: dict, module: nn.Module, input_range: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors an artifact stores for `module` quantized as `spec`."""
    if spec["type"] == "int8-embedding":
        q, s = quantize_int8(module.weight)
        return {"qweight": q, "scale": s}
    w, b = linear_weight(module)
    if spec["type"] == "int8":
        q, s = quantize_int8(w)
        out = {"qweight": q, "scale": s}
        if spec["activation"] == "static":
            out["input_range"] = input_range
    else:
        q, s, z = quantize_int4(w, spec["group_size"])
        out = {"qweight": pack_nibbles(q), "scale": s, "zero": z}
    if b is not None:
        out["bias"] = b.detach().float()
    return out


def build_module(spec: dict, tensors: dict[str, torch.Tensor], kernel: str | None = None) -> nn.Module:
    """A quantized layer from its spec and stored tensors."""
    kind = spec.get("type")
    if kind == "int8-embedding":
        return Int8Embedding(tensors["qweight"], tensors["scale"])
    if kind == "int8":
        return Int8Linear(tensors["qweight"], tensors["scale"], tensors.get("bias"), spec["activation"],
                          tensors.get("input_range"), kernel=kernel)
    if kind == "int4":
        return Int4Linear(tensors["qweight"], tensors["scale"], tensors["zero"], tensors.get("bias"), kernel=kernel)
    raise SlmError(f"unknown quantized module type {kind!r}; upgrade slm")


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# ------------------------------------------------------------------------------ planning


def plan(root: nn.Module, cfg: QuantConfig, embedding: str, head: str | None) -> dict[str, dict]:
    """{module name: spec} for every module `cfg` quantizes. `embedding` names the token
    table and `head` the output layer (None when the model has none)."""
    storage, activation = METHODS[cfg.method]
    modules = dict(root.named_modules())
    specs: dict[str, dict] = {}
    for name, m in modules.items():
        if not is_linear(m) or excluded(name, cfg.exclude):
            continue
        if name == head and storage == "int4":
            specs[name] = dict(INT4_HEAD)
        elif storage == "int4" and linear_weight(m)[0].shape[1] % cfg.group_size == 0:
            specs[name] = {"type": "int4", "group_size": cfg.group_size}
        else:  # int8, or int4 groups that do not divide the layer: int8 weight-only
            specs[name] = {"type": "int8", "activation": activation if storage == "int8" else "weight"}
    if not excluded(embedding, cfg.exclude):
        specs[embedding] = {"type": "int8-embedding"}
        if head in specs and specs[head]["type"] == "int8" and modules[head].weight is modules[embedding].weight:
            specs[head]["tied_to"] = embedding  # one int8 table serves both
    return specs


def describe(root: nn.Module, specs: dict[str, dict], cfg: QuantConfig) -> dict:
    """The "quantization" section of config.json: method, per-module specs, what stayed float."""
    float_modules = [n for n, m in root.named_modules()
                     if (is_linear(m) or isinstance(m, nn.Embedding)) and n not in specs]
    return {"method": cfg.method, "exclude": cfg.exclude, "group_size": cfg.group_size,
            "modules": specs, "float_modules": float_modules}


def quantize_model(root: nn.Module, cfg: QuantConfig, embedding: str, head: str | None,
                   input_ranges: dict[str, torch.Tensor] | None = None, kernel: str | None = None) -> dict:
    """Quantize `root` in place per `cfg`; returns its description (see `describe`).
    static-int8 needs `input_ranges` ({Linear name: tensor([lo, hi])}, from calibrate.py)."""
    cfg = resolve_method(cfg, root)
    specs = plan(root, cfg, embedding, head)
    info = describe(root, specs, cfg)
    if cfg.method == "static-int8":
        missing = [n for n, s in specs.items() if s.get("activation") == "static" and n not in (input_ranges or {})]
        if missing:
            raise SlmError(f"static-int8: no calibrated input range for {missing[:3]}; calibrate first")
    modules = dict(root.named_modules())
    built: dict[str, nn.Module] = {}
    for name, spec in sorted(specs.items(), key=lambda kv: "tied_to" in kv[1]):  # tables before tied heads
        if "tied_to" in spec:  # the table's int8 weights, its own bias and input range
            table = built[spec["tied_to"]]
            own = quantized_tensors(spec, modules[name], (input_ranges or {}).get(name))
            new = build_module(spec, {**own, "qweight": table.qweight, "scale": table.scale}, kernel)
        else:
            tensors = quantized_tensors(spec, modules[name], (input_ranges or {}).get(name))
            new = build_module(spec, tensors, kernel)
        built[name] = new
        set_module(root, name, new)
    return info


def quantized_state(root: nn.Module, info: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to save, {alias: name} of tied float tensors) for a quantized `root`.
    Quantized modules contribute what their `tensors()` return (a tied head nothing); float
    tensors are saved once however many names share them."""
    specs = info["modules"]
    out: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        for k, t in root.get_submodule(name).tensors().items():
            if "tied_to" not in spec or k not in TABLE:
                out[f"{name}.{k}"] = t
    prefixes = tuple(f"{n}." for n in specs)
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for k, t in root.state_dict(keep_vars=True).items():
        if k.startswith(prefixes) or t is None:
            continue
        key = (t.data_ptr(), t.shape, t.stride())
        if key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = t.detach()
    return out, aliases

