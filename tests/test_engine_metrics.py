"""What a run reports: TensorBoard scalars beside metrics.jsonl, MFU that cannot pass 100%, the
loss plot's smoothing, and the batch-source protocol the trainer relies on."""

import struct

import pytest
import torch

from slm.engine.config import TrainConfig
from slm.engine.metrics import Speedometer, read_metrics
from slm.engine.plot import ema
from slm.engine.trainer import Trainer, TrainTask

from trainutil import one_thread, small_task  # noqa: F401 (fixture)


def _cfg(**kw):
    base = dict(max_steps=6, dtype="fp32", eval_every=3, eval_batches=1, ckpt_minutes=None, lr=3e-3,
                warmup_steps=2)
    return TrainConfig(**(base | kw))


def read_scalars(run_dir) -> dict[str, dict[int, float]]:
    """Every scalar of a run's TensorBoard event files: {tag: {step: value}} (TFRecord framing:
    length, its CRC, the serialized Event, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    files = sorted(run_dir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {run_dir}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboardX")
    run = tmp_path / "run"
    Trainer(small_task(), _cfg(tensorboard=True), run).fit()
    records = read_metrics(run / "metrics.jsonl")
    scalars = read_scalars(run)
    train = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert scalars["train/loss"] == pytest.approx(train) and len(train) == 6
    assert scalars["val/loss"] == pytest.approx(val) and set(val) == {3, 6}
    assert set(scalars["train/lr"]) == set(train) and "test/loss" in scalars
    assert "train/step" not in scalars and "train/tokens" not in scalars and "train/step_seconds" in scalars


def test_no_tensorboard_files_without_the_flag(tmp_path):
    Trainer(small_task(), _cfg(max_steps=2), tmp_path / "run").fit()
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_mfu_never_passes_100_percent():
    probes = []

    def reprobe():
        probes.append(1)
        return 1.5e9

    speed = Speedometer(flops_per_token=1e6, peak_flops=1e9, reprobe=reprobe)  # a peak measured under load
    speed.add(1.0, 2000, 0.0)  # 2e9 FLOP/s reached: more than the "peak"
    assert speed.mfu() == pytest.approx(1.0) and speed.peak_flops == pytest.approx(2e9)
    assert len(probes) == 1  # measured again once, then raised to what training reached
    speed.add(1.0, 1000, 0.0)
    assert speed.mfu() < 1.0
    assert Speedometer(1e6, 4e9).mfu(2000) == pytest.approx(0.5)  # below the peak: unchanged


def test_ema_is_debiased():
    assert ema([5.0] * 10) == pytest.approx([5.0] * 10)
    losses = [10.0] + [3.0] * 25  # a high first loss, then flat
    smoothed = ema(losses)
    assert smoothed[0] == pytest.approx(10.0)
    # seeded with the first value, an EMA(0.1) sits 7 * 0.9**25 = 0.50 above 3 at step 26; debiased, 0.05
    assert smoothed[-1] == pytest.approx(3 + 0.7 * 0.9**25 / (1 - 0.9**26)) and smoothed[-1] < 3.06


def test_a_batch_source_must_declare_what_the_trainer_uses():
    class Bare:  # iterable and resumable, but no close/pass_index/skipped
        def __iter__(self):
            while True:
                yield torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    task = small_task()
    bare = TrainTask(module=task.module, batches=Bare(), save_model=task.save_model, load_model=task.load_model)
    with pytest.raises(TypeError, match="close, pass_index, skipped"):
        Trainer(bare, _cfg())
