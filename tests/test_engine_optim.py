import math


from slm.model import GPT
from slm.engine.config import TrainConfig
from slm.engine.optim import lr_at, make_optimizer, param_groups

from conftest import tiny_config


def test_decay_groups():
    model = GPT(tiny_config())
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    # the tied embedding/head weight appears once
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_fused_adamw_on_cpu():
    opt = make_optimizer(GPT(tiny_config()), TrainConfig(lr=1e-3, beta2=0.99))
    g = opt.param_groups[0]
    assert g["fused"] is True and g["betas"] == (0.9, 0.99) and g["lr"] == 1e-3


def test_schedule_warmup_then_cosine_to_min():
    peak, final, warm, horizon = 1.0, 0.1, 10, 110
    assert lr_at(0, peak, final, warm, horizon) == 0.1
    assert lr_at(9, peak, final, warm, horizon) == 1.0
    assert lr_at(10, peak, final, warm, horizon) == 1.0
    mid = lr_at(60, peak, final, warm, horizon)
    assert math.isclose(mid, 0.55)
    assert math.isclose(lr_at(110, peak, final, warm, horizon), 0.1)
    assert lr_at(500, peak, final, warm, horizon) == 0.1
    lrs = [lr_at(s, peak, final, warm, horizon) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_default_warmup_and_min_lr():
    cfg = TrainConfig(lr=6e-4)
    assert math.isclose(cfg.final_lr, 6e-5)
    assert cfg.warmup_for(50) == 5 and cfg.warmup_for(5000) == 100 and cfg.warmup_for(None) == 100
    assert TrainConfig(warmup_steps=0).warmup_for(50) == 0
