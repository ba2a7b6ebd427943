"""Training: the loop and everything around it, reusable by any recipe.

    config.py       TrainConfig (the loop's knobs), config files, a run's resolved config
    optim.py        AdamW with decay/no-decay groups, warmup + cosine schedule
    losses.py       the LM head and cross-entropy fused and chunked; CausalLMLoss(GPT)
    loop.py         TrainTask (what a recipe plugs in) and Trainer (the loop), evaluate_loss
    checkpoints.py  atomic, verified checkpoints; retention; finding the newest complete one
    guards.py       non-finite steps and loss spikes
    metrics.py      metrics.jsonl, the progress line, tokens/s and MFU
    distributed.py  torchrun: DDP (gloo/NCCL) and FSDP
    hardware.py     GPU datasheets, measured CPU peaks, available memory
    plan.py         memory/time/cost estimate (`slm plan`), the fit check before training
    pretrain.py     the GPT pretraining recipe (`slm train`)
    evaluation.py   `slm eval`
    sweep.py        `slm sweep`
    plot.py         `slm plot`
"""
