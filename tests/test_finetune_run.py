"""`slm finetune` end to end on tiny models: the trainer's loop, checkpoints, exact resume, outputs."""

import json
import shutil

import pytest
import torch

from slm.artifacts import read_tensors, save_model
from slm.cli import main
from slm.config import ModelConfig
from slm.errors import SlmError
from slm.loading import load_base
from slm.tasks.encode import IGNORE
from slm.lora import LoraSettings
from slm.recipes.config import FinetuneConfig, FinetuneTrainConfig
from slm.recipes.finetune import CompletionLoss, finetune
from slm.tasks.sql.synthetic import generate_examples, write_jsonl
from slm.loading import open_model
from slm.model import GPT

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture
def gpt_dir(tmp_path):
    torch.manual_seed(0)
    return save_model(tmp_path / "gpt", GPT(ModelConfig(block_size=512, n_layer=2, n_head=2, n_embd=32)))


@pytest.fixture
def sql_data(tmp_path):
    return write_jsonl(generate_examples(120, seed=0), tmp_path / "sql.jsonl")


def run_finetune(base, data, out, steps, **kw):
    f = FinetuneConfig(base=str(base), data=str(data), max_seq_len=512, holdout_max=8,
                       **{k: v for k, v in kw.items() if k in FinetuneConfig.__dataclass_fields__})
    t = FinetuneTrainConfig(max_steps=steps, batch_size=2, grad_accum=2, eval_every=0, log_every=1, dtype="fp32",
                            **{k: v for k, v in kw.items() if k in FinetuneTrainConfig.__dataclass_fields__})
    return finetune(f, LoraSettings(lora_r=4, lora_alpha=8), t, out, resume=kw.get("resume", False), quiet=True)


def test_completion_loss_equals_the_full_head_loss(gpt_dir):
    """Running the head on target positions only is the same loss as the model's own."""
    model = load_base(gpt_dir).model
    torch.manual_seed(0)
    idx, tgt = torch.randint(0, 1000, (2, 20)), torch.randint(0, 1000, (2, 20))
    tgt[0, :12] = IGNORE
    tgt[1, :5] = IGNORE
    tgt[1, 17:] = IGNORE
    with torch.no_grad():
        assert torch.allclose(CompletionLoss(model)(idx, tgt), model(idx, targets=tgt)[1], atol=1e-5)


def test_completion_loss_hf(tmp_path):
    from slm.interop.hf_causal import HFCausalLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = HFCausalLM(transformers.LlamaForCausalLM(cfg))
    idx, tgt = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    tgt[:, :9] = IGNORE
    with torch.no_grad():
        assert torch.allclose(CompletionLoss(model)(idx, tgt), model(idx, targets=tgt)[1], atol=1e-5)


def test_finetune_learns_writes_artifacts_and_loads(tmp_path, gpt_dir, sql_data):
    out = tmp_path / "ft"
    s = run_finetune(gpt_dir, sql_data, out, 30, merge=True, lr=3e-3)
    losses = [r["train_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r.get("train_loss") is not None]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns
    assert 0 < s["trainable_share"] < 0.1 and s["tokens_per_s"] > 0 and s["final_val_loss"] is not None
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "model" / "model.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "finetune" and cfg["tokenizer"]["name"] == "gpt2" and cfg["model"] == "model"
    # The run directory, a checkpoint inside it, and the merged model all load as --model.
    for spec in (out, out / "model", next(out.glob("step-*"))):
        assert open_model(spec).tokenizer.encode("Hello world") == [15496, 995]
    with pytest.raises(SlmError, match="already holds a fine-tune"):
        run_finetune(gpt_dir, sql_data, out, 2)


def test_resume_continues_exactly(tmp_path, gpt_dir, sql_data):
    straight = tmp_path / "a"
    run_finetune(gpt_dir, sql_data, straight, 6)
    # Same run, checkpointed at step 3; forget everything after it, then resume.
    resumed = tmp_path / "b"
    run_finetune(gpt_dir, sql_data, resumed, 6, ckpt_every=3)
    for p in ("step-0000006", "adapter"):
        shutil.rmtree(resumed / p)
    for p in ("config.json", "finetune_summary.json"):
        (resumed / p).unlink()
    s = run_finetune(gpt_dir, sql_data, resumed, 6, ckpt_every=3, resume=True)
    assert s["resumed_from"] == "step-0000003" and s["steps"] == 6
    a = read_tensors(straight / "adapter" / "adapter_model.safetensors")
    b = read_tensors(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tiny_llama(path):
    from slm.interop.hf import gpt2_hf_tokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok = gpt2_hf_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    tok.save_pretrained(path)
    return path


def test_cli_finetune_json_and_eval_sql_on_a_hf_model(tmp_path, sql_data, capsys):
    out = tmp_path / "ft"
    code = main(["finetune", "--base", str(_tiny_llama(tmp_path / "llama")), "--data", str(sql_data), "--out", str(out),
                 "--max-steps", "3", "--batch-size", "2", "--max-seq-len", "512", "--merge", "--json",
                 "--eval-every", "0", "--lora-r", "2"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["steps"] == 3 and summary["method"] == "lora"
    assert (out / "model" / "tokenizer_config.json").is_file()  # the tokenizer travels with the model
    code = main(["eval-sql", "--model", str(out), "--data", str(sql_data), "--limit", "2", "--max-new-tokens", "4",
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["n"] == 2 and {"execution_accuracy", "exact_match", "invalid_rate",
                                               "skipped_contexts"} <= set(report)


@pytest.mark.parametrize("kind", ["slm", "hf"])
def test_activation_checkpointing_trains_the_same_weights(tmp_path, gpt_dir, sql_data, kind):
    base = gpt_dir if kind == "slm" else _tiny_llama(tmp_path / "llama")
    runs = {ac: run_finetune(base, sql_data, tmp_path / f"ac-{ac}", 3, activation_checkpointing=ac)
            for ac in (False, True)}
    assert runs[True]["final_val_loss"] == pytest.approx(runs[False]["final_val_loss"], abs=1e-6)
    a, b = (read_tensors(tmp_path / f"ac-{ac}" / "adapter" / "adapter_model.safetensors") for ac in (False, True))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_refusals(tmp_path, gpt_dir, sql_data):
    with pytest.raises(SlmError, match="--max-steps or --epochs"):
        run_finetune(gpt_dir, sql_data, tmp_path / "x", 3, epochs=1.0)
    with pytest.raises(SlmError, match="--data"):
        finetune(FinetuneConfig(base=str(gpt_dir)), LoraSettings(), FinetuneTrainConfig(max_steps=1), tmp_path / "y")


def test_chat_data_and_epochs(tmp_path, gpt_dir):
    """Non-SQL layouts train the same way; --epochs becomes whole passes over the kept examples."""
    rows = [{"messages": [{"role": "user", "content": f"Echo {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(40)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_finetune(gpt_dir, data, tmp_path / "ft", None, epochs=1.0, holdout_fraction=0.1)
    # 36 training examples (4 held out), batches of 2, 2 micro-batches per step: 9 steps.
    assert s["examples"]["kept"] == 36 and s["steps"] == 9
