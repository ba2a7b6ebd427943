"""Recipes: what a stage's command does, as a short file composing the components below it.

    pretrain.py   slm's GPT on a token stream (`slm train`), on the engine's run lifecycle
    finetune.py   LoRA or full fine-tuning on examples (`slm finetune`), the same lifecycle
    config.py     their typed settings and config files
    sweep.py      a grid of pretraining runs ranked by validation loss (`slm sweep`)
    quantize.py   open a model, calibrate, quantize, write the artifact (`slm quantize`)
    evaluate.py   loss and perplexity of any model on a data split (`slm eval`)
    bench.py      models side by side in fresh processes (`slm bench`)
"""
