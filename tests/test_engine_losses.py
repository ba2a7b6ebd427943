import pytest
import torch
import torch.nn.functional as F

from slm.model import GPT
from slm.engine import losses
from slm.engine.losses import CausalLMLoss, linear_cross_entropy

from conftest import tiny_config


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ROWS", 7)  # several chunks, the last one partial


def _case(n=50, d=16, v=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100
    return h, w, t


def test_matches_cross_entropy_and_its_gradients(small_chunks):
    h, w, t = _case()
    loss = linear_cross_entropy(h, w, t)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)


def test_scaled_upstream_gradient_and_no_grad(small_chunks):
    h, w, t = _case(seed=1)
    (3.0 * linear_cross_entropy(h, w, t)).backward()
    gh = h.grad.clone()
    h.grad = w.grad = None
    (3.0 * F.cross_entropy(h @ w.t(), t)).backward()
    assert torch.allclose(gh, h.grad, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, w, t), F.cross_entropy(h @ w.t(), t), atol=1e-6)


def test_all_targets_ignored_gives_zero_not_nan(small_chunks):
    h, w, t = _case()
    t[:] = -100
    loss = linear_cross_entropy(h, w, t)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(h.grad).all()


def test_extreme_logits_keep_an_exact_finite_loss(small_chunks):
    h, w, t = _case()
    h = (h * 200).detach().requires_grad_()  # softmax of the target underflows to 0 on many rows
    loss = linear_cross_entropy(h, w, t)
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    assert torch.isfinite(loss) and torch.allclose(loss, ref, rtol=1e-5)


def test_bf16_autocast_close_to_fp32(small_chunks):
    h, w, t = _case(n=64, d=32, v=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t)
    ref = F.cross_entropy(h @ w.t(), t)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05


def test_causal_lm_loss_equals_gpt_forward_loss():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    x = torch.randint(0, 100, (2, 16))
    y = torch.randint(0, 100, (2, 16))
    _, ref = model(x, y)
    assert torch.allclose(CausalLMLoss(model)(x, y), ref, atol=1e-5)
