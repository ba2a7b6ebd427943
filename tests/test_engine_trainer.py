import json
import math
import os
import signal

import pytest
import torch
import torch.nn as nn

from slm.errors import SlmError
from slm.engine.checkpoints import checkpoint_name
from slm.engine.config import TrainConfig
from slm.engine.trainer import Trainer, TrainTask
from slm.engine.metrics import read_metrics
from slm.engine.optim import lr_at
from slm.engine.gpt import RandomBatches, gpt_task

from trainutil import one_thread, small_config, small_task  # noqa: F401 (fixture)

_task = small_task


def _cfg(**kw):
    base = dict(max_steps=8, dtype="fp32", eval_every=0, eval_batches=2, ckpt_minutes=None, lr=3e-3,
                warmup_steps=2)
    return TrainConfig(**(base | kw))


def _losses(run_dir):
    return {r["step"]: r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r}


def test_learns_and_logs_every_step(tmp_path):
    class Repeat(RandomBatches):  # one batch over and over: the loss must fall fast
        def __iter__(self):
            batch = next(super().__iter__())
            while True:
                self.index += 1
                yield batch

    torch.manual_seed(0)
    cfg = small_config()
    task = gpt_task(cfg, Repeat(cfg, 2), eval_batches=lambda s: Repeat(cfg, 2))
    summary = Trainer(task, _cfg(max_steps=15, eval_every=5, lr=2e-2), tmp_path / "run").fit()
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 16))
    assert losses[15] < losses[1] - 2.0
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all({"step", "tokens"} <= set(r) for r in recs)
    assert [r["step"] for r in recs if "val_loss" in r] == [5, 10, 15]
    assert summary["steps"] == 15 and summary["tokens"] == 15 * 2 * 32 and summary["final_val_loss"] < 3
    assert summary["test_loss"] is not None and summary["checkpoint_saves"] == 1
    assert summary["last_checkpoint"].endswith(checkpoint_name(15))


def test_exact_resume_in_process(tmp_path):
    Trainer(_task(), _cfg(), tmp_path / "a").fit()
    first = Trainer(_task(), _cfg(), tmp_path / "b")
    for _ in range(4):
        first._after_step(first.train_step())  # logs as fit() does
    first.save_checkpoint()
    first.train_step()  # lost work: after the checkpoint, then "killed"
    t = Trainer(_task(), _cfg(), tmp_path / "b")
    assert t.resume() and t.step == 4
    t.fit()
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert a == b and len(a) == 8  # bit for bit


def test_grad_accumulation_matches_a_bigger_batch(tmp_path):
    big = Trainer(_task(batch_size=4), _cfg(max_steps=3, batch_size=4))
    small = Trainer(_task(batch_size=2), _cfg(max_steps=3, batch_size=2, grad_accum=2))

    class Halves:  # the same 4 rows as two micro-batches of 2
        def __init__(self, src):
            self.src = src

        def __iter__(self):
            for x, y in self.src:
                yield x[:2], y[:2]
                yield x[2:], y[2:]

    small.task.batches = Halves(RandomBatches(small_config(), 4))
    for _ in range(3):
        rb, rs = big.train_step(), small.train_step()
        assert rb.tokens == rs.tokens and math.isclose(rb.loss, rs.loss, rel_tol=1e-5)
    for pb, ps in zip(big.params, small.params):
        assert torch.allclose(pb, ps, atol=1e-5)


class Sabotage(nn.Module):
    """Wraps a loss module; returns NaN or a multiplied loss at chosen calls."""

    def __init__(self, inner, nan_at=(), spike_at=()):
        super().__init__()
        self.inner, self.nan_at, self.spike_at, self.calls = inner, set(nan_at), set(spike_at), 0

    def forward(self, x, y):
        self.calls += 1
        loss = self.inner(x, y)
        if self.calls in self.nan_at:
            return loss * float("nan")
        return loss * 3 if self.calls in self.spike_at else loss


def _sabotaged(nan_at=(), spike_at=()):
    task = _task()
    inner = task.module
    task.module = Sabotage(inner, nan_at, spike_at)
    save, load = task.save_model, task.load_model
    task.save_model = lambda d, sd, meta: save(d, {k.removeprefix("inner."): v for k, v in sd.items()}, meta)
    task.load_model = lambda d: {"inner." + k: v for k, v in load(d).items()}
    return task


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    t = Trainer(_sabotaged(nan_at=(3, 4)), _cfg(max_steps=6), tmp_path / "run")
    summary = t.fit()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    skips = [r for r in recs if r.get("event") == "nonfinite_skip"]
    assert [r["step"] for r in skips] == [3, 4] and summary["nonfinite_skips"] == 2
    assert [r["train_loss"] for r in recs if r.get("step") == 3 and "train_loss" in r] == [None]
    assert all(torch.isfinite(p).all() for p in t.params)


def test_too_many_nonfinite_steps_stop_with_a_hint(tmp_path):
    t = Trainer(_sabotaged(nan_at=range(2, 20)), _cfg(max_steps=10, max_bad_steps=3), tmp_path / "run")
    with pytest.raises(SlmError, match="Lower the learning rate"):
        t.fit()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert recs[-1]["event"] == "stop" and recs[-1]["reason"] == "nonfinite"


def test_loss_spike_rolls_back_and_lowers_lr(tmp_path):
    cfg = _cfg(max_steps=14, spike_window=5, spike_zscore=4.0, spike_rollback=True, ckpt_every=5)
    t = Trainer(_sabotaged(spike_at=(12,)), cfg, tmp_path / "run")
    summary = t.fit()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    spikes = [r for r in recs if r.get("event") == "loss_spike"]
    assert len(spikes) == 1 and spikes[0]["step"] == 12 and spikes[0]["action"] == "rollback"
    assert spikes[0]["to_checkpoint"] == checkpoint_name(10) and spikes[0]["lr_scale"] == 0.5
    assert summary["rollbacks"] == 1 and t.lr_scale == 0.5
    lr13 = [r["lr"] for r in recs if r.get("step") == 13 and "lr" in r][0]
    assert math.isclose(lr13, 0.5 * lr_at(12, cfg.lr, cfg.final_lr, cfg.warmup_for(14), 14), rel_tol=1e-12)


def test_loss_spike_is_logged_without_rollback(tmp_path):
    t = Trainer(_sabotaged(spike_at=(9,)), _cfg(max_steps=10, spike_window=5, spike_zscore=4.0), tmp_path / "run")
    t.fit()
    spikes = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "loss_spike"]
    assert [(r["step"], r["action"]) for r in spikes] == [(9, "logged")]


def test_sigterm_finishes_the_step_saves_and_stops(tmp_path):
    task = _task()

    class SignalAt(RandomBatches):
        def __iter__(self):
            for i, b in enumerate(super().__iter__()):
                if i == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield b

    task.batches = SignalAt(small_config(), 2)
    summary = Trainer(task, _cfg(max_steps=50), tmp_path / "run").fit()
    assert summary["stopped"] == "signal" and summary["steps"] == 4
    assert (tmp_path / "run" / checkpoint_name(4)).is_dir()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_new_pass_over_the_data_is_logged(tmp_path):
    task = _task()

    class Passes(RandomBatches):
        pass_index = property(lambda self: self.index // 3)

    task.batches = Passes(small_config(), 2)
    summary = Trainer(task, _cfg(max_steps=7), tmp_path / "run").fit()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["data_pass"]) for r in recs if r.get("event") == "data_pass"] == [(3, 1), (6, 2)]
    assert summary["data_pass"] == 2


def test_time_budget_sets_the_schedule_and_stops(tmp_path):
    summary = Trainer(_task(), _cfg(max_steps=None, max_minutes=0.05), tmp_path / "run").fit()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    horizon = [r for r in recs if r.get("event") == "schedule"]
    assert summary["stopped"] == "max_minutes" and summary["steps"] >= 5
    assert len(horizon) == 1 and horizon[0]["horizon"] >= 6
    assert json.loads((tmp_path / "run" / checkpoint_name(summary["steps"]) / "trainer.json").read_text())["horizon"]


def test_trainer_accepts_any_task_module(tmp_path):
    """What a fine-tuning recipe plugs in: its own module, masked batches, its own save format."""

    class Bigram(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 10)

        def forward(self, x, y):
            return nn.functional.cross_entropy(self.emb(x).view(-1, 10), y.view(-1), ignore_index=-100)

    class Masked:  # a BatchSource (trainer.py)
        pass_index, skipped = None, {}

        def __init__(self):
            self.i = 0

        def close(self):
            pass

        def __iter__(self):
            while True:
                self.i += 1
                x = torch.arange(8).remainder(10).view(1, 8)
                y = (x + 1).remainder(10)
                y[:, :3] = -100  # a prompt: no loss there
                yield x, y

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, s):
            self.i = s["i"]

    saved = {}
    module = Bigram()
    task = TrainTask(module=module, batches=Masked(), eval_batches=lambda split: Masked(),
                     save_model=lambda d, sd, meta: saved.update(sd) or (d / "adapter.json").write_text("{}"),
                     load_model=lambda d: saved)
    summary = Trainer(task, _cfg(max_steps=30, lr=0.3, weight_decay=0.0), tmp_path / "run").fit()
    assert summary["final_val_loss"] < 1.0 and "emb.weight" in saved
    assert (tmp_path / "run" / checkpoint_name(30) / "adapter.json").exists()
