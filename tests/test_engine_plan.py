import pytest
import torch

from slm.config import ModelConfig
from slm.errors import SlmError
from slm.model import GPT
from slm.engine.losses import CausalLMLoss
from slm.engine.plan import PlanRequest, activation_bytes, alternative, fits, make_plan, memory_breakdown

from trainutil import one_thread  # noqa: F401 (fixture)


def saved_for_backward(cfg: ModelConfig, batch_size: int, bf16: bool) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters excluded), measured."""
    torch.manual_seed(0)
    module = CausalLMLoss(GPT(cfg))
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        module(x, x)
    return sum(seen.values())


@pytest.mark.parametrize("bf16", [False, True])
def test_activation_model_matches_what_autograd_saves(bf16):
    cfg = ModelConfig(block_size=64, n_layer=3, n_head=4, n_embd=64, vocab_size=512)
    req = PlanRequest(cfg, batch_size=4, dtype="bf16" if bf16 else "fp32")
    mem = memory_breakdown(req, runtime_bytes=0)
    grad_h_and_w = 4 * 64 * 64 * 4 + 512 * 64 * 4  # the loss's saved gradients (part of mem["loss"])
    predicted = mem["activations"] + grad_h_and_w + mem["casts"]
    measured = saved_for_backward(cfg, 4, bf16)
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_activation_memory_scales_with_batch_and_context():
    cfg = ModelConfig(block_size=128, n_layer=2, n_head=2, n_embd=64)
    a = activation_bytes(cfg, 2, False)
    assert activation_bytes(cfg, 4, False) == pytest.approx(2 * a, rel=0.01)
    assert activation_bytes(cfg, 2, True) < 0.6 * a


def test_fsdp_shards_states_and_alternative_fits():
    cfg = ModelConfig(block_size=2048, n_layer=24, n_head=32, n_embd=2048)
    one = memory_breakdown(PlanRequest(cfg, device="h100", batch_size=1), 0)
    eight = memory_breakdown(PlanRequest(cfg, device="h100", batch_size=1, num_gpus=8, fsdp=True), 0)
    assert eight["optimizer"] == one["optimizer"] // 8 and eight["activations"] == one["activations"]
    req = PlanRequest(cfg, device="l4", batch_size=8)
    assert not fits(req, 0)[0]
    alt = alternative(req, 0)
    assert alt is None or fits(alt, 0)[0]
    multi = PlanRequest(cfg, device="a100", batch_size=2, num_gpus=8)
    alt = alternative(multi, 0)
    assert alt is not None and fits(alt, 0)[0]


def test_gpu_time_and_cost():
    cfg = ModelConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768)
    p = make_plan(PlanRequest(cfg, device="h100", num_gpus=2, tokens=1e9, price_per_gpu_hour=2.0, mfu=0.5))
    tok_s = 2 * 989.4e12 * 0.5 / cfg.flops_per_token(1024)
    assert p["tokens_per_s"] == pytest.approx(tok_s) and p["seconds"] == pytest.approx(1e9 / tok_s)
    assert p["cost"] == pytest.approx(p["seconds"] / 3600 * 2 * 2.0)


def test_bad_requests():
    with pytest.raises(SlmError, match="unknown device"):
        make_plan(PlanRequest(ModelConfig(), device="tpu"))
    with pytest.raises(SlmError, match="mfu"):
        PlanRequest(ModelConfig(), device="h100", mfu=2.0)


def test_measuring_the_cpu_peak_leaves_the_global_rng_alone():
    from slm.engine.hardware import cpu_matmul_peak

    torch.manual_seed(0)
    state = torch.get_rng_state()
    cpu_matmul_peak(torch.float32, n=64, seconds=0.01, fresh=True)
    assert torch.equal(torch.get_rng_state(), state)
