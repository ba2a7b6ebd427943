"""`slm export` (transformers directories, GGUF files) and `slm convert --from-gguf`, checked
in runtimes nobody here wrote: transformers with no slm code, transformers' GGUF loader, and
(slow, optional) llama.cpp through llama-cpp-python."""

import json
import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from slm.artifacts import load_model, model_tensors, save_model  # noqa: E402
from slm.cli import main  # noqa: E402
from slm.errors import SlmError  # noqa: E402
from slm.generate import SamplingConfig, generate  # noqa: E402
from slm.interop.export import export_gguf, export_hf  # noqa: E402
from slm.loading import open_model  # noqa: E402
from slm.model import GPT  # noqa: E402
from slm.tokenizer import get_tokenizer  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

# q8_0 (int8 blocks of 32 with an f16 scale) may move perplexity by at most this much, relative
# to f32 (measured: ~0.05 % on the test model; llama.cpp reports ~0.01-0.1 % on real models).
Q8_PPL_DELTA = 0.01
TEXTS = ["Hello world", "The history of Rome, in 3 parts:", " naïve café — 東京 🙂", "a<|endoftext|>b"]


def peaked_gpt(**kw) -> GPT:
    """A small random GPT whose predictions are peaked (a scaled embedding), so perplexity is
    far from the vocabulary size and quantization error shows in it."""
    torch.manual_seed(0)
    model = GPT(tiny_config(**{"block_size": 64, "n_embd": 64, **kw})).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:  # non-trivial norms and biases: every mapping is exercised
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("export") / "m"
    save_model(d, peaked_gpt())
    return d


@pytest.fixture(scope="module")
def sample_ids(model_dir):
    model, _ = load_model(model_dir)
    return [50256] + list(generate(model, [50256], SamplingConfig(max_new_tokens=63, temperature=1.0, seed=0),
                                   vocab_limit=50257))


def greedy(model, prompt, n=24):
    return list(generate(model, prompt, SamplingConfig(max_new_tokens=n, temperature=0), vocab_limit=50257))


def perplexity(logits, ids):
    """Of `ids` under logits (T, V)."""
    lp = torch.log_softmax(logits[:-1, :50257].float(), -1)
    return math.exp(-lp.gather(-1, torch.tensor(ids[1:])[:, None]).mean().item())


def slm_logits(model_dir, ids):
    model, _ = load_model(model_dir)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


NO_SLM_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, texts, ids = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d).eval()
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].tolist()
assert not any(m == "slm" or m.startswith("slm.") for m in sys.modules), "slm was imported"
print(json.dumps({"class": type(model).__name__, "ids": [tok(t).input_ids for t in texts], "logits": logits}))
"""


def test_hf_export_loads_without_slm(model_dir, sample_ids, tmp_path):
    assert main(["export", "--model", str(model_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and (tmp_path / "hf" / "model.safetensors").is_file()
    out = subprocess.run([sys.executable, "-c", NO_SLM_CHECK, str(tmp_path / "hf"), json.dumps(TEXTS),
                          json.dumps(sample_ids)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["class"] == "GPT2LMHeadModel"
    ours = slm_logits(model_dir, sample_ids)[:, :50257]
    assert (torch.tensor(got["logits"]) - ours).abs().max().item() <= 1e-4
    tok = get_tokenizer()
    for text, ids in zip(TEXTS[:3], got["ids"]):
        assert ids == tok.encode(text)
    # transformers treats a literal <|endoftext|> as the special token, like GPT-2 always did.
    assert got["ids"][3] == tok.encode("a") + [50256] + tok.encode("b")


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_export_in_transformers(model_dir, sample_ids, tmp_path, dtype):
    path = export_gguf(model_dir, tmp_path / f"m-{dtype}.gguf", dtype)
    r = gguf.GGUFReader(str(path))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "gpt2" and field("tokenizer.ggml.model") == "gpt2"
    assert len(field("tokenizer.ggml.tokens")) == 50257 and field("tokenizer.ggml.eos_token_id") == 50256
    ident = get_tokenizer().identity
    assert field("slm.tokenizer.fingerprint") == ident.fingerprint and field("slm.tokenizer.name") == "gpt2"
    assert field("slm.version") and "slm" in field("general.description")
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_norm.bias"] == "F32" and kinds["blk.0.ffn_up.weight"] == dtype.upper()
    assert "output.weight" not in kinds  # tied to token_embd, stored once

    # open_model loads .gguf files with transformers' GGUF loader (what `slm serve --model F.gguf` does).
    loaded = open_model(path)
    hf, tok = loaded.model.hf, loaded.tokenizer.hf
    assert type(hf).__name__ == "GPT2LMHeadModel" and loaded.model.config.block_size == 64
    assert tok("Hello world").input_ids == [15496, 995]
    with torch.no_grad():
        theirs = hf(torch.tensor([sample_ids])).logits[0]
    ours = slm_logits(model_dir, sample_ids)
    if dtype == "f32":
        assert (theirs - ours[..., :50257]).abs().max().item() <= 1e-4
    ppl, ppl32 = perplexity(theirs, sample_ids), perplexity(ours, sample_ids)
    assert abs(ppl / ppl32 - 1) <= (Q8_PPL_DELTA if dtype == "q8_0" else 1e-3), (ppl, ppl32)
    if dtype != "q8_0":
        model, _ = load_model(model_dir)
        prompt = get_tokenizer().encode("The history of")
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=50256,
                          eos_token_id=None)
        assert out[0, len(prompt):].tolist() == greedy(model, prompt)
        # slm's own loop over the transformers model, sliding past the 64-token window.
        assert greedy(loaded.model, prompt, 80) == greedy(model, prompt, 80)


def test_gguf_round_trip(model_dir, tmp_path):
    original, _ = load_model(model_dir)
    for dtype, tol in [("f32", 0.0), ("q8_0", 0.02)]:
        export_gguf(model_dir, tmp_path / f"{dtype}.gguf", dtype)
        assert main(["convert", "--from-gguf", str(tmp_path / f"{dtype}.gguf"), "--out", str(tmp_path / dtype)]) == 0
        back, art = load_model(tmp_path / dtype)
        assert art.metadata["source"]["gguf_metadata"]["slm.tokenizer.fingerprint"] == get_tokenizer().identity.fingerprint
        a, b = model_tensors(original), model_tensors(back)
        assert a.keys() == b.keys() and b["transformer.wte.weight"][50257:].abs().max() == 0
        a["transformer.wte.weight"] = a["transformer.wte.weight"][:50257]  # the padding rows are no tokens
        b["transformer.wte.weight"] = b["transformer.wte.weight"][:50257]
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= tol if tol == 0 else 0 < worst <= tol


def test_export_refusals(model_dir, tmp_path):
    with pytest.raises(SlmError, match="is a file"):
        export_hf(model_dir / "model.safetensors", tmp_path / "x")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16)).save_pretrained(tmp_path / "hf")
    with pytest.raises(SlmError, match="already in transformers' format"):
        export_gguf(tmp_path / "hf", tmp_path / "x.gguf")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"format": "slm", "kind": "int8-thing"}))
    with pytest.raises(SlmError, match="kind 'int8-thing'.*fp32 model"):
        export_gguf(odd, tmp_path / "x.gguf")
    save_model(tmp_path / "nobias", GPT(tiny_config(bias=False)))
    with pytest.raises(SlmError, match="bias=False"):
        export_gguf(tmp_path / "nobias", tmp_path / "x.gguf")
    save_model(tmp_path / "narrow", GPT(tiny_config(n_embd=48, n_head=2)))
    with pytest.raises(SlmError, match="multiple of 32"):
        export_gguf(tmp_path / "narrow", tmp_path / "x.gguf", "q8_0")
    assert main(["export", "--model", str(model_dir), "--format", "hf", "--dtype", "q8_0", "--out", str(tmp_path / "y")]) == 1


def test_export_cli_json_and_errors(model_dir, tmp_path, capsys):
    assert main(["export", "--model", str(model_dir), "--format", "gguf", "--dtype", "f16",
                 "--out", str(tmp_path / "m.gguf"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"format": "gguf", "out": str(tmp_path / "m.gguf"), "dtype": "f16",
                   "bytes": (tmp_path / "m.gguf").stat().st_size}
    assert main(["convert", "--from-gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GGUF file not found" in err and "Traceback" not in err
    assert main(["export", "--model", str(tmp_path / "missing"), "--format", "hf", "--out", str(tmp_path / "y")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_from_gguf_refuses_other_architectures(tmp_path):
    from slm.interop.gguf import read_gguf_gpt2
    from slm.interop.hf_causal import resolve_alias

    try:
        llama_file = resolve_alias("smollm2-135m-instruct")
    except SlmError as e:
        pytest.skip(str(e))
    with pytest.raises(SlmError, match="'llama' model.*gpt2 only"):
        read_gguf_gpt2(llama_file)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(SlmError, match="not a readable GGUF"):
        read_gguf_gpt2(tmp_path / "bad.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_in_llama_cpp(model_dir, sample_ids, tmp_path, dtype):
    """llama.cpp itself (pip install 'slm[llama]': builds llama-cpp-python from source)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(model_dir, tmp_path / f"m-{dtype}.gguf", dtype)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    assert llm.tokenize(b"Hello world", add_bos=False, special=False) == [15496, 995]
    model, _ = load_model(model_dir)
    if dtype != "q8_0":
        prompt = get_tokenizer().encode("The history of")
        theirs = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            theirs.append(t)
            if len(theirs) == 24:
                break
        assert theirs == greedy(model, prompt)
    llm.reset()
    llm.eval(sample_ids)
    theirs = torch.tensor(llm.scores[: len(sample_ids)])
    ppl, ppl32 = perplexity(theirs, sample_ids), perplexity(slm_logits(model_dir, sample_ids), sample_ids)
    assert abs(ppl / ppl32 - 1) <= (Q8_PPL_DELTA if dtype == "q8_0" else 1e-3), (ppl, ppl32)
