"""The options every stage shares: one declaration, one default, one dtype vocabulary."""

import pytest

from slm.cli import build_parser
from slm.engine.config import TrainConfig
from slm.errors import SlmError
from slm.runtime import AUTOCAST_DTYPES, WEIGHT_DTYPES, dtype_name


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_shared_options_have_one_default():
    commands = {"generate": ["--model", "m"], "eval": ["--model", "m"], "eval-sql": ["--model", "m", "--data", "d"],
                "serve": ["--model", "m"]}
    for name, extra in commands.items():
        args = parse(name, *extra)
        assert args.device == "auto", name
        assert getattr(args, "dtype", "auto") == "auto", name
    assert TrainConfig().device == "auto" and TrainConfig().dtype == "auto"
    assert parse("export", "--model", "m", "--format", "gguf", "--out", "o").dtype == "auto"


def test_one_dtype_vocabulary_with_its_spellings():
    assert parse("generate", "--model", "m", "--dtype", "float16").dtype == "fp16"
    assert parse("export", "--model", "m", "--format", "gguf", "--out", "o", "--dtype", "f16").dtype == "fp16"
    assert parse("export", "--model", "m", "--format", "gguf", "--out", "o", "--dtype", "q8_0").dtype == "q8_0"
    assert parse("eval", "--model", "m", "--dtype", "bfloat16").dtype == "bf16"
    assert TrainConfig(dtype="f32").dtype == "fp32"
    assert dtype_name("FP32", AUTOCAST_DTYPES) == "fp32" and "fp16" in WEIGHT_DTYPES
    with pytest.raises(SlmError, match="not one of auto, fp32, bf16"):
        TrainConfig(dtype="fp16")  # training autocasts to bf16 or not at all
    with pytest.raises(SystemExit):
        parse("generate", "--model", "m", "--dtype", "int3")


def test_bench_and_eval_live_with_evaluation():
    from slm.cli import eval as eval_cli

    assert parse("bench", "--model", "a", "--model", "b").func is eval_cli.cmd_bench
    assert parse("eval-sql", "--model", "m", "--data", "d").func is eval_cli.cmd_eval_sql
    assert parse("eval", "--model", "m").func is eval_cli.cmd_eval
