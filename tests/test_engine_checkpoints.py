import json

import pytest
import torch

from slm.artifacts import find_model_dir, load_model
from slm.loading import open_model
from slm.engine.checkpoints import (CheckpointManager, checkpoint_name, load_optimizer,
                                   optimizer_from_tensors, optimizer_to_tensors, verify)
from slm.engine.config import TrainConfig
from slm.engine.trainer import Trainer

from trainutil import one_thread, small_task  # noqa: F401 (fixture)


def _trainer(tmp_path, **kw):
    task = small_task()
    tc = TrainConfig(max_steps=10, dtype="fp32", eval_every=0, ckpt_minutes=None, **kw)
    return Trainer(task, tc, tmp_path / "run")


def _save_at(trainer, step, val_loss=None):
    trainer.step = step
    trainer.last_val, trainer.val_step = val_loss, (step if val_loss is not None else None)
    trainer.save_checkpoint()


def test_checkpoint_is_a_loadable_model_dir_with_verified_files(tmp_path):
    tr = _trainer(tmp_path)
    tr.train_step()
    _save_at(tr, 1)
    path = tmp_path / "run" / checkpoint_name(1)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                    "optimizer.safetensors", "trainer.json"]
    state = verify(path)
    assert state["step"] == 1 and state["world_size"] == 1 and state["ranks"][0]["data"] == {"index": 1}
    model, _ = load_model(path)
    for k, v in tr.task.module.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # optimizer moments round-trip exactly, keyed by parameter name
    osd = load_optimizer(path)
    assert "model.transformer.wte.weight" in osd["state"]
    exp = tr.optimizer.state[tr.task.module.model.transformer.wte.weight]["exp_avg"]
    assert torch.equal(osd["state"]["model.transformer.wte.weight"]["exp_avg"], exp)
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_optimizer_tensors_round_trip():
    osd = {"state": {"a.weight": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["a.weight"]}]}
    tensors, groups = optimizer_to_tensors(osd)
    back = optimizer_from_tensors(tensors, json.loads(json.dumps(groups)))
    assert back["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(back["state"]["a.weight"]["exp_avg"], torch.ones(2))


def test_retention_keeps_last_k_and_best(tmp_path):
    tr = _trainer(tmp_path, keep_last=2)
    tr.train_step()
    for step, val in [(1, 5.0), (2, 3.0), (3, 4.0), (4, None), (5, 4.5)]:
        _save_at(tr, step, val)
    names = [p.name for p in CheckpointManager(tmp_path / "run").checkpoints()]
    assert names == [checkpoint_name(2), checkpoint_name(4), checkpoint_name(5)]  # best (step 2) + last two
    assert find_model_dir(tmp_path / "run").name == checkpoint_name(2)


def test_corrupt_and_incomplete_checkpoints_are_reported_and_skipped(tmp_path):
    tr = _trainer(tmp_path, keep_last=5)
    tr.train_step()
    for step in (1, 2, 3):
        _save_at(tr, step)
    run = tmp_path / "run"
    opt = run / checkpoint_name(3) / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:-10])  # truncated
    (run / checkpoint_name(2) / "manifest.json").unlink()  # never finished
    (run / ".tmp-step-0000004-123").mkdir()  # a save killed half-way
    messages = []
    mgr = CheckpointManager(run, report=messages.append)
    mgr.clean_temporaries()
    path, state = mgr.latest_valid()
    assert path.name == checkpoint_name(1) and state["step"] == 1
    assert any("step-0000003" in m and "corrupt" in m for m in messages)
    assert any("step-0000002" in m for m in messages)
    assert any(".tmp-step-0000004" in m for m in messages) and not (run / ".tmp-step-0000004-123").exists()


def test_a_resumed_run_sets_damaged_checkpoints_aside_and_saves_over_their_steps(tmp_path):
    tr = _trainer(tmp_path, keep_last=5)
    tr.train_step()
    for step in (1, 2):
        _save_at(tr, step)
    run = tmp_path / "run"
    model = run / checkpoint_name(2) / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])  # truncated: the run resumes from step 1
    messages = []
    tr2 = _trainer(tmp_path, keep_last=5)
    tr2.ckpt.report = messages.append
    assert tr2.resume() and tr2.step == 1
    aside = list(run.glob(".corrupt-step-0000002-*"))
    assert len(aside) == 1 and any("moved to .corrupt-step-0000002" in m for m in messages)
    assert [p.name for p in tr2.ckpt.checkpoints()] == [checkpoint_name(1)]
    tr2.train_step()
    tr2.save_checkpoint()  # step 2 again: a complete checkpoint under its name, the damaged one kept aside
    assert verify(run / checkpoint_name(2))["step"] == 2 and aside[0].exists()
    assert find_model_dir(run).name == checkpoint_name(2)


def test_run_directory_works_as_model_spec(tmp_path):
    tr = _trainer(tmp_path)
    tr.train_step()
    _save_at(tr, 1, 6.0)
    tr.train_step()
    _save_at(tr, 2, 7.0)  # worse: the best stays step 1
    run = tmp_path / "run"
    loaded = open_model(run)
    assert loaded.path.endswith(checkpoint_name(1)) and loaded.kind == "gpt"
    assert open_model(run / checkpoint_name(2)).path.endswith(checkpoint_name(2))
    ids = torch.tensor([[1, 2, 3]])
    model, _ = load_model(run / checkpoint_name(1))
    assert torch.allclose(loaded.model(ids)[0], model(ids)[0], atol=1e-5)


def test_no_checkpoint_yet_means_no_model(tmp_path):
    (tmp_path / "run").mkdir()
    assert find_model_dir(tmp_path / "run") is None
    with pytest.raises(Exception):
        open_model(tmp_path / "run")
