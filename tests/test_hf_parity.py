"""Parity with a reference nobody here wrote: Hugging Face transformers' GPT2LMHeadModel."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slm.artifacts import load_model  # noqa: E402
from slm.cli import main  # noqa: E402
from slm.errors import SlmError  # noqa: E402
from slm.interop.hf import load_hf_gpt2  # noqa: E402
from slm.model import GPT  # noqa: E402


@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so every tensor's mapping is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def test_logits_match_transformers(hf_dir):
    path, hf = hf_dir
    cfg, tensors = load_hf_gpt2(path)
    model = GPT(cfg)
    model.load_state_dict(tensors, strict=False)
    model.eval()
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours[..., :50257] - theirs).abs().max().item() <= 1e-4


def test_convert_command_round_trip(hf_dir, tmp_path):
    path, hf = hf_dir
    assert main(["convert", "--from-hf", str(path), "--out", str(tmp_path / "m")]) == 0
    model, art = load_model(tmp_path / "m")
    idx = torch.randint(0, 50257, (1, 30))
    with torch.no_grad():
        assert (model(idx)[0][..., :50257] - hf(idx).logits).abs().max().item() <= 1e-4
    assert art.metadata["source"]["hf"] == str(path)


def test_non_gpt2_vocab_is_refused(tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=1000)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(SlmError, match="another tokenizer"):
        load_hf_gpt2(tmp_path)
