"""LoRA on slm's GPT and on a Hugging Face model: adapter alone, merge parity, loading, refusals."""

import json

import pytest
import torch

from slm.artifacts import save_model
from slm.errors import SlmError
from slm.loading import load_base
from slm.recipes.finetune import write_finetune
from slm.lora import LoraSettings
from slm.lora import apply_lora, trainable_share
from slm.loading import open_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture
def gpt_dir(tmp_path, tiny_model):
    return save_model(tmp_path / "gpt", tiny_model)


@pytest.fixture
def llama_dir(tmp_path):
    from slm.interop.hf import gpt2_hf_tokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    tok = gpt2_hf_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    tok.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def base_spec(which, gpt_dir, llama_dir, tmp_path):
    """gpt: slm's own model; hf: a transformers directory; gguf: a GGUF file, which transformers
    loads dequantized (a merged fine-tune of it must save like any transformers model)."""
    if which != "gguf":
        return gpt_dir if which == "gpt" else llama_dir
    pytest.importorskip("gguf")
    from slm.interop.export import export_gguf

    return export_gguf(gpt_dir, tmp_path / "base.gguf", "f32")


def train_a_little(model, steps=5):
    """Move the LoRA weights away from their no-op start (B = 0)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    x = torch.randint(0, 1000, (2, 16))
    for _ in range(steps):
        _, loss = model(x, targets=x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("which", ["gpt", "hf", "gguf"])
def test_lora_adapter_merge_and_load(tmp_path, which, gpt_dir, llama_dir):
    base = load_base(base_spec(which, gpt_dir, llama_dir, tmp_path))
    assert base.kind == ("gpt" if which == "gpt" else "hf")
    idx = torch.randint(0, 1000, (1, 12))
    before = logits(base.model, idx)
    peft_model = apply_lora(base.model, LoraSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    trainable, total = trainable_share(base.model)
    assert 0 < trainable < total * 0.2
    # Only LoRA weights train; every base weight is frozen.
    assert all("lora_" in n for n, p in base.model.named_parameters() if p.requires_grad)
    train_a_little(base.model)
    tuned = logits(base.model, idx)  # base + adapter, unmerged
    assert not torch.allclose(tuned, before, atol=1e-4)

    out = tmp_path / "ft"
    cfg = write_finetune(out, base, "lora", peft_model, merge_adapter=True)
    assert cfg["adapter"] == "adapter" and cfg["model"] == "model"
    # The adapter is saved on its own: small, LoRA tensors only.
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    # The merged standalone model gives the outputs of base + adapter.
    merged = open_model(out)
    assert merged.kind == "finetune"
    assert torch.allclose(logits(merged.model, idx), tuned, atol=1e-4)
    # Without the merged model, base + adapter load and give the same outputs.
    (out / "config.json").write_text(json.dumps({**cfg, "model": None}))
    adapted = open_model(out)
    assert torch.allclose(logits(adapted.model, idx), tuned, atol=1e-4)
    assert adapted.tokenizer.encode("Hello world") == [15496, 995]
    if which != "gpt":  # the merged model is a plain transformers directory, chat template included
        plain = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
        assert getattr(plain.config, "quantization_config", None) is None
        assert torch.allclose(plain(idx).logits, tuned, atol=1e-4)
        assert merged.is_chat == adapted.is_chat == (which == "hf")


@pytest.mark.parametrize("which", ["gpt", "hf"])
def test_tokenizer_mismatch_is_refused(tmp_path, which, gpt_dir, llama_dir):
    base = load_base(gpt_dir if which == "gpt" else llama_dir)
    peft_model = apply_lora(base.model, LoraSettings(lora_r=2))
    cfg = write_finetune(tmp_path / "ft", base, "lora", peft_model, merge_adapter=True)
    bad = {**cfg, "tokenizer": {"name": "other", "fingerprint": "0" * 64}}
    (tmp_path / "ft" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(SlmError, match="tokenizer mismatch"):
        open_model(tmp_path / "ft")
    (tmp_path / "ft" / "config.json").write_text(json.dumps({**bad, "model": None}))
    with pytest.raises(SlmError, match="tokenizer mismatch"):
        open_model(tmp_path / "ft")


def test_bad_lora_targets_are_a_clear_error(gpt_dir):
    base = load_base(gpt_dir)
    with pytest.raises(SlmError, match="cannot add LoRA"):
        apply_lora(base.model, LoraSettings(lora_targets=["no_such_layer"]))
