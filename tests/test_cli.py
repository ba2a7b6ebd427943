import json
import subprocess
import sys

import pytest

from slm.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("init", "convert", "info", "tokenize", "generate"):
        assert cmd in out


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "slm", "tokenize", "Hello world", "--json"],
                       capture_output=True, text=True, check=True)
    assert json.loads(r.stdout)["ids"] == [15496, 995]


def test_init_info_generate(tmp_path, capsys):
    m = str(tmp_path / "m")
    code, out, _ = run(capsys, "init", "--preset", "tiny", "--n-layer", "2", "--block-size", "64", "--out", m)
    assert code == 0 and "2 layers" in out
    code, out, _ = run(capsys, "info", "--model", m, "--json")
    info = json.loads(out)
    assert info["model"]["n_layer"] == 2 and info["model"]["block_size"] == 64 and info["tokenizer"]["name"] == "gpt2"
    code, out, _ = run(capsys, "generate", "--model", m, "--prompt", "The history of", "--max-new-tokens", "12",
                       "--temperature", "0", "--json")
    res = json.loads(out)
    assert code == 0 and res["tokens"] == 12 and res["finish_reason"] == "length"
    assert {"text", "tokens", "prefill_tok_s", "decode_tok_s"} <= set(res)
    code, out2, err = run(capsys, "generate", "--model", m, "--prompt", "The history of", "--max-new-tokens", "12",
                          "--temperature", "0", "--no-kv-cache")
    assert out2.rstrip("\n") == "The history of" + res["text"]  # streamed text == JSON text
    assert "decode" in err


def test_info_preset(capsys):
    code, out, _ = run(capsys, "info", "--preset", "gpt2")
    assert "124,475,904" in out and "non-embedding 85,056,000" in out


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    code, out, err = run(capsys, "generate", "--model", str(tmp_path / "missing"))
    assert code == 1 and err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err


def test_bad_flag_value_is_refused(tmp_path, capsys):
    code, _, err = run(capsys, "init", "--n-embd", "100", "--n-head", "3", "--out", str(tmp_path / "x"))
    assert code == 1 and "divisible" in err
