import json

import pytest
import torch

from slm.artifacts import load_model, save_model
from slm.errors import SlmError


@pytest.fixture
def saved(tmp_path, tiny_model):
    save_model(tmp_path / "m", tiny_model, metadata={"note": "test"})
    return tmp_path / "m"


def test_round_trip(saved, tiny_model):
    model, art = load_model(saved)
    assert model.lm_head.weight is model.transformer.wte.weight
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["tokenizer"]["name"] == "gpt2" and len(cfg["tokenizer"]["fingerprint"]) == 64
    assert cfg["metadata"] == {"note": "test"} and cfg["slm_version"] and cfg["model"]["n_layer"] == 2
    assert art.metadata == {"note": "test"}


def test_loading_never_unpickles(saved, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_model(saved)


def test_truncated_weights(saved):
    p = saved / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(SlmError, match="truncated"):
        load_model(saved)


def test_tampered_weights(saved):
    p = saved / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-100] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(SlmError, match="checksum"):
        load_model(saved)


def test_garbage_weights_without_checksum(saved):
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["weights"]["sha256"], cfg["weights"]["bytes"]
    (saved / "config.json").write_text(json.dumps(cfg))
    (saved / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SlmError, match="damaged"):
        load_model(saved)


def test_tokenizer_mismatch_refused_before_weights_are_read(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["tokenizer"]["fingerprint"] = "0" * 64
    (saved / "config.json").write_text(json.dumps(cfg))
    (saved / "model.safetensors").unlink()  # would fail later: the tokenizer check comes first
    with pytest.raises(SlmError, match="tokenizer mismatch.*000000000000"):
        load_model(saved)


def test_missing_and_invalid_config(tmp_path, saved):
    with pytest.raises(SlmError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlmError, match="no config.json"):
        load_model(tmp_path / "empty")
    (saved / "config.json").write_text("{oops")
    with pytest.raises(SlmError, match="not valid JSON"):
        load_model(saved)


def test_save_leaves_no_temporary_files(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
