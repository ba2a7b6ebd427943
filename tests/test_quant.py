"""Quantization: layer numerics against fp32, artifacts round trips, refusal of damaged ones."""

import json
import types
import warnings

import pytest
import torch
import torch.nn as nn

from conftest import tiny_config
from datautil import make_docs, write_parquet
from slm.artifacts import save_model
from slm.errors import SlmError
from slm.generate import SamplingConfig, generate
from slm.loading import open_model
from slm.model import GPT
from slm.quant import kernels
from slm.recipes.quantize import quantize_to_dir
from slm.quant.calibrate import input_ranges
from slm.quant.layers import (Int4Linear, Int8Embedding, Int8Linear, dequantize_int4, dequantize_int8, pack_nibbles,
                              quantize_int4, quantize_int8, unpack_nibbles)
from slm.quant.quantize import QuantConfig, quantize_model

# Tolerances (relative L2 error of a layer's output against fp32, Gaussian weights and inputs):
# int8 weights alone ~0.6%, with int8 activations ~1%; int4 groups of 32 ~8%.
INT8_TOL, INT4_TOL = 0.02, 0.12


def rel(y, ref):
    return float((y - ref).norm() / ref.norm())


def working(candidates):
    return [k for k in candidates if kernels.AVAILABLE[k]()]


@pytest.fixture
def linear():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.bias.normal_(0, 0.1)
    return lin


def test_int8_and_int4_round_trip_bounds():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()  # half a step at most
    q4, scale, zero = quantize_int4(w, 32)
    assert q4.max() <= 15 and scale.dtype == torch.bfloat16
    assert torch.equal(unpack_nibbles(pack_nibbles(q4)), q4)
    step = scale.float().repeat_interleave(32, dim=1)
    assert ((dequantize_int4(q4, scale, zero) - w).abs() <= step * 0.6 + 0.02).all()
    with pytest.raises(SlmError, match="divide"):
        quantize_int4(torch.randn(4, 48), 32)


@pytest.mark.parametrize("activation", ["dynamic", "static", "weight"])
def test_int8_linear_every_kernel_matches_fp32(linear, activation):
    x = torch.randn(7, 128)
    ref = linear(x).detach()
    q, s = quantize_int8(linear.weight)
    rng = torch.tensor([float(x.min()), float(x.max())]) if activation == "static" else None
    kernels_here = working(["native", "fbgemm", "int_mm", "int8pack", "reference"])
    outs = {}
    for k in kernels_here:
        layer = Int8Linear(q, s, linear.bias, activation, rng, kernel=k)
        if layer.kernel != k:  # this kernel does not serve this activation scheme
            continue
        outs[k] = layer(x)
        assert rel(outs[k], ref) < INT8_TOL, k
        assert torch.equal(layer.tensors()["qweight"], q)  # fbgemm's packed copy unpacks exactly
    assert "reference" in outs and len(outs) >= 2
    if "int_mm" in outs:  # the same symmetric int8 math as the reference, in integers
        assert rel(outs["int_mm"], outs["reference"]) < 1e-4


@pytest.mark.skipif(not kernels.has_fbgemm(), reason="fbgemm is x86 only")
def test_fbgemm_seven_bit_activations_for_cpus_without_vnni(linear, monkeypatch):
    """Without VNNI, fbgemm's int16 pair sums would saturate on 8-bit activations; 7 bits stay
    within tolerance (twice the activation error)."""
    monkeypatch.setattr(kernels, "fbgemm_reduce_range", lambda: True)
    x = torch.randn(5, 128)
    q, s = quantize_int8(linear.weight)
    rng = torch.tensor([float(x.min()), float(x.max())])
    for activation, r in (("dynamic", None), ("static", rng)):
        assert rel(Int8Linear(q, s, linear.bias, activation, r, kernel="fbgemm")(x), linear(x).detach()) < INT8_TOL


def test_int8_linear_3d_input_and_no_bias(linear):
    q, s = quantize_int8(linear.weight)
    layer = Int8Linear(q, s, None, "dynamic")
    x = torch.randn(2, 5, 128)
    assert layer(x).shape == (2, 5, 96)
    assert rel(layer(x), x @ linear.weight.detach().t()) < INT8_TOL


def test_int4_linear_matches_fp32(linear):
    x = torch.randn(7, 128)
    ref = linear(x).detach()
    q, scale, zero = quantize_int4(linear.weight, 32)
    outs = {k: Int4Linear(pack_nibbles(q), scale, zero, linear.bias, kernel=k)(x) for k in working(["int4pack", "reference"])}
    for k, y in outs.items():
        assert rel(y, ref) < INT4_TOL, k
        assert rel(y, outs["reference"]) < 0.01, k


def test_int8_embedding():
    torch.manual_seed(0)
    w = torch.randn(100, 16)
    emb = Int8Embedding(*quantize_int8(w))
    idx = torch.tensor([[3, 7, 99]])
    assert emb(idx).shape == (1, 3, 16) and rel(emb(idx), w[idx]) < 0.01


def test_fallback_when_neither_native_nor_fbgemm_is_here(linear, monkeypatch):
    """No C++ compiler for slm's kernel, and a later torch without torch.ao's fbgemm ops: int8
    layers still build and agree."""
    q, s = quantize_int8(linear.weight)
    x = torch.randn(3, 128)
    monkeypatch.setitem(kernels.AVAILABLE, "native", lambda: False)
    monkeypatch.setitem(kernels.AVAILABLE, "fbgemm", lambda: False)
    layer = Int8Linear(q, s, linear.bias, "dynamic")
    assert layer.kernel in ("int_mm", "reference")
    assert rel(layer(x), linear(x).detach()) < INT8_TOL
    monkeypatch.setenv("SLM_QUANT_KERNEL", "reference")
    assert Int8Linear(q, s, linear.bias, "dynamic").kernel == "reference"


@pytest.mark.skipif(not kernels.has_native(), reason="slm's kernel did not build here")
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("activation", ["dynamic", "static"])
def test_native_kernel_is_exact_int8_math(rows, activation):
    """Shapes off the kernel's tiles (37 outputs, 130 inputs), every row count of its inner
    loop: the result equals uint8 activations times int8 weights computed in Python."""
    torch.manual_seed(rows)
    w, b = torch.randn(37, 130) * 0.05, torch.randn(37)
    x = torch.randn(rows, 130) * 2 + 0.5
    q, s = quantize_int8(w)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    layer = Int8Linear(q, s, b, activation, torch.tensor([lo, hi]) if activation == "static" else None, kernel="native")
    assert layer.kernel == "native" and torch.equal(layer.tensors()["qweight"], q)
    # uint8 codes with a zero point: one range per row (dynamic) or the calibrated one (static)
    lo_ = x.amin(1, keepdim=True).clamp(max=0) if activation == "dynamic" else torch.full((rows, 1), lo)
    hi_ = x.amax(1, keepdim=True).clamp(min=0) if activation == "dynamic" else torch.full((rows, 1), hi)
    xs = (hi_ - lo_) / 255
    xz = torch.round(-lo_ / xs)
    xq = (torch.round(x / xs) + xz).clamp(0, 255)
    expected = ((xq - xz).double() @ q.double().t()) * xs.double() * s.double() + b.double()
    assert torch.allclose(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert rel(layer(x), x @ w.t() + b) < INT8_TOL


@pytest.mark.parametrize("backend", [types.SimpleNamespace(), types.SimpleNamespace(engine="qnnpack")])
def test_fbgemm_detection_falls_back_without_the_engine_setting(backend, monkeypatch):
    """torch.backends.quantized gone (a later torch) or naming another engine: no fbgemm, no crash."""
    kernels.has_fbgemm.cache_clear()
    monkeypatch.setattr(torch.backends, "quantized", backend)
    try:
        assert kernels.has_fbgemm() is False
    finally:
        kernels.has_fbgemm.cache_clear()


# ------------------------------------------------------------------------------ whole models


def test_linear_layout_undoes_the_decode_layout(tiny_model):
    from slm.inference import for_inference, to_linear_layout

    ref = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    model = to_linear_layout(for_inference(tiny_model))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.state_dict().keys() == ref.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT trained for a second on a fixed token cycle, so its greedy choices are
    confident (a random model's near-ties would flip under any rounding)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=64, n_head=4, block_size=64, vocab_size=2304))
    cycle = torch.randperm(2000)[:24] + 100
    data = cycle.repeat(12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add synchronization, worst on a busy machine
    try:
        for _ in range(40):
            i = int(torch.randint(0, 24, ()))
            x, y = data[i:i + 48][None], data[i + 1:i + 49][None]
            loss = model(x, y)[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    d = tmp_path_factory.mktemp("trained") / "fp32"
    save_model(d, model)
    return d, model, cycle


def greedy(model, prompt, n):
    return list(generate(model, prompt, SamplingConfig(max_new_tokens=n, temperature=0)))


@pytest.mark.parametrize("method", ["dynamic-int8", "weight-int8", "weight-int4"])
def test_gpt_quantize_save_load_round_trip(trained, tmp_path, method):
    src, fp32, cycle = trained
    summary = quantize_to_dir(str(src), tmp_path / "q", QuantConfig(method=method, group_size=32))
    assert summary["kind"] == "gpt-quantized" and summary["float_modules"] == ["transformer.wpe"]
    loaded = open_model(tmp_path / "q")
    assert loaded.kind == "gpt-quantized"
    idx = cycle[:40][None]
    with torch.no_grad():
        ref = fp32(idx)[0]
        logits = loaded.model(idx)[0]
    assert rel(logits, ref) < (0.05 if method.endswith("int8") else 0.25)
    prompt = cycle[:8].tolist()
    want = greedy(fp32, prompt, 30)
    got = greedy(loaded.model, prompt, 30)
    assert sum(a == b for a, b in zip(got, want)) >= 27  # greedy tokens (mostly) equal
    # KV cache and recomputation agree for the quantized model too.
    assert got == list(generate(loaded.model, prompt, SamplingConfig(max_new_tokens=30, temperature=0, kv_cache=False)))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"]["method"] == method and cfg["tokenizer"]["name"] == "gpt2"
    assert cfg["quantization"]["modules"]["lm_head"]["tied_to"] == "transformer.wte"


def test_loaded_model_equals_the_quantized_one(trained, tmp_path):
    """Saving and loading changes nothing: the same tensors, the same logits."""
    src, fp32, cycle = trained
    from slm.artifacts import load_model

    model, _ = load_model(src)
    quantize_model(model, QuantConfig(), "transformer.wte", "lm_head")
    quantize_to_dir(str(src), tmp_path / "q", QuantConfig())
    loaded = open_model(tmp_path / "q").model
    idx = cycle[:30][None]
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], loaded(idx)[0], atol=1e-5)


def test_head_and_embedding_choices(trained, tmp_path):
    src, fp32, cycle = trained
    sizes = {}
    for name, exclude in [("both", []), ("head-fp32", ["lm_head"]), ("emb-fp32", ["transformer.wte"]),
                          ("neither", ["lm_head,transformer.wte"])]:
        s = quantize_to_dir(str(src), tmp_path / name, QuantConfig(exclude=exclude))
        sizes[name] = s["file_bytes"]
        m = open_model(tmp_path / name).model
        with torch.no_grad():
            assert rel(m(cycle[:30][None])[0], fp32(cycle[:30][None])[0]) < 0.05
        types = (type(m.lm_head).__name__, type(m.transformer.wte).__name__)
        assert types == {"both": ("Int8Linear", "Int8Embedding"), "head-fp32": ("TransposedLinear", "Int8Embedding"),
                         "emb-fp32": ("Int8Linear", "Embedding"), "neither": ("TransposedLinear", "Embedding")}[name]
    # One int8 table when tied; an fp32 one (4 bytes a weight) plus int8 when only one is excluded.
    assert sizes["both"] < sizes["neither"] < sizes["head-fp32"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "both" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("lm_head")]  # the tied head is stored once


def test_loading_never_builds_fp32_weights_nor_unpickles(trained, tmp_path, monkeypatch):
    src, _, _ = trained
    quantize_to_dir(str(src), tmp_path / "q", QuantConfig())
    import pickle

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    real = []
    orig = nn.Linear.reset_parameters

    def spy(self):
        real.append(not self.weight.is_meta)
        orig(self)

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(nn.Linear, "reset_parameters", spy)
    model = open_model(tmp_path / "q").model
    assert real and not any(real)  # every Linear was created on the meta device
    matrices = [n for n, p in model.named_parameters() if p.dim() > 1]
    assert matrices == ["transformer.wpe.weight"]  # the only float matrix: the position table


def test_static_int8_calibration(trained, tmp_path):
    src, fp32, cycle = trained
    batches = [cycle.repeat(3)[i:i + 40][None] for i in range(4)]
    summary = quantize_to_dir(str(src), tmp_path / "s", QuantConfig(method="static-int8"),
                              calibration=lambda tok, block: batches)
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["quantization"]["modules"]["transformer.h.0.attn.c_attn"]["activation"] == "static"
    m = open_model(tmp_path / "s").model
    prompt = cycle[:8].tolist()
    assert sum(a == b for a, b in zip(greedy(m, prompt, 30), greedy(fp32, prompt, 30))) >= 27
    assert summary["quantized_modules"] == 10 and summary["calibration"] is None  # batches given, not read
    with pytest.raises(SlmError, match="no batches"):
        input_ranges(fp32, {"x": fp32.lm_head}, [])


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """A parquet corpus whose val split (1 % of documents, by hash) holds a few hundred tokens."""
    return write_parquet(tmp_path_factory.mktemp("corpus") / "docs.parquet", make_docs(3000, words=40))


@pytest.fixture(scope="module")
def small_gpt(tmp_path_factory):
    """A random tiny GPT reading the whole GPT-2 vocabulary (the data stream's tokens)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("small") / "fp32"
    save_model(d, GPT(tiny_config()).eval())
    return d


def test_static_int8_from_the_command_line(small_gpt, text_corpus, tmp_path, capsys):
    """`slm quantize --method static-int8 --calib-data SOURCE`: the input ranges saved are the
    ones the train split's first batches give."""
    from slm.artifacts import load_model
    from slm.cli import main
    from slm.data import DataConfig
    from slm.inference import to_linear_layout
    from slm.quant.calibrate import calibration_batches
    from slm.tokenizer import get_tokenizer

    out = tmp_path / "s"
    assert main(["quantize", "--model", str(small_gpt), "--out", str(out), "--method", "static-int8",
                 "--calib-data", str(text_corpus), "--calib-batches", "3", "--calib-batch-size", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["calibration"] == {"source": str(text_corpus), "batches": 3, "batch_shape": [2, 32]}
    cfg = json.loads((out / "config.json").read_text())["quantization"]
    assert cfg["calibration"] == summary["calibration"]

    fp32 = to_linear_layout(load_model(small_gpt)[0])
    qcfg = QuantConfig(method="static-int8", calib_batches=3, calib_batch_size=2)
    batches = calibration_batches(DataConfig(source=str(text_corpus)), qcfg, get_tokenizer(), "m", 32)
    assert len(batches) == 3 and all(b.shape == (2, 32) for b in batches)
    linears = {n: m for n, m in fp32.named_modules() if isinstance(m, nn.Linear)}
    want = input_ranges(fp32, linears, batches)
    loaded = open_model(out)
    assert loaded.kind == "gpt-quantized"
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "lm_head"):
        layer = loaded.model.get_submodule(name)
        assert layer.activation == "static" and torch.equal(layer.input_range, want[name]), name
    idx = batches[0]
    with torch.no_grad():
        assert rel(loaded.model(idx)[0], fp32(idx)[0]) < 0.05
    # Too little data for one batch: said so, nothing written.
    tiny = write_parquet(tmp_path / "tiny.parquet", make_docs(3))
    assert main(["quantize", "--model", str(small_gpt), "--out", str(tmp_path / "t"), "--method", "static-int8",
                 "--calib-data", str(tiny)]) == 1
    assert "too small for one calibration batch" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_static_int8_refuses_models_with_another_tokenizer(hf_llama, text_corpus, tmp_path):
    with pytest.raises(SlmError, match="GPT-2 tokens, so static-int8 cannot calibrate"):
        quantize_to_dir(str(hf_llama[0]), tmp_path / "s", QuantConfig(method="static-int8",
                                                                      calib_data=str(text_corpus)))


def test_calibration_data_prefers_the_training_runs_data(small_gpt, tmp_path):
    from slm.data import DataConfig
    from slm.quant.calibrate import calibration_data
    from slm.artifacts import RUN_CONFIG_FILE
    from slm.engine.config import TrainConfig
    from slm.io import write_json
    from slm.recipes.config import RunConfig

    run = tmp_path / "run"
    (run / "step-0000010").mkdir(parents=True)
    write_json(run / RUN_CONFIG_FILE, RunConfig(tiny_config(), DataConfig(source="shards/", text_field="content",
                                                                          num_workers=2), TrainConfig()).to_dict())
    static = QuantConfig(method="static-int8")
    for model in (run, run / "step-0000010"):  # the run, or a checkpoint inside it
        data = calibration_data(str(model), static)
        assert (data.source, data.text_field, data.num_workers) == ("shards/", "content", 0)
    assert calibration_data(str(run), QuantConfig(method="static-int8", calib_data="other/")).source == "other/"
    assert calibration_data(str(small_gpt), static) == DataConfig()  # not a run: wiki-vital


# ------------------------------------------------------------------------------ damaged artifacts


@pytest.fixture
def quantized(trained, tmp_path):
    quantize_to_dir(str(trained[0]), tmp_path / "q", QuantConfig())
    return tmp_path / "q"


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_truncated_and_modified_quantized_weights_are_refused(quantized):
    p = quantized / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:-1000])
    with pytest.raises(SlmError, match="truncated"):
        open_model(quantized)
    flipped = bytearray(data)
    flipped[-5000] ^= 0x40
    p.write_bytes(bytes(flipped))
    with pytest.raises(SlmError, match="checksum"):
        open_model(quantized)


def test_damaged_quantization_descriptions_are_refused(quantized):
    _edit_config(quantized, lambda c: c.pop("quantization"))
    with pytest.raises(SlmError, match="quantization"):
        open_model(quantized)


def test_tensor_that_does_not_fit_is_refused(quantized):
    # A spec claiming int4 where int8 tensors are stored: the shapes do not fit.
    _edit_config(quantized, lambda c: c["quantization"]["modules"].__setitem__(
        "transformer.h.0.mlp.c_fc", {"type": "int4", "group_size": 32}))
    with pytest.raises(SlmError, match="incomplete|shape"):
        open_model(quantized)


def test_unknown_module_type_and_tokenizer_mismatch_are_refused(quantized, tmp_path):
    _edit_config(quantized, lambda c: c["quantization"]["modules"].__setitem__(
        "transformer.h.0.mlp.c_fc", {"type": "int3"}))
    with pytest.raises(SlmError, match="int3"):
        open_model(quantized)
    _edit_config(quantized, lambda c: c["tokenizer"].__setitem__("fingerprint", "0" * 64))
    with pytest.raises(SlmError, match="tokenizer mismatch"):
        open_model(quantized)


def test_already_quantized_model_is_not_quantized_again(quantized, tmp_path):
    with pytest.raises(SlmError, match="already quantized"):
        quantize_to_dir(str(quantized), tmp_path / "again", QuantConfig())


def test_quantizing_over_the_source_is_refused(trained):
    with pytest.raises(SlmError, match="elsewhere"):
        quantize_to_dir(str(trained[0]), trained[0], QuantConfig())


def test_config_errors():
    with pytest.raises(SlmError, match="unknown quantization method"):
        QuantConfig(method="int2")
    assert QuantConfig(exclude=["lm_head,transformer.wte", "c_fc"]).exclude == ["lm_head", "transformer.wte", "c_fc"]


# ------------------------------------------------------------------------------ Hugging Face models


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from slm.interop.hf import gpt2_hf_tokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(d)
    gpt2_hf_tokenizer().save_pretrained(d)
    return d, model


@pytest.mark.parametrize("method", ["dynamic-int8", "weight-int4"])
def test_hf_quantize_and_load(hf_llama, tmp_path, method):
    src, ref = hf_llama
    summary = quantize_to_dir(str(src), tmp_path / "q", QuantConfig(method=method, group_size=32))
    assert summary["kind"] == "hf-quantized" and summary["size_ratio"] < 0.3
    loaded = open_model(tmp_path / "q")
    assert loaded.kind == "hf-quantized" and loaded.tokenizer.encode("Hello world") == [15496, 995]
    assert type(loaded.model.hf.lm_head).__name__ == "Int8Linear"
    assert type(loaded.model.hf.model.layers[0].mlp.down_proj).__name__ == ("Int8Linear" if method == "dynamic-int8"
                                                                            else "Int4Linear")
    idx = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        assert rel(loaded.model(idx)[0], ref(idx).logits) < (0.05 if method == "dynamic-int8" else 0.25)
    out = list(generate(loaded.model, [5, 6, 7], SamplingConfig(max_new_tokens=20, temperature=0)))
    assert out == list(generate(loaded.model, [5, 6, 7], SamplingConfig(max_new_tokens=20, temperature=0,
                                                                       kv_cache=False)))


def test_hf_tokenizer_files_are_checked(hf_llama, tmp_path):
    src, _ = hf_llama
    quantize_to_dir(str(src), tmp_path / "q", QuantConfig())
    tok_file = tmp_path / "q" / "hf" / "tokenizer.json"
    tok = json.loads(tok_file.read_text())
    vocab = tok["model"]["vocab"]
    vocab["Hello"], vocab["world"] = vocab["world"], vocab["Hello"]  # a different tokenizer
    tok_file.write_text(json.dumps(tok))
    with pytest.raises(SlmError, match="tokenizer mismatch"):
        open_model(tmp_path / "q")
    (tmp_path / "q" / "hf" / "config.json").unlink()
    with pytest.raises(SlmError, match="Hugging Face config"):
        open_model(tmp_path / "q")


# ------------------------------------------------------------------------------ commands


def test_quantize_and_bench_commands(trained, tmp_path, capsys):
    from slm.cli import main

    src = str(trained[0])
    assert main(["quantize", "--model", src, "--out", str(tmp_path / "q"), "--exclude", "lm_head", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "dynamic-int8" and "lm_head" in summary["float_modules"]
    assert main(["bench", "--model", src, "--model", str(tmp_path / "q"), "--prompt-tokens", "16",
                 "--new-tokens", "8", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [r["model"] for r in rows] == [src, str(tmp_path / "q")] and "round 1/1" in err
    for r in rows:
        assert {"file_bytes", "peak_rss_bytes", "prefill_tok_s", "decode_tok_s", "load_seconds"} <= set(r)
        assert r["decode_tok_s"] > 0 and r["peak_rss_bytes"] >= r["rss_baseline_bytes"] > 0
        assert r["prompt_tokens"] == 16 and r["new_tokens"] == 8
    assert rows[0]["ratios"]["file_bytes"] == 1.0 and rows[1]["ratios"]["file_bytes"] < 1.0
    assert rows[1]["file_bytes"] == (tmp_path / "q" / "model.safetensors").stat().st_size
    assert main(["bench", "--model", src, "--prompt-tokens", "16", "--new-tokens", "4"]) == 0
    assert "decode" in capsys.readouterr().out
    assert main(["bench", "--model", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_bench_process_stays_lean_for_slm_models(quantized):
    """Measuring an slm model imports neither transformers nor torchao (RSS is the model's)."""
    import subprocess
    import sys

    code = ("import sys; from slm.recipes.bench import BenchConfig, measure; "
            f"measure({str(quantized)!r}, BenchConfig(prompt_tokens=8, new_tokens=4, repeats=1)); "
            "print(sorted(m for m in ('transformers', 'torchao', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_bench_perplexity_and_sql_accuracy(small_gpt, text_corpus, tmp_path, capsys):
    """`slm bench --data --sql-data`: the val split's perplexity as `slm eval` measures it, and
    execution accuracy with `slm eval-sql`'s evaluator (a random model's is ~0: it is the
    number's presence and range that is checked)."""
    from slm.recipes.bench import table
    from slm.cli import main
    from slm.data import DataConfig
    from slm.recipes.evaluate import evaluate_model

    quantize_to_dir(str(small_gpt), tmp_path / "q", QuantConfig())
    sql = tmp_path / "sql.jsonl"
    assert main(["sql-data", "--out", str(sql), "--n", "3"]) == 0
    capsys.readouterr()
    assert main(["bench", "--model", str(small_gpt), "--model", str(tmp_path / "q"), "--data", str(text_corpus),
                 "--eval-tokens", "256", "--sql-data", str(sql), "--prompt-tokens", "8", "--new-tokens", "4",
                 "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    want = evaluate_model(str(small_gpt), DataConfig(source=str(text_corpus)), max_tokens=256, batch_size=1,
                          device="cpu")
    assert rows[0]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6) and rows[0]["eval_tokens"] == 256
    assert 1e4 < rows[0]["perplexity"] < 2e5  # a random model: about the vocabulary size
    assert rows[1]["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=0.02)  # int8 barely moves it
    for r in rows:
        assert 0.0 <= r["execution_accuracy"] <= 1.0 and r["sql_examples"] == 3
    text = table(rows)
    assert "perplexity" in text.splitlines()[0] and "SQL exec acc" in text.splitlines()[0]


def test_bench_data_refuses_models_with_another_tokenizer(hf_llama, text_corpus):
    """The data stream is GPT-2 token ids: a model reading another tokenizer's (this HF model's
    is its own, recorded under its name) is refused in one line, before any speed run."""
    from slm.recipes.bench import BenchConfig, measure

    with pytest.raises(SlmError, match="GPT-2 tokens, so its perplexity on --data would mean nothing"):
        measure(str(hf_llama[0]), BenchConfig(data=str(text_corpus), new_tokens=10_000))


def test_eval_puts_batches_where_a_quantized_model_is(small_gpt, text_corpus, tmp_path, monkeypatch):
    """`slm eval --device auto` on a GPU machine: a quantized model stays on the CPU, and so
    must its batches (here the GPU is pretended: moving a batch to it would fail)."""
    import slm.recipes.evaluate as evaluation
    from slm.data import DataConfig

    quantize_to_dir(str(small_gpt), tmp_path / "q", QuantConfig())
    monkeypatch.setattr(evaluation, "resolve_device", lambda name: torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast's "CUDA is not available" on machines without one
        r = evaluation.evaluate_model(str(tmp_path / "q"), DataConfig(source=str(text_corpus)), max_tokens=64,
                                      batch_size=1)
    assert r["tokens"] == 64 and r["perplexity"] > 1


def test_auto_method_by_model_family(hf_llama, small_gpt, tmp_path):
    """The default picks per family what kept quality in bench/quant.py, and records the method it used."""
    hf = quantize_to_dir(str(hf_llama[0]), tmp_path / "h", QuantConfig())
    gpt = quantize_to_dir(str(small_gpt), tmp_path / "g", QuantConfig())
    assert (hf["method"], gpt["method"]) == ("weight-int8", "dynamic-int8")
    assert json.loads((tmp_path / "h" / "config.json").read_text())["quantization"]["method"] == "weight-int8"
    with pytest.raises(SlmError, match="choose auto or one of"):
        QuantConfig(method="int3")
