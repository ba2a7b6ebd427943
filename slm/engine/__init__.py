"""The training engine: everything a recipe trains with, knowing no recipe.

    trainer.py      TrainTask and BatchSource (what a recipe plugs in), Trainer (the loop)
    run.py          a run's lifecycle in its directory: lock, "run exists / --resume", resolved
                    config, summary, teardown
    config.py       TrainConfig (the loop's knobs)
    optim.py        AdamW with decay/no-decay groups, warmup + cosine schedule
    losses.py       the LM head and cross-entropy fused and chunked; CausalLMLoss(GPT)
    evaluation.py   held-out loss over finite batches, all ranks together
    checkpoints.py  atomic, verified checkpoints; retention; finding the newest complete one
    guards.py       non-finite steps and loss spikes
    metrics.py      metrics sinks (metrics.jsonl, TensorBoard), the progress line, MFU, the summary
    distributed.py  torchrun: DDP (gloo/NCCL) and FSDP
    hardware.py     GPU datasheets, measured CPU peaks, memory
    plan.py         memory/time/cost estimate (`slm plan`), the fit check before training
    gpt.py          slm's GPT as a TrainTask, random batches to measure it with
    plot.py         loss curves of a run (`slm plot`)
"""
