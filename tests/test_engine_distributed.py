"""torchrun on CPU (gloo): DDP and FSDP against one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slm.engine.checkpoints import verify
from slm.engine.metrics import read_metrics

from datautil import corpus

TESTS = Path(__file__).resolve().parent
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def run(cmd):
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *map(str, args)]


def _losses(run):
    return [r["train_loss"] for r in read_metrics(run / "metrics.jsonl") if "train_loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    r = run([sys.executable, TESTS / "ddp_worker.py", out, "single", "6"])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, single, mode):
    out = tmp_path / "run"
    r = run(torchrun(TESTS / "ddp_worker.py", out, mode, 6))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = _losses(single), _losses(out)
    assert len(one) == len(two) == 6 and one[-1] < one[0]
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, two)), (one, two)
    summary = json.loads(r.stdout.strip().splitlines()[-1])  # printed by rank 0 only
    assert summary["world_size"] == 2 and r.stdout.count('"world_size"') == 1
    # one writer: every step logged once; one checkpoint holding both ranks' positions
    state = verify(out / "step-0000006")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    # the full weights were gathered: the checkpoint loads as a plain model
    from slm.artifacts import load_model

    load_model(out / "step-0000006")


def _slm_train_args(tmp_path):
    data, _ = corpus(tmp_path, n_files=2, docs_per_file=150)
    return ["-m", "slm", "train", "--data", data, "--val-percent", "20", "--test-percent", "20", "--n-layer", "1",
            "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "2", "--dtype", "fp32",
            "--eval-every", "0", "--eval-batches", "1", "--ckpt-every", "2", "--out", tmp_path / "run", "--json"]


def test_torchrun_slm_train_shards_data_with_one_writer(tmp_path):
    r = run(torchrun(*_slm_train_args(tmp_path), "--max-steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["world_size"] == 2  # exactly one JSON object: rank 0 prints
    state = verify(tmp_path / "run" / "step-0000002")
    a, b = (s["data"] for s in state["ranks"])
    assert a["rank"] == 0 and b["rank"] == 1 and a["world_size"] == b["world_size"] == 2
    assert [x["step"] for x in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train_loss" in x] == [1, 2]


@pytest.mark.slow
def test_torchrun_slm_train_resumes(tmp_path):
    args = _slm_train_args(tmp_path)
    assert run(torchrun(*args, "--max-steps", "2")).returncode == 0
    r = run(torchrun(*args, "--max-steps", "4", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["steps"] == 4 and s["tokens"] == 4 * 2 * 2 * 16 and s["resumed_from"] == "step-0000002"
    assert [x["step"] for x in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train_loss" in x] == [1, 2, 3, 4]
    r = run(torchrun(*args, "--max-steps", "6", "--resume", nproc=1))
    assert r.returncode == 1 and "same number" in r.stderr
