import json
import os
import random
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from slm.cli import main
from slm.engine.metrics import read_metrics

from datautil import corpus
from trainutil import one_thread  # noqa: F401 (fixture)

SHAPE = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16"]
DATA = ["--val-percent", "20", "--test-percent", "20"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def data_dir(tmp_path):
    d, _ = corpus(tmp_path, n_files=2, docs_per_file=150)
    return d


def common(data_dir, *extra):
    return ["--data", data_dir, *DATA, *SHAPE, "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "2",
            "--eval-batches", "2", "--dtype", "fp32", "--seed", "3", *extra]


def test_train_eval_generate_plot(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", *common(data_dir), "--out", out, "--max-steps", "12", "--eval-every",
                            "6", "--ckpt-every", "4", "--keep-last", "1", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert {"steps", "final_val_loss", "tokens_per_s", "checkpoint_seconds"} <= set(s)
    assert s["steps"] == 12 and s["tokens"] == 12 * 2 * 16 and s["test_loss"] is not None
    assert s["checkpoint_saves"] == 3 and s["checkpoint_bytes_per_save"] > 0 and 0 < s["checkpoint_share"] < 1
    assert s["data_pass"] == 0 and s["data_skipped"] == {} and s["planned_memory_bytes"] > 0
    assert "step 12" in err and "val loss" in err
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if "train_loss" in r] == list(range(1, 13))
    vals = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    assert [v[0] for v in vals] == [4, 6, 8, 12]  # every 6 steps, and at each checkpoint (so "best" sees all)
    assert vals[-1][1] < vals[0][1]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["train"]["lr"] == 3e-3 and saved["model"]["n_layer"] == 1 and saved["data"]["source"] == str(data_dir)
    # keep-last 1 plus the best by validation loss
    assert sorted(p.name for p in out.glob("step-*")) == ["step-0000012"]
    code, stdout, err = run(capsys, "eval", "--model", out, "--data", data_dir, *DATA, "--split", "test",
                            "--max-tokens", "40", "--json")
    e = json.loads(stdout)
    assert code == 0 and set(e) >= {"loss", "perplexity", "tokens"} and e["tokens"] <= 40
    assert e["model"].endswith("step-0000012")
    code, stdout, _ = run(capsys, "generate", "--model", out, "--prompt", "Document", "--max-new-tokens", "5",
                          "--temperature", "0", "--json")
    assert code == 0 and json.loads(stdout)["tokens"] == 5
    code, stdout, _ = run(capsys, "info", "--model", out, "--json")
    assert code == 0 and json.loads(stdout)["path"].endswith("step-0000012")
    code, stdout, _ = run(capsys, "plot", out)
    png = out / "loss.png"
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    code, _, err = run(capsys, "train", *common(data_dir), "--out", out, "--max-steps", "2")
    assert code == 1 and "--resume" in err and err.count("\n") == 1


def test_config_file_with_flag_overrides(tmp_path, data_dir, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = "{data_dir}"\nval_percent = 20\ntest_percent = 20\nn_layer = 1\nn_head = 2\n'
                   f'n_embd = 32\nblock_size = 16\nbatch_size = 2\nlr = 1e-3\nmax_steps = 3\neval_every = 0\n'
                   f'eval_batches = 1\ndtype = "fp32"\n')
    code, _, err = run(capsys, "train", "--config", cfg, "--lr", "5e-3", "--out", tmp_path / "run")
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["train"]["lr"] == 5e-3 and saved["train"]["max_steps"] == 3 and saved["model"]["n_embd"] == 32
    # the saved config is itself a config file
    code, _, err = run(capsys, "train", "--config", tmp_path / "run" / "train_config.json", "--out", tmp_path / "run2")
    assert code == 0, err


def _cli(*argv):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "slm", "train", *map(str, argv)], env


def test_sigkill_at_a_random_moment_then_resume_is_bit_exact(tmp_path, data_dir):
    args = common(data_dir, "--max-steps", "60", "--eval-every", "30", "--ckpt-every", "10", "--keep-last", "2")
    assert main(["train", *map(str, args), "--out", str(tmp_path / "a")]) == 0  # run A in-process, 1 thread too
    b = tmp_path / "b"
    cmd, env = _cli(*args, "--out", b)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(b.glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in read_metrics(b / "metrics.jsonl") if "train_loss" in r)
    cmd, env = _cli(*args, "--out", b, "--resume")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resumed from step-" in r.stderr
    la = {x["step"]: x["train_loss"] for x in read_metrics(tmp_path / "a" / "metrics.jsonl") if "train_loss" in x}
    lb = [(x["step"], x["train_loss"]) for x in read_metrics(b / "metrics.jsonl") if "train_loss" in x]
    assert [s for s, _ in lb] == list(range(1, 61))  # each step logged once: the lost ones were redone
    assert dict(lb) == la, f"killed at step {killed_at}"


def test_plan(capsys):
    code, out, _ = run(capsys, "plan", "--preset", "1b", "--batch-size", "16", "--block-size", "2048", "--device",
                       "h100", "--json")
    p = json.loads(out)
    assert code == 0 and p["fits"] is False and p["params"] > 1.2e9
    assert set(p["memory_per_device"]) >= {"weights", "gradients", "optimizer", "activations"}
    alt = p["alternative"]
    assert alt["batch_size"] * alt["grad_accum"] == 16 and alt["memory_per_device_total"] < 0.9 * 80e9
    code, out, _ = run(capsys, "plan", "--preset", "gpt2", "--device", "h100", "--num-gpus", "8", "--tokens", "1e10")
    assert code == 0 and "fits: yes" in out and "$" in out and "assumed MFU 40%" in out
    code, out, _ = run(capsys, "plan", *SHAPE, "--batch-size", "2", "--device", "cpu", "--tokens", "1e6", "--json")
    p = json.loads(out)
    assert p["fits"] and p["throughput_source"].startswith("measured") and p["tokens_per_s"] > 0 and p["seconds"] > 0


def test_train_refuses_what_will_not_fit(tmp_path, data_dir, capsys):
    big = ["--n-layer", "4", "--n-head", "8", "--n-embd", "512", "--block-size", "256", "--batch-size", "128"]
    code, _, err = run(capsys, "train", *common(data_dir), *big, "--out", tmp_path / "run", "--max-steps", "2",
                       "--memory-gb", "3")
    assert code == 1 and "fits: NO" in err and "try --batch-size" in err and "available" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sweep(tmp_path, data_dir, capsys):
    code, out, err = run(capsys, "sweep", *common(data_dir), "--max-steps", "4", "--eval-every", "0",
                         "--out", tmp_path / "sw", "--grid", "lr=1e-4,1e-2", "batch_size=1,2", "--json")
    assert code == 0, err
    res = json.loads(out)
    vals = [r["final_val_loss"] for r in res["runs"]]
    assert len(vals) == 4 and vals == sorted(vals)
    assert Path(res["best_checkpoint"]).is_dir() and res["runs"][0]["params"]["lr"] == 1e-2
    assert "| rank | lr | batch_size |" in (tmp_path / "sw" / "sweep.md").read_text()
    # a finished sweep is not trained again
    t = time.time()
    code, out, _ = run(capsys, "sweep", *common(data_dir), "--max-steps", "4", "--eval-every", "0",
                       "--out", tmp_path / "sw", "--grid", "lr=1e-4,1e-2", "batch_size=1,2")
    assert code == 0 and "best:" in out and time.time() - t < 5


def test_bad_grid_and_eval_input(tmp_path, capsys):
    code, _, err = run(capsys, "sweep", "--out", tmp_path, "--grid", "learning_rate=1,2")
    assert code == 1 and "unknown key 'learning_rate'" in err
    code, _, err = run(capsys, "sweep", "--out", tmp_path, "--grid", "lr=fast")
    assert code == 1 and "not a valid float" in err
    code, _, err = run(capsys, "eval", "--model", tmp_path / "nothing", "--data", "wiki-vital")
    assert code == 1 and "does not exist" in err


def test_toml_example_in_readme_parses():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    assert tomllib.loads(block)["lr"] > 0


def test_a_split_too_small_for_one_batch_is_reported_not_a_nan(tmp_path, data_dir, capsys):
    args = ["--data", data_dir, "--val-percent", "0.1", "--test-percent", "20", *SHAPE, "--batch-size", "2",
            "--eval-batches", "2", "--dtype", "fp32", "--max-steps", "3", "--eval-every", "1", "--json"]
    code, out, err = run(capsys, "train", *args, "--out", tmp_path / "run")
    assert code == 0, err
    s = json.loads(out)
    assert s["final_val_loss"] is None and s["test_loss"] is not None
    assert err.count("the val split gave no full batch") == 1
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert not any("val_loss" in r for r in recs)
    assert [r["split"] for r in recs if r.get("event") == "no_eval_data"] == ["val"]
