#!/bin/bash
# gpt2 preset, bf16, compiled, on one GPU at micro-batches 16/32/64 (65,536 tokens per step).
# Run from the repository root with slm importable (e.g. .venv/bin/python, or PYTHONPATH=. where the GPU
# machine already has torch). Writes OUT (default bench/results/gpu-run)/gpu.tgz with each run's summary and metrics.
export PYTHONUNBUFFERED=1
PY=${PY:-python3}; FINAL=${OUT:-bench/results/gpu-run}; OUT=$(mktemp -d); mkdir -p $OUT $FINAL; STEPS=${STEPS:-40}
for B in ${BS:-32 64}; do
  GA=$((64 / B)); name=gpt2_b$B
  $PY -m slm plan --preset ${PRESET:-gpt2} --device ${DEV:-cuda} --batch-size $B --block-size 1024 --grad-accum $GA --dtype bf16 2>&1 | grep -E "total|fits"
  timeout 200 $PY -m slm train --data wiki-vital --preset ${PRESET:-gpt2} --dtype bf16 --compile --block-size 1024 \
    --batch-size $B --grad-accum $GA --max-steps $STEPS --eval-every 0 --eval-batches 1 --ckpt-every 100000 \
    --val-percent 5 --test-percent 5 --out $OUT/run_$name --json > $OUT/$name.json 2> $OUT/$name.err
  echo "== $name rc=$?"; tail -c 600 $OUT/$name.err; echo
  cp $OUT/run_$name/metrics.jsonl $OUT/${name}_metrics.jsonl 2>/dev/null
  $PY - $OUT $name <<'PY'
import json, sys, statistics
out, name = sys.argv[1:]
steps = [r for r in map(json.loads, open(f"{out}/{name}_metrics.jsonl")) if "step_seconds" in r]
summ = json.load(open(f"{out}/{name}.json"))
secs = statistics.median(r["step_seconds"] for r in steps[len(steps) // 3:])
tok = summ["tokens"] / summ["steps"] / secs
print(f"{name}: steady {tok:,.0f} tok/s, MFU {summ['mfu'] * tok / summ['tokens_per_s']:.1%}, first step "
      f"{steps[0]['step_seconds']:.1f} s, peak {summ['peak_memory_bytes'] / 2**30:.2f} GiB, planned "
      f"{summ['planned_memory_bytes'] / 2**30:.2f} GiB, val {summ['final_val_loss']}, ckpt {summ['checkpoint_seconds']} s")
PY
done
tar czf $FINAL/gpu.tgz -C $OUT .
