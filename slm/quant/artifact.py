"""Quantized model directories: write one, and load one without an fp32 copy.

Two artifact kinds, both loaded by `slm.loading.open_model` (and so by generate, eval,
eval-sql, bench and the server); `slm quantize` (slm/recipes/quantize.py) makes them:

    "gpt-quantized"  an slm GPT
    "hf-quantized"   a Hugging Face causal LM (SmolLM2, fine-tuned or merged ones, ...)

Layout:
    model.safetensors  NAME.qweight / NAME.scale / NAME.zero / NAME.bias / NAME.input_range
                       for each quantized module, float tensors under their usual names;
                       nothing pickled, size and SHA-256 checked on load (slm/artifacts.py)
    config.json        slm's config (format, kind, tokenizer identity, weights hash) and
                       "quantization": the method, {module: spec}, modules kept in float,
                       float tensors tied to others, and what was quantized ("source")
    hf/                hf-quantized only: the HF config, generation config and tokenizer files

Loading builds the model on the meta device, so no fp32 copy of the weights is ever made:
each quantized module is built from its int8/int4 tensors, read one at a time, and the float
tensors are assigned in place.
"""

from __future__ import annotations

import ctypes
from itertools import chain
from pathlib import Path

import torch
import torch.nn as nn

from slm.artifacts import (CONFIG_FILE, GPT_QUANTIZED, HF_QUANTIZED, LoadedModel, TensorFile, gpt_header, header,
                           read_artifact, read_config, save_tensors, verify_weights)
from slm.errors import SlmError
from slm.inference import for_inference
from slm.interop.hf_causal import hf_tokenizer_fingerprint, wrap_hf
from slm.model import GPT
from slm.quant.quantize import TABLE, build_module, linear_weight, set_module
from slm.tokenizer import TokenizerIdentity, check_identity, get_tokenizer

HF_DIR = "hf"
# Tensors each quantized module type stores (bias, and input_range for static, when present).
REQUIRED = {"int8": ("qweight", "scale"), "int4": ("qweight", "scale", "zero"), "int8-embedding": ("qweight", "scale")}


# ------------------------------------------------------------------------------ writing


def write_quantized(out: Path, root: nn.Module, tokenizer, info: dict, tensors: dict[str, torch.Tensor],
                    metadata: dict) -> dict:
    """Write a quantized artifact of `root` (an slm GPT or a transformers model) into `out`:
    its tensors (`quantize.quantized_state`), config.json with the `info` of quantize_model as
    its "quantization" section, and for Hugging Face models the files to rebuild them (hf/)."""
    if isinstance(root, GPT):
        config = gpt_header(root.config, tokenizer.identity, metadata, kind=GPT_QUANTIZED)
    else:
        save_hf_files(out / HF_DIR, root, tokenizer)
        config = header(HF_QUANTIZED, tokenizer.identity, metadata,
                        hf={"dir": HF_DIR, "model_type": root.config.model_type})
    config["quantization"] = info
    return save_tensors(out, tensors, config)


def save_hf_files(directory: Path, hf_model: nn.Module, tokenizer) -> None:
    """What transformers needs to rebuild the model and its tokenizer (no weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    hf_model.config.save_pretrained(directory)
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(directory)
    tokenizer.hf.save_pretrained(directory)


# ------------------------------------------------------------------------------ loading


def quantization_section(raw: dict, path: Path) -> dict:
    q = raw.get("quantization")
    if not isinstance(q, dict) or not isinstance(q.get("modules"), dict):
        raise SlmError(f"{path / CONFIG_FILE} has no valid \"quantization\" section; the artifact is damaged")
    return q


def _expected_shapes(spec: dict, module: nn.Module) -> dict[str, tuple]:
    if spec["type"] == "int8-embedding":
        v, d = module.weight.shape
        return {"qweight": (v, d), "scale": (v,)}
    out_f, in_f = linear_weight(module)[0].shape
    if spec["type"] == "int8":
        return {"qweight": (out_f, in_f), "scale": (out_f,), "bias": (out_f,), "input_range": (2,)}
    g = spec["group_size"]
    return {"qweight": (out_f, in_f // 2), "scale": (out_f, in_f // g), "zero": (out_f, in_f // g), "bias": (out_f,)}


def _read(f: TensorFile, key: str, small: int = 4 << 20) -> torch.Tensor:
    """A large tensor stays in its own memory map (packing copies it and lets the map go; a
    table keeps only looked-up rows resident); a small one is copied so that no map stays
    alive for it (a map holds at least one page-cache folio, up to 2 MB, resident)."""
    t = f.get_separate(key)
    return t if t.numel() * t.element_size() >= small else t.clone()


def _module_tensors(f: TensorFile, name: str, spec: dict, module: nn.Module) -> dict[str, torch.Tensor]:
    if spec.get("type") not in REQUIRED:
        raise SlmError(f"{f.path}: module {name} has unknown quantization {spec.get('type')!r}; upgrade slm")
    keys = [k for k in REQUIRED[spec["type"]] if "tied_to" not in spec or k not in TABLE]
    keys += [k for k in ("bias", "input_range") if f"{name}.{k}" in f.keys()]
    if spec.get("activation") == "static" and "input_range" not in keys:
        raise SlmError(f"{f.path}: static int8 module {name} has no input_range; the artifact is damaged")
    expected = _expected_shapes(spec, module)
    tensors = {}
    for k in keys:
        t = _read(f, f"{name}.{k}")
        if tuple(t.shape) != expected[k]:
            raise SlmError(f"{f.path}: {name}.{k} has shape {tuple(t.shape)}, the model config expects "
                           f"{expected[k]}; the artifact is damaged or belongs to another model")
        tensors[k] = t
    return tensors


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op). Repacking leaves
    the temporary copies' memory in the heap between long-lived packed buffers, where it would
    count as resident without this (bench/README.md, "Measurements behind design choices")."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def materialize(root: nn.Module, q: dict, f: TensorFile) -> None:
    """Fill a model built on the meta device from a quantized artifact's tensors."""
    specs = q["modules"]
    modules = dict(root.named_modules())
    for name, spec in specs.items():
        if name not in modules:
            raise SlmError(f"{f.path}: the model has no module {name!r}; the artifact belongs to another model")
        tensors = _module_tensors(f, name, spec, modules[name])
        if "tied_to" in spec:
            # The table's tensors again, in their own memory map: a head that repacks them
            # (native, fbgemm) leaves the embedding's map with only the rows it looks up resident.
            table = specs.get(spec["tied_to"], {})
            if table.get("type") != "int8-embedding":
                raise SlmError(f"{f.path}: {name} is tied to {spec['tied_to']!r}, which is not a quantized "
                               f"embedding; the artifact is damaged")
            own = _module_tensors(f, spec["tied_to"], table, modules[spec["tied_to"]])
            if own["qweight"].shape != tuple(linear_weight(modules[name])[0].shape):
                raise SlmError(f"{f.path}: {name} does not have the shape of {spec['tied_to']}; the artifact is damaged")
            tensors.update(qweight=own["qweight"], scale=own["scale"])
        set_module(root, name, build_module(spec, tensors))
        release_freed_memory()

    prefixes = tuple(f"{n}." for n in specs)
    floats = {k: _read(f, k) for k in f.keys() if not k.startswith(prefixes)}
    try:
        result = root.load_state_dict(floats, strict=False, assign=True)
    except RuntimeError as e:
        raise SlmError(f"{f.path}: float tensors do not fit the model ({str(e).splitlines()[-1].strip()})") from None
    if result.unexpected_keys:
        raise SlmError(f"{f.path}: unexpected tensors {result.unexpected_keys[:3]}; the artifact belongs to another model")
    for alias, name in q.get("aliases", {}).items():
        owner, _, attr = alias.rpartition(".")
        try:
            setattr(root.get_submodule(owner), attr, root.get_parameter(name))
        except AttributeError:
            raise SlmError(f"{f.path}: cannot tie {alias} to {name}; the artifact is damaged") from None
    missing = [n for n, t in chain(root.named_parameters(), root.named_buffers()) if t.is_meta]
    if missing:
        raise SlmError(f"{f.path}: no weights for {missing[:3]}; the artifact is incomplete")


def load_gpt_quantized(path: Path, device=None, dtype=None) -> LoadedModel:
    """An slm GPT quantized artifact, on the CPU (where its kernels run), decode layout."""
    art = read_artifact(path)
    tokenizer = get_tokenizer()
    tokenizer.check(art.tokenizer, f"model {art.path}")
    q = quantization_section(art.raw, art.path)
    f = TensorFile(verify_weights(art.path, art.raw))
    with torch.device("meta"):
        model = GPT(art.model)
    materialize(model, q, f)
    return LoadedModel(for_inference(model), tokenizer, path.name, GPT_QUANTIZED, str(path), art.raw)


def load_hf_quantized(path: Path, device=None, dtype=None) -> LoadedModel:
    """A Hugging Face quantized artifact: the model rebuilt from hf/ with empty weights, then
    filled from the safetensors file; the tokenizer files checked against the identity."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise SlmError("Hugging Face models need transformers and accelerate: pip install 'slm[hf]'") from None
    raw = read_config(path)
    q = quantization_section(raw, path)
    hf_dir = path / raw.get("hf", {}).get("dir", HF_DIR)
    if not (hf_dir / CONFIG_FILE).is_file():
        raise SlmError(f"{hf_dir} is missing: the artifact has no Hugging Face config and tokenizer files")
    recorded = raw.get("tokenizer") or {}
    name = str(recorded.get("name", path.name))
    try:
        tok = AutoTokenizer.from_pretrained(hf_dir)
        config = AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError) as e:
        raise SlmError(f"cannot read the Hugging Face files in {hf_dir}: {str(e).splitlines()[0]}") from None
    check_identity(TokenizerIdentity(name, hf_tokenizer_fingerprint(tok)), raw.get("tokenizer"),
                   f"model {path} (tokenizer files in {hf_dir})")
    f = TensorFile(verify_weights(path, raw))
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    materialize(hf_model, q, f)
    model, tokenizer = wrap_hf(hf_model, tok, name)
    return LoadedModel(model, tokenizer, path.name, HF_QUANTIZED, str(path), raw)

