"""Fine-tuning: teach a pretrained model a skill (text-to-SQL) with LoRA, and measure it in SQLite.

One module per stage:
- data.py       read JSONL / parquet / `hf:` datasets, detect the layout, normalize to `Example`s,
                carve off a deterministic held-out split;
- prompting.py  schema + question -> chat messages (system prompt, compact schema);
- encode.py     messages + completion -> token ids with labels masked to -100 on the prompt;
- lora.py       LoRA through peft for Hugging Face models and slm's GPT; merging;
- artifact.py   the fine-tune output directory, loadable anywhere slm takes `--model`;
- loop.py       the fine-tune's model, batches and loss plugged into slm's training loop;
- synthetic.py  an offline generator of verified text-to-SQL examples;
- sqlexec.py    SQLite execution with limits, and seeded databases for schema-only contexts;
- sqleval.py    `slm eval-sql`: generate, extract, execute, compare.
"""
