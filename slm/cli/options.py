"""Typed options for every command: each option is declared once, with one default and one help text.

- A config dataclass becomes flags (`add_dataclass_args`): flags default to None ("not given"),
  and `from_args` builds the dataclass from the given ones only, on top of an optional base
  (e.g. values read from a config file), so the dataclass's defaults are the only ones. Help
  text comes from each field's `metadata["help"]`.
- The options several stages share are declared here: `--model`, `--device`, `--dtype` (one
  vocabulary: slm/runtime.py), `--json`, `--out`, and `--data` with the stream's flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from slm.data.config import DataConfig
from slm.errors import SlmError
from slm.runtime import DEFAULT_DEVICE, DEFAULT_DTYPE, dtype_name

MODEL_HELP = ("model: an slm model, run or checkpoint directory, a fine-tuned or quantized directory, a Hugging "
              "Face directory or hub id, a .gguf file, or the alias smollm2-135m-instruct")


def _base_type(tp):
    """`int | None` -> int; `list[str]` -> (list, str)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if origin in (list, tuple):
        return (list, typing.get_args(tp)[0])
    return tp


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, only=None, exclude=(), rename: dict | None = None):
    """One flag per field of `cls` (or of `only`), named --field-name (or rename[field])."""
    hints = typing.get_type_hints(cls)
    rename = rename or {}
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in exclude:
            continue
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if help_text else f"(default: {default})"
        kw = dict(dest=f.name, default=None, help=help_text)
        names = [rename.get(f.name, flag(f.name))]
        if tp is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(tp, tuple):
            parser.add_argument(*names, nargs="+", type=tp[1], metavar=f.name.upper(), **kw)
        elif "choices" in f.metadata:
            parser.add_argument(*names, type=tp, choices=f.metadata["choices"], **kw)
        else:
            parser.add_argument(*names, type=tp, metavar=f.name.upper(), **kw)


def given(ns: argparse.Namespace, cls) -> dict:
    """The fields of `cls` that were given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


def from_args(cls, ns: argparse.Namespace, base: dict | None = None):
    """`cls(**base, **flags given)`: flags override the base, the dataclass fills the rest."""
    return cls(**{**(base or {}), **given(ns, cls)})


# ---------------------------------------------------------------------------- shared options


def add_model(p: argparse.ArgumentParser, repeat: bool = False, help: str = MODEL_HELP) -> None:
    """--model MODEL (required); with `repeat`, given once per model into `args.models`."""
    if repeat:
        p.add_argument("--model", required=True, action="append", dest="models", metavar="MODEL",
                       help=help + "; repeat for each model")
    else:
        p.add_argument("--model", required=True, help=help)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=DEFAULT_DEVICE, help=f"cpu, cuda, cuda:N or auto (default: {DEFAULT_DEVICE})")


def add_dtype(p: argparse.ArgumentParser, choices: tuple[str, ...], what: str) -> None:
    """--dtype in slm's one vocabulary (fp32, bf16, fp16, auto; f32/f16/float32... accepted),
    limited to the `choices` this command can use; `what` says what it sets and what auto means."""
    def parse(text: str) -> str:
        try:
            return dtype_name(text, choices)
        except SlmError as e:  # argparse reports ArgumentTypeError as a usage error
            raise argparse.ArgumentTypeError(str(e)) from None

    p.add_argument("--dtype", type=parse, default=DEFAULT_DTYPE, metavar="{" + ",".join(choices) + "}",
                   help=f"{what} (default: {DEFAULT_DTYPE})")


def add_json(p: argparse.ArgumentParser, what: str = "one JSON object") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what}")


def add_out(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", required=True, help=what)


def add_data(p: argparse.ArgumentParser, exclude=()) -> None:
    """`--data SOURCE` plus one flag per DataConfig field (commands that stream data);
    `from_args(DataConfig, args)` builds the config."""
    add_dataclass_args(p, DataConfig, exclude=exclude, rename={"source": "--data"})
