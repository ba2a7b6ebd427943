#!/usr/bin/env bash
# The demo on the embedded defaults: plan, then train the `tiny` GPT on wiki-vital for a few minutes
# on this CPU, watch validation perplexity fall, plot the loss curves, and sample from the result.
# DEMO_MINUTES (default 4) sets the training budget, DEMO_OUT (default demo-out) the output folder.
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
