"""Training commands: train, plan, sweep, plot."""

from __future__ import annotations

import argparse
import json
import os
import sys

from slm.cli.core import add_model_shape_args
from slm.cli.options import add_data, add_dataclass_args, add_json, add_out, given
from slm.config import ModelConfig
from slm.data import DataConfig
from slm.engine.config import TrainConfig
from slm.engine.plan import PlanRequest


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every key of a training run: model shape, data, loop (the same keys a --config file holds)."""
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file with the same keys as these flags "
                                                    "(flags override it)")
    add_model_shape_args(p)
    add_data(p)
    add_dataclass_args(p, TrainConfig)


def register(sub) -> None:
    p = sub.add_parser("train", help="train a GPT on a data source (resumable; torchrun for several processes)")
    add_out(p, "run directory: checkpoints, metrics.jsonl, config, summary")
    add_train_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    add_json(p, "the run summary as one JSON object")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="memory per device, fits or not, FLOPs per token, time and cost for N tokens")
    add_model_shape_args(p)
    add_dataclass_args(p, PlanRequest, exclude=("model",))
    add_json(p, "the plan as one JSON object")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sweep", help="train every combination of a grid of settings; table sorted by val loss")
    add_out(p, "directory for the runs, sweep.md and sweep.json")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="settings to vary, e.g. lr=3e-4,6e-4 batch_size=4,8 (any key slm train takes)")
    add_train_args(p)
    add_json(p, "the results as one JSON object")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plot", help="loss curves of a training run (train and val vs tokens) as a PNG")
    p.add_argument("run", metavar="DIR", help="training run directory")
    p.add_argument("--out", help="PNG path (default: DIR/loss.png)")
    p.set_defaults(func=cmd_plot)


def layered_config(args, resume_dir=None) -> dict:
    """Defaults < the run's saved config (on --resume) < --config file < flags."""
    from slm.recipes.config import load_run_config, merge, read_config_file

    layers = []
    if resume_dir is not None:
        layers.append(load_run_config(resume_dir))
    if args.config:
        layers.append(read_config_file(args.config))
    layers.append({"preset": args.preset, "model": given(args, ModelConfig), "data": given(args, DataConfig),
                   "train": given(args, TrainConfig)})
    return merge(*layers)


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def cmd_train(args) -> int:
    from slm.engine.metrics import describe_summary
    from slm.recipes.config import build_run_config
    from slm.recipes.pretrain import train

    run = build_run_config(layered_config(args, args.out if args.resume else None))
    summary = train(run, args.out, resume=args.resume)
    if _is_main():
        print(json.dumps(summary) if args.json else describe_summary(summary))
    return 0


def cmd_plan(args) -> int:
    from slm.cli.core import model_config_from_args
    from slm.engine.plan import format_plan, make_plan

    req = PlanRequest(model=model_config_from_args(args), **given(args, PlanRequest))
    if req.device == "cpu":
        print("measuring this CPU ...", file=sys.stderr)
    plan = make_plan(req)
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 0


def cmd_sweep(args) -> int:
    from slm.recipes.sweep import format_table, parse_grid, run_sweep

    grid = parse_grid(args.grid)
    result = run_sweep(layered_config(args), grid, args.out, report=lambda m: print(m, file=sys.stderr))
    if _is_main():
        print(json.dumps(result) if args.json else format_table(result))
    return 0


def cmd_plot(args) -> int:
    from slm.engine.plot import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")
    return 0
