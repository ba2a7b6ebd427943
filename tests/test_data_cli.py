"""`slm data inspect` and `slm data bench`: JSON contracts, human output, errors."""

import argparse
import json

from datautil import mixed_folder
from slm.cli import main
from slm.cli.options import add_data, from_args
from slm.data import DataConfig


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_on_bad_input(tmp_path, capsys, caplog):
    d = mixed_folder(tmp_path / "mixed")
    code, out, err = run(capsys, "data", "inspect", str(d), "--json")
    r = json.loads(out)
    assert code == 0 and "Traceback" not in err
    assert r["documents"] == 51 and r["files"] == 3 and r["tokens"] > 0
    assert r["skipped"]["unreadable_file"] == 1 and r["skipped"]["null_text"] == 25
    assert sum(r["splits"].values()) == 51 and r["sample"].startswith("Photosynthesis")
    assert any("corrupt.parquet" in r.getMessage() for r in caplog.records)  # the warning names the file


def test_inspect_wiki_vital_text(capsys):
    code, out, _ = run(capsys, "data", "inspect", "wiki-vital", "--max-docs", "500")
    assert code == 0 and "documents (first 500): 500" in out and "columns: text, id, dump, url" in out


def test_bench_json(capsys):
    code, out, _ = run(capsys, "data", "bench", "wiki-vital", "--seconds", "0.5", "--block-size", "128",
                       "--batch-size", "4", "--json")
    r = json.loads(out)
    assert code == 0 and r["tokens_per_s"] > 0 and r["docs_per_s"] > 0 and r["peak_rss_bytes"] > 10 * 2**20
    assert r["tokens"] == r["batches"] * 128 * 4


def test_missing_source_is_one_line(tmp_path, capsys):
    code, out, err = run(capsys, "data", "inspect", str(tmp_path / "does-not-exist"))
    assert code == 1 and out == "" and err.count("\n") == 1 and "does-not-exist" in err


def test_wrong_text_field_names_it(tmp_path, capsys):
    d = mixed_folder(tmp_path / "mixed")
    code, out, _ = run(capsys, "data", "inspect", str(d), "--text-field", "body", "--json")
    assert code == 0 and json.loads(out)["documents"] == 0 and json.loads(out)["skipped"]["missing_column"] == 1


def test_config_flags_reach_the_loader(tmp_path, capsys):
    d = mixed_folder(tmp_path / "mixed")
    code, out, _ = run(capsys, "data", "inspect", str(d), "--val-percent", "99", "--test-percent", "0", "--json")
    r = json.loads(out)
    assert code == 0 and r["split_percent"] == {"val": 99.0, "test": 0.0} and r["splits"]["val"] >= 40
    code, out, _ = run(capsys, "data", "inspect", str(d), "--max-doc-chars", "1150", "--json")
    assert json.loads(out)["skipped"]["too_long"] == 25  # the 1,180-character rows


def test_add_data_for_other_commands():
    p = argparse.ArgumentParser()
    add_data(p)
    cfg = from_args(DataConfig, p.parse_args(["--data", "fineweb-edu", "--num-workers", "2", "--val-percent", "0.5"]))
    assert (cfg.source, cfg.num_workers, cfg.val_percent, cfg.shuffle_buffer) == ("fineweb-edu", 2, 0.5, 8192)
    assert from_args(DataConfig, p.parse_args([])) == DataConfig()
