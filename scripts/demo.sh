#!/usr/bin/env bash
# The demo on the embedded defaults: initialize a tiny model and generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
SLM=.venv/bin/slm
OUT=${DEMO_OUT:-demo-out}
mkdir -p "$OUT"
$SLM info --preset tiny
$SLM init --preset tiny --out "$OUT/tiny" --seed 0
echo "--- a sample from the untrained model (gibberish until it is trained):"
$SLM generate --model "$OUT/tiny" --prompt "The history of" --max-new-tokens 40 --seed 0
