"""`slm sweep`: train every combination of a grid of settings and rank them by validation loss.

`--grid lr=3e-4,6e-4 batch_size=4,8` names any key `slm train` takes (model, data or training
settings); each combination trains into its own run directory under OUT, one after the other,
on top of the shared flags. The table (sweep.md) and sweep.json list every run sorted by final
validation loss, and name the best checkpoint. A combination whose run already finished
(summary.json present) is not trained again, so an interrupted sweep continues where it was.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import typing
from pathlib import Path

from slm.engine.run import SUMMARY_FILE
from slm.errors import SlmError
from slm.io import write_json
from slm.recipes.config import SECTIONS, build_run_config, merge, split_flat
from slm.recipes.pretrain import train

RESULTS_FILE = "sweep.json"
TABLE_FILE = "sweep.md"


def _field_type(key: str):
    for cls in SECTIONS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == key:
                tp = hints[key]
                args = [a for a in typing.get_args(tp) if a is not type(None)]
                return args[0] if args else tp
    return str


def _convert(key: str, text: str):
    tp = _field_type("source" if key == "data" else key)
    if tp is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise SlmError(f"--grid {key}: {text!r} is not true/false")
        return text.lower() in ("true", "1", "yes")
    try:
        return tp(text)
    except ValueError:
        raise SlmError(f"--grid {key}: {text!r} is not a valid {tp.__name__}") from None


def parse_grid(items: list[str]) -> dict[str, list]:
    """["lr=3e-4,6e-4", "batch_size=4,8"] -> {"lr": [0.0003, 0.0006], "batch_size": [4, 8]}."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not values:
            raise SlmError(f"--grid takes KEY=V1,V2,... items, got {item!r}")
        split_flat({key: None})  # refuses unknown keys, naming the known ones
        grid[key] = [_convert(key, v.strip()) for v in values.split(",") if v.strip()]
    if not grid:
        raise SlmError("--grid needs at least one KEY=V1,V2 item")
    return grid


def run_name(i: int, combo: dict) -> str:
    return f"{i:02d}-" + "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in combo.items())


def run_sweep(base: dict, grid: dict[str, list], out: str | Path, quiet: bool = False, report=print) -> dict:
    """Train each combination of `grid` over the layered config `base`; returns the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    rows = []
    for i, combo in enumerate(combos, 1):
        name = run_name(i, combo)
        run_dir = out / name
        run = build_run_config(merge(base, split_flat(combo)))
        row = {"name": name, "params": combo, "run_dir": str(run_dir)}
        done = run_dir / SUMMARY_FILE
        report(f"[{i}/{len(combos)}] {name}")
        try:
            summary = json.loads(done.read_text()) if done.is_file() else train(run, run_dir, quiet=quiet)
            row |= {"status": "done", "final_val_loss": summary["final_val_loss"],
                    "best_val_loss": summary["best_val_loss"], "test_loss": summary["test_loss"],
                    "steps": summary["steps"], "tokens_per_s": summary["tokens_per_s"],
                    "best_checkpoint": summary["best_checkpoint"] or summary["last_checkpoint"]}
        except SlmError as e:
            row |= {"status": "failed", "error": str(e), "final_val_loss": None}
            report(f"  failed: {e}")
        rows.append(row)
    rows.sort(key=lambda r: (r["final_val_loss"] is None or not math.isfinite(r["final_val_loss"]),
                             r["final_val_loss"] or 0.0))
    best = rows[0] if rows and rows[0]["final_val_loss"] is not None else None
    result = {"grid": grid, "runs": rows, "best": best["name"] if best else None,
              "best_checkpoint": best["best_checkpoint"] if best else None}
    write_json(out / RESULTS_FILE, result)
    (out / TABLE_FILE).write_text(format_table(result) + "\n")
    return result


def format_table(result: dict) -> str:
    keys = list(result["grid"])
    head = ["rank", *keys, "val loss", "val ppl", "test loss", "tok/s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, r in enumerate(result["runs"], 1):
        v = r.get("final_val_loss")
        cells = [str(rank), *(f"{r['params'][k]:g}" if isinstance(r["params"][k], float) else str(r["params"][k])
                              for k in keys),
                 f"{v:.4f}" if v is not None else "-", f"{math.exp(min(v, 700)):.2f}" if v is not None else "-",
                 f"{r['test_loss']:.4f}" if r.get("test_loss") is not None else "-",
                 f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    if result["best"]:
        lines.append(f"\nbest: {result['best']} -> {result['best_checkpoint']}")
    return "\n".join(lines)
