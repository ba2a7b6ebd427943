"""Dataclasses -> argparse flags, so every option has exactly one default: the dataclass's.

Flags default to None ("not given"); `from_args` builds the dataclass from the given ones
only, on top of an optional base (e.g. values read from a config file). Help text comes from
each field's `metadata["help"]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


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
