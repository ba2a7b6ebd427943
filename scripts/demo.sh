#!/usr/bin/env bash
# The demo on the embedded defaults, offline: plan, then train the `tiny` GPT on wiki-vital for a few
# minutes on this CPU, watch validation perplexity fall, plot the loss curves, sample from the result,
# quantize it to int8 and measure what that gained and lost; then teach SmolLM2-135M-Instruct
# text-to-SQL with LoRA on generated, verified examples and score it in SQLite before and after.
# DEMO_MINUTES (default 4) sets the training budget, DEMO_OUT (default demo-out) the output folder,
# DEMO_FINETUNE=0 skips the fine-tuning part (about 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
SLM=.venv/bin/slm
PY=.venv/bin/python
OUT=${DEMO_OUT:-demo-out}
MINUTES=${DEMO_MINUTES:-4}
RUN="$OUT/tiny-wiki-vital"
mkdir -p "$OUT"

echo "=== the model and the data"
$SLM info --preset tiny
$SLM data inspect wiki-vital --max-docs 2000 | head -8

echo "=== the plan: memory, speed and time for this configuration on this CPU"
$SLM plan --preset tiny --batch-size 8 --tokens 1e6

echo "=== training for $MINUTES minutes (progress on stderr; Ctrl-C saves and stops)"
rm -rf "$RUN"  # a fresh run each time (slm train refuses to overwrite a run without --resume)
$SLM train --data wiki-vital --preset tiny --batch-size 8 --lr 1e-3 --warmup-steps 20 \
  --max-minutes "$MINUTES" --eval-every 25 --eval-batches 8 --ckpt-minutes 2 --out "$RUN"

echo "=== validation perplexity over the run (from $RUN/metrics.jsonl)"
$PY - "$RUN/metrics.jsonl" <<'EOF'
import json, math, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "val_loss" in r:
        print(f"  step {r['step']:>5}  tokens {r['tokens']:>9,}  val loss {r['val_loss']:.3f}  perplexity {r['val_perplexity']:,.1f}")
EOF

$SLM plot "$RUN" --out "$OUT/loss.png"

echo "=== a sample from the trained model (best checkpoint of the run)"
$SLM generate --model "$RUN" --prompt "The history of" --max-new-tokens 60 --temperature 0.8 --top-k 40 --seed 0

echo "=== int8: what quantization gains (size, memory, speed) and loses (perplexity)"
rm -rf "$OUT/tiny-int8"
$SLM quantize --model "$RUN" --out "$OUT/tiny-int8" --method dynamic-int8
$SLM bench --model "$RUN" --model "$OUT/tiny-int8" --data wiki-vital

[ "${DEMO_FINETUNE:-1}" = 0 ] && exit 0
echo "=== fine-tuning: SmolLM2-135M-Instruct learns text-to-SQL (LoRA), scored by running its SQL in SQLite"
$SLM sql-data --out "$OUT/sql-train.jsonl" --n 600 --seed 0
$SLM sql-data --out "$OUT/sql-test.jsonl" --n 24 --seed 1   # other rows, values and questions
$SLM eval-sql --model smollm2-135m-instruct --data "$OUT/sql-test.jsonl" --limit 24 --show 2
rm -rf "$OUT/sql-lora"
$SLM finetune --base smollm2-135m-instruct --data "$OUT/sql-train.jsonl" --out "$OUT/sql-lora" \
  --max-steps 40 --max-seq-len 512 --eval-every 20
$SLM eval-sql --model "$OUT/sql-lora" --data "$OUT/sql-test.jsonl" --limit 24 --show 2
