#!/usr/bin/env bash
# Runs `byol bench train` and bench/pytorch_byol.py alternately on the same model and batch,
# and prints each side's img/s and the ratio. A benchmark, not a test: CI does not run it.
#   bench/compare.sh [--width 0.25] [--batch-size 128] [--rounds 3] [--steps 5] [--precision bf16]
#                    [--infer]
# --precision bf16 runs ours in bf16 against PyTorch's bf16 autocast with channels_last;
# --infer the backbone's eval-mode forward (`byol bench infer`) instead of the training step.
# PYTHON=/path/to/venv/bin/python picks the interpreter that has torch.
set -euo pipefail
cd "$(dirname "$0")/.."
width=1.0 batch=128 rounds=3 steps=5 precision=f32 kind=train
while [ $# -gt 0 ]; do
  case "$1" in
    --width) width=$2; shift 2 ;;
    --batch-size) batch=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --precision) precision=$2; shift 2 ;;
    --infer) kind=infer; shift ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
case "$precision" in
  f32) torch_flags=() torch_name="PyTorch eager fp32" ;;
  bf16) torch_flags=(--bf16 --channels-last) torch_name="PyTorch bf16 autocast + channels_last" ;;
  *) echo "--precision: f32 or bf16, not $precision" >&2; exit 2 ;;
esac
cargo build --release --quiet
byol=target/release/byol
ours=() theirs=()
for _ in $(seq "$rounds"); do
  ours+=("$($byol bench "$kind" --width "$width" --batch-size "$batch" --steps "$steps" --precision "$precision" 2>/dev/null | tail -1)")
  theirs+=("$("${PYTHON:-python3}" bench/pytorch_byol.py --width "$width" --batch-size "$batch" --steps "$steps" ${torch_flags[@]+"${torch_flags[@]}"} $([ "$kind" = infer ] && echo --infer) | tail -1)")
done
python3 - "$width" "$batch" "$precision" "$torch_name" "$kind" "${ours[@]}" --- "${theirs[@]}" <<'PY'
import json, statistics, sys
width, batch, precision, torch_name, kind, rest = *sys.argv[1:6], sys.argv[6:]
cut = rest.index("---")
ours = [json.loads(x) for x in rest[:cut]]
theirs = [json.loads(x) for x in rest[cut + 1:]]
o = statistics.median(r["images_per_sec"] for r in ours)
t = statistics.median(r["images_per_sec"] for r in theirs)
print(f"| stack | {kind} img/s (width {width}, batch {batch}) | ratio to PyTorch | peak RSS MiB |")
print("|---|---|---|---|")
print(f"| {torch_name} | {t:.1f} | 1.00 | {max(r['peak_rss_mib'] for r in theirs):.0f} |")
# Where our precision ran otherwise (bf16 without AMX: f32 convolutions), the bench says why.
note = " (convolutions in f32: no AMX)" if any("notice" in r for r in ours) else ""
print(f"| byol (burn flex) {precision}{note} | {o:.1f} | {o / t:.2f} | {max(r['peak_rss_mib'] for r in ours):.0f} |")
PY
