import json

import pytest

from slm.cli import build_parser
from slm.cli.train import layered_config
from slm.errors import SlmError
from slm.artifacts import RUN_CONFIG_FILE
from slm.io import write_json
from slm.recipes.config import build_run_config, merge, read_config_file


def _args(*argv):
    return build_parser().parse_args(["train", "--out", "x", *argv])


def test_toml_flat_keys_and_flags_override(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('data = "some/dir"\npreset = "tiny"\nn_layer = 2\nlr = 3e-4\nbatch-size = 4\nmax_steps = 50\n')
    run = build_run_config(layered_config(_args("--config", str(f), "--lr", "1e-3")))
    assert run.data.source == "some/dir" and run.model.n_layer == 2 and run.model.n_embd == 384
    assert run.train.lr == 1e-3 and run.train.batch_size == 4 and run.train.max_steps == 50


def test_yaml_sections(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  n_layer: 3\n  block_size: 64\ndata:\n  source: corpus\n  text_field: body\n"
                 "train:\n  grad_accum: 4\n  dtype: fp32\n")
    run = build_run_config(layered_config(_args("--config", str(f), "--block-size", "32")))
    assert run.model.n_layer == 3 and run.model.block_size == 32
    assert run.data.source == "corpus" and run.data.text_field == "body"
    assert run.train.grad_accum == 4 and run.train.dtype == "fp32"


def test_saved_run_config_reads_back_as_a_config_file(tmp_path):
    run = build_run_config(layered_config(_args("--data", "d", "--n-layer", "2", "--lr", "2e-4", "--seed", "3")))
    write_json(tmp_path / RUN_CONFIG_FILE, run.to_dict())  # what a run saves (engine/run.py)
    again = build_run_config(merge(read_config_file(tmp_path / RUN_CONFIG_FILE)))
    assert again == run
    assert json.loads((tmp_path / RUN_CONFIG_FILE).read_text())["train"]["lr"] == 2e-4


def test_unknown_key_and_bad_values_are_refused(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("learning_rate = 1\n")
    with pytest.raises(SlmError, match="unknown key 'learning_rate'"):
        read_config_file(f)
    f.write_text("lr = [\n")
    with pytest.raises(SlmError, match="cannot parse"):
        read_config_file(f)
    with pytest.raises(SlmError, match="grad_accum must be at least 1"):
        build_run_config(layered_config(_args("--grad-accum", "0")))
    with pytest.raises(SlmError, match="not found"):
        read_config_file(tmp_path / "missing.yaml")
