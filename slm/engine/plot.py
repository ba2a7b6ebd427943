"""`slm plot RUN_DIR`: the loss curves of a run (train and validation vs tokens) as a PNG."""

from __future__ import annotations

from pathlib import Path

from slm.errors import SlmError
from slm.engine.metrics import METRICS_FILE, read_metrics


def ema(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average, debiased as Adam's moments are: started at zero and divided by
    1 - (1 - alpha)^t, each point is a weighted mean of the values seen so far. (Seeded with the
    first value instead, it would give that value, the highest loss of a run, all the weight the
    later ones do not have yet, and lag far above the curve early on.)"""
    out, acc = [], 0.0
    for t, v in enumerate(values, 1):
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc / (1 - (1 - alpha) ** t))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise SlmError(f"{run_dir} has no {METRICS_FILE}; is it a training run directory?")
    records = read_metrics(path)
    train = [(r["tokens"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        raise SlmError(f"{path} holds no losses yet")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train:
        x, y = zip(*train)
        ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(x, ema(list(y)), color="tab:blue", label="train (EMA 0.1, debiased)")
    if val:
        x, y = zip(*val)
        ax.plot(x, y, "o-", color="tab:orange", label="validation")
    test = [r for r in records if r.get("test_loss") is not None]
    if test:
        ax.plot([test[-1]["tokens"]], [test[-1]["test_loss"]], "s", color="tab:green", label="test")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"{run_dir.resolve().name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out else run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
