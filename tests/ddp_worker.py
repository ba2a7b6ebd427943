"""Run by test_train_distributed.py, alone or under torchrun: a few training steps on a fixed
global batch, each rank taking its slice, so 1 process and N processes see the same data."""

import faulthandler
import json
import sys
import weakref

import torch

from slm.engine import distributed as D
from slm.engine.config import TrainConfig
from slm.engine.trainer import Trainer
from slm.engine.gpt import RandomBatches, gpt_task

from trainutil import small_config

GLOBAL_BATCH = 4


class RankSlice(RandomBatches):
    def __init__(self, cfg, rank, world):
        super().__init__(cfg, GLOBAL_BATCH, seed=5)
        self.rank, self.world = rank, world

    def __iter__(self):
        n = GLOBAL_BATCH // self.world
        for x, y in super().__iter__():
            yield x[self.rank * n:(self.rank + 1) * n], y[self.rank * n:(self.rank + 1) * n]


def main(out: str, mode: str, steps: int) -> None:
    faulthandler.dump_traceback_later(240, exit=True)  # a hang prints every thread's stack before the test's timeout
    torch.set_num_threads(1)
    info = D.setup("cpu")
    torch.manual_seed(0)
    cfg = small_config()
    task = gpt_task(cfg, RankSlice(cfg, info.rank, info.world_size),
                    eval_batches=lambda split: RankSlice(cfg, info.rank, info.world_size))
    tc = TrainConfig(max_steps=steps, dtype="fp32", lr=1e-2, warmup_steps=1, eval_every=0, eval_batches=2,
                     ckpt_minutes=None, fsdp=mode == "fsdp", batch_size=GLOBAL_BATCH // info.world_size)
    trainer = Trainer(task, tc, out, info)
    wrapper = weakref.ref(trainer.module)
    if "--resume" in sys.argv:
        trainer.resume()
    summary = trainer.fit()
    # DDP's Reducer must be gone before teardown, or the process may hang at exit (Trainer.fit says why)
    assert mode != "ddp" or wrapper() is None, "the DDP wrapper outlived fit()"
    if info.is_main:
        print(json.dumps(summary))
    D.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
