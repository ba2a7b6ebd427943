"""`slm export`: an slm model leaves slm, as a transformers directory or a GGUF file.

- `hf`: GPT2LMHeadModel config.json, model.safetensors and GPT-2 tokenizer files, loadable by
  `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` with no slm code.
- `gguf`: architecture gpt2 for llama.cpp / Ollama, f32, f16 or q8_0 (see interop/gguf.py).

What can be exported: slm GPT model directories (`kind: gpt`), which is also what training runs
and merged fine-tunes of slm models are, and directories that resolve to one (e.g. a training
run). Other artifact kinds are refused with the reason. Models that are
already in another runtime's format (a Hugging Face directory, a .gguf file) need no export.
"""

from __future__ import annotations

import json
from pathlib import Path

from slm.artifacts import GPT_KIND, load_model, model_tensors, read_config, resolve_artifact_dir
from slm.errors import SlmError
from slm.io import atomic_write_bytes, write_json


def open_for_export(spec: str | Path):
    """The slm GPT (training layout, fp32) and its artifact record that `spec` names."""
    path = Path(spec)
    if str(spec).endswith(".gguf") or path.is_file():
        raise SlmError(f"{spec} is a file; export takes an slm model directory (GGUF files are already "
                       f"llama.cpp's format: import one with slm convert --from-gguf)")
    if not path.is_dir():
        raise SlmError(f"model not found: {spec} is not a directory")
    path = resolve_artifact_dir(path)
    try:
        kind = read_config(path).get("kind", GPT_KIND)
    except SlmError as e:
        raise SlmError(f"{e} (export takes slm models; a Hugging Face model directory is already in "
                       f"transformers' format)") from None
    if kind != GPT_KIND:
        raise SlmError(
            f"{path} is an slm artifact of kind {kind!r}; only plain GPT weights (kind 'gpt') map onto GPT-2's "
            f"formats. For a quantized artifact, export the fp32 model it was made from (--format gguf "
            f"--dtype q8_0 gives llama.cpp's own int8); for a LoRA adapter, merge it into its base first")
    return load_model(path)


def export_hf(spec: str | Path, out: str | Path) -> Path:
    from safetensors.torch import save as safetensors_bytes

    import slm
    from slm.interop.hf import config_to_hf, gpt2_hf_tokenizer, tensors_to_hf

    model, art = open_for_export(spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config_to_hf(model.config)
    tensors = tensors_to_hf(model_tensors(model))
    meta = {"format": "pt", "exported_by": f"slm {slm.__version__}", "tokenizer": json.dumps(art.tokenizer.to_dict())}
    atomic_write_bytes(out / "model.safetensors", safetensors_bytes(tensors, metadata=meta))
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {"bos_token_id": config["bos_token_id"],
                                                "eos_token_id": config["eos_token_id"]})
    tok = gpt2_hf_tokenizer()
    tok.model_max_length = model.config.block_size
    tok.save_pretrained(str(out))
    return out


def export_gguf(spec: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    from slm.interop.gguf import write_gguf

    model, art = open_for_export(spec)
    return write_gguf(model_tensors(model), model.config, out, dtype, name=art.path.name,
                      tokenizer_identity=art.tokenizer.to_dict())
