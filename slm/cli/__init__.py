"""The `slm` command: subcommands parse flags, call a function of the package, print.

Each module in COMMANDS registers its subcommands with `register(subparsers)` and sets
`func` on them. A `SlmError` becomes one line on stderr and exit code 1; `--debug` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from slm import __version__
from slm.errors import SlmError

# Modules under slm.cli, in the order their commands appear in `slm --help`.
COMMANDS = ["core", "data", "train", "finetune", "eval", "quant", "serve", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm",
        description="Build a small language model end to end: pretrain, fine-tune, quantize, generate, serve.",
    )
    parser.add_argument("--version", action="version", version=f"slm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"slm.cli.{name}").register(sub)
    return parser


def quiet_third_party_logs() -> None:
    """Importing transformers imports torchao, which warns about CUDA-only kernels and
    deprecated torch APIs: noise for a CPU user, so only its errors are shown."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def passive_omp_threads() -> None:
    """On a CPU that other programs already keep busy, let idle OpenMP threads sleep instead of spin.

    A spinning thread keeps its core while the thread it waits for may be descheduled, which makes
    decoding and training several times slower on a busy CPU; on an idle CPU spinning is what makes
    small kernels fast (both measured: bench/README.md, "Measurements behind design choices"). So
    the policy is only set when the load average already reaches the core count, and never over
    OMP_WAIT_POLICY.
    libgomp reads the variable when torch is imported, so this runs before any command module is."""
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        busy = False
    if busy:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    passive_omp_threads()
    quiet_third_party_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return args.func(args) or 0
    except SlmError as e:
        if args.debug:
            raise
        print(f"slm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"slm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `slm generate ... | head`
        sys.stderr.close()
        return 0
