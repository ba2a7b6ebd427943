import pytest
import torch

from slm.config import PRESETS, ModelConfig, preset
from slm.errors import SlmError
from slm.generate import SamplingConfig, generate, sample
from slm.inference import for_inference
from slm.model import GPT
from tests.conftest import tiny_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_counts_match_the_model(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == cfg.num_params()
    assert model.num_params(non_embedding=True) == cfg.num_params(non_embedding=True)


def test_preset_shapes():
    assert preset("gpt2").num_params() == 124_475_904  # GPT-2 small with the vocabulary padded to 50304
    big = preset("1b")
    assert (big.n_layer, big.n_head, big.n_embd, big.block_size) == (24, 32, 2048, 2048)
    assert 1.2e9 < big.num_params() < 1.4e9
    t = preset("tiny")
    assert (t.n_layer, t.n_embd, t.block_size, t.vocab_size) == (6, 384, 256, 50304)


def test_bad_shape_is_a_clear_error():
    with pytest.raises(SlmError, match="divisible"):
        ModelConfig(n_embd=100, n_head=3)


def test_head_is_tied(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.transformer.wte.weight


def test_no_bias_variant():
    model = GPT(tiny_config(bias=False))
    assert all(not n.endswith("bias") for n, _ in model.named_parameters())
    logits, loss = model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 4, 50304) and loss.item() > 0


def test_loss_ignores_masked_targets(tiny_model):
    idx = torch.randint(0, 1000, (2, 8))
    tgt = torch.randint(0, 1000, (2, 8))
    masked = tgt.clone()
    masked[:, :4] = -100
    logits, loss = tiny_model(idx, masked)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, logits.size(-1)), tgt[:, 4:].reshape(-1))
    assert torch.allclose(loss, ref)


def test_cached_chunks_equal_full_forward(tiny_model):
    idx = torch.randint(0, 50257, (1, 20))
    full, _ = tiny_model(idx)
    cache = tiny_model.make_cache()
    a, _ = tiny_model(idx[:, :9], cache=cache)  # prefill
    b, _ = tiny_model(idx[:, 9:10], cache=cache)  # one token
    c, _ = tiny_model(idx[:, 10:], cache=cache)  # a chunk onto a non-empty cache
    assert torch.allclose(torch.cat([a, b, c], dim=1), full, atol=1e-5)


def test_context_overflow_is_refused(tiny_model):
    with pytest.raises(ValueError, match="exceeds the context"):
        tiny_model(torch.zeros(1, 33, dtype=torch.long))


def test_inference_layout_keeps_logits(tiny_model):
    idx = torch.randint(0, 50257, (2, 16))
    ref, _ = tiny_model(idx)
    out, _ = for_inference(tiny_model)(idx)
    assert torch.allclose(out, ref, atol=1e-5)


def _greedy(model, prompt, n, kv):
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, kv_cache=kv)
    return list(generate(model, prompt, cfg, vocab_limit=50257))


@pytest.mark.parametrize("prompt_len", [5, 40])  # 40 > block_size: the prompt itself is cropped
def test_kv_cache_equals_recompute_past_the_window(tiny_model, prompt_len):
    torch.manual_seed(1)
    prompt = torch.randint(0, 50257, (prompt_len,)).tolist()
    n = 80  # well past the 32-token window: it slides several times
    assert _greedy(tiny_model, prompt, n, True) == _greedy(tiny_model, prompt, n, False)


def test_kv_cache_equals_recompute_in_inference_layout(tiny_model):
    for_inference(tiny_model)
    assert _greedy(tiny_model, [1, 2, 3], 50, True) == _greedy(tiny_model, [1, 2, 3], 50, False)


def test_seeded_sampling_is_reproducible(tiny_model):
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9, seed=123)
    a = list(generate(tiny_model, [1, 2], cfg))
    b = list(generate(tiny_model, [1, 2], cfg))
    c = list(generate(tiny_model, [1, 2], SamplingConfig(max_new_tokens=30, temperature=1.0, seed=124)))
    assert a == b and a != c


def test_stop_id_ends_generation(tiny_model):
    greedy = _greedy(tiny_model, [7], 10, True)
    stop = greedy[3]
    out = list(generate(tiny_model, [7], SamplingConfig(max_new_tokens=10, temperature=0), stop_ids={stop}))
    assert out == greedy[: greedy.index(stop)]


def test_padded_vocab_is_never_sampled():
    torch.manual_seed(0)
    logits = torch.zeros(1, 50304)
    logits[0, 50257:] = 100.0  # the padding rows would win
    gen = torch.Generator().manual_seed(0)
    for t in (0.0, 1.0):
        assert int(sample(logits[:, :50257], t, generator=gen)) < 50257


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample(logits, 1.0, top_p=0.5, generator=gen)) for _ in range(50)}
    assert draws == {0}  # the top token alone holds > 50% of the mass


def test_sampling_config_validation():
    with pytest.raises(SlmError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(SlmError, match="temperature"):
        SamplingConfig(temperature=-1)
