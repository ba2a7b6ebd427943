"""slm's native CPU kernels (slm/kernels): the build, each kernel against torch, and the fused
decoding step against the model's own forward."""

import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_config
from slm import kernels
from slm.artifacts import save_model
from slm.generate import SamplingConfig, generate
from slm.inference import PackedLinear, PackedEmbedding, for_inference, to_linear_layout
from slm.loading import open_model
from slm.model import GPT
from slm.recipes.quantize import quantize_to_dir
from slm.quant.quantize import QuantConfig

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="slm's kernels did not build here (no C++ compiler?)")


@pytest.mark.skipif(shutil.which("c++") is None, reason="the kernels need a C++ compiler")
def test_kernels_build_where_a_compiler_is():
    assert kernels.available(), kernels.load()


def test_a_failed_build_is_reported_not_fatal(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error this source does not compile\n")
    monkeypatch.setattr(kernels, "SOURCES", (broken,))
    monkeypatch.setenv("SLM_KERNEL_CACHE", str(tmp_path / "cache"))
    kernels.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"kernels are unavailable .*this source does not compile.*C\+\+ compiler"):
            assert kernels.load() is not None
    finally:
        kernels.load.cache_clear()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_fp32_linear_with_norm_and_residual_matches_torch(rows):
    """Shapes off the tiles (37 outputs), every row count of the inner loop."""
    torch.manual_seed(rows)
    lin, ln = nn.Linear(130, 37), nn.LayerNorm(130)
    with torch.no_grad():
        ln.weight.normal_(1, 0.1)
        ln.bias.normal_(0, 0.1)
    x, r = torch.randn(1, rows, 130) * 3 + 1, torch.randn(1, rows, 37)
    packed = PackedLinear(lin)
    assert torch.equal(packed.weight(), lin.weight)
    with torch.no_grad():
        assert torch.allclose(packed(x), lin(x), atol=1e-5)
        assert torch.allclose(packed.fused(x, norm=ln, residual=r), r + lin(ln(x)), atol=1e-5)


@needs_kernels
def test_int8_linear_fused_equals_its_parts():
    from slm.quant.layers import Int8Linear, quantize_int8

    torch.manual_seed(0)
    w, ln = torch.randn(48, 64) * 0.05, nn.LayerNorm(64)
    layer = Int8Linear(*quantize_int8(w), torch.randn(48), "dynamic", kernel="native")
    x, r = torch.randn(1, 3, 64), torch.randn(1, 3, 48)
    with torch.no_grad():
        assert torch.allclose(layer.fused(x, norm=ln, residual=r), r + layer(ln(x)), atol=1e-5)


@needs_kernels
def test_decode_attention_matches_sdpa_and_fills_the_cache():
    torch.manual_seed(0)
    B, H, L, D, pos = 2, 3, 40, 16, 29
    kv = torch.randn(2, B, H, L, D)
    qkv = torch.randn(B, 1, 3 * H * D)
    expected_kv = kv.clone()
    q, k, v = qkv.view(B, 1, 3, H, D).permute(2, 0, 3, 1, 4)
    expected_kv[:, :, :, pos : pos + 1] = torch.stack([k, v])
    ref = F.scaled_dot_product_attention(q, *expected_kv[:, :, :, : pos + 1].unbind(0))
    y = kernels.decode_attention(qkv, kv, pos)
    assert torch.equal(kv, expected_kv)
    assert torch.allclose(y, ref.transpose(1, 2).reshape(B, 1, H * D), atol=1e-5)


def _logits_step_by_step(model, idx):
    """Prefill 5 tokens, then one at a time: the fused decoding step where the model has one."""
    cache = model.make_cache()
    with torch.inference_mode():
        out = [model(idx[:, :5], cache=cache)[0]]
        out += [model(idx[:, i : i + 1], cache=cache)[0] for i in range(5, idx.shape[1])]
    return torch.cat(out, dim=1)


@needs_kernels
def test_native_fp32_layout_keeps_logits_and_tokens(tiny_model, monkeypatch):
    idx = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        ref, _ = tiny_model(idx)
    monkeypatch.setenv("SLM_FP32_KERNEL", "native")
    model = for_inference(tiny_model)
    assert isinstance(model.lm_head, PackedLinear) and isinstance(model.transformer.wte, PackedEmbedding)
    assert all(block.fused_decode for block in model.transformer.h)
    assert torch.allclose(_logits_step_by_step(model, idx), ref, atol=1e-4)
    cfg = SamplingConfig(max_new_tokens=40, temperature=0)  # past the 32-token window: it slides
    fused = list(generate(model, [1, 2, 3], cfg))
    for block in model.transformer.h:
        block.fused_decode = False
    assert fused == list(generate(model, [1, 2, 3], cfg))
    restored = to_linear_layout(model)  # back to nn.Linear, the head tied again
    assert restored.lm_head.weight is restored.transformer.wte.weight
    assert torch.allclose(restored(idx)[0], ref, atol=1e-5)


def test_unknown_fp32_kernel_is_refused(tiny_model, monkeypatch):
    from slm.errors import SlmError

    monkeypatch.setenv("SLM_FP32_KERNEL", "fast")
    with pytest.raises(SlmError, match="SLM_FP32_KERNEL='fast'"):
        for_inference(tiny_model)


@needs_kernels
def test_quantized_model_decodes_in_the_fused_step(tmp_path):
    torch.manual_seed(0)
    src = save_model(tmp_path / "fp", GPT(tiny_config()))
    quantize_to_dir(str(src), tmp_path / "q8", QuantConfig())
    model = open_model(tmp_path / "q8").model
    assert all(block.fused_decode for block in model.transformer.h)
    idx = torch.randint(0, 50257, (1, 20))
    fused = _logits_step_by_step(model, idx)
    for block in model.transformer.h:
        block.fused_decode = False
    assert torch.allclose(fused, _logits_step_by_step(model, idx), atol=1e-4)  # the same math, unfused
