#!/usr/bin/env bash
# The GPU side by side: our GPU build's `byol bench train` and `bench infer`, a short `byol
# train` on CIFAR-10, and bench/pytorch_byol.py on CUDA (fp32, AMP fp16, bf16 autocast), on one
# card at batch 512. Made for a machine that has an NVIDIA GPU with its Vulkan driver and
# PyTorch, but no Rust and no network (the device machine of these sessions), so it runs in two
# places:
#
#   bench/gpu.sh --prepare   here: builds byol twice, stripped and xz-compressed: with the
#                            `vulkan` and `wgpu` features (byol: SPIR-V on Vulkan, where
#                            cubecl uses cooperative matrices) and with `wgpu` alone
#                            (byol-wgsl: WGSL shaders, the fallback); gathers the CIFAR-10
#                            archive and the Vulkan loader's Debian packages; all into gpu/
#                            (ignored by git, ~50 MB)
#   bench/gpu.sh             there, in the repository root, with gpu/ carried along: prints a
#                            markdown table and writes to $OUT (or gpu/out) four files: the
#                            table (gpu.md), every JSON line (gpu.jsonl), the commands' logs
#                            (gpu.log) and the short run's metrics (byol-train-metrics.jsonl)
#
# Flags of the second form: [--device vulkan|wgpu] [--batch-size 512] [--width 1]
# [--steps 10] [--torch-device cuda] [--binary PATH] (a byol binary to use instead of gpu/'s).
# Each command has a time limit, and all together a budget (BUDGET, 540 s), so that the run
# ends within a device call's ten minutes.
# A benchmark, not a test: CI does not run it.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=gpu

if [ "${1:-}" = --prepare ]; then
  set -e
  mkdir -p "$dir/debs"
  cargo build --release --features vulkan,wgpu --target-dir target/gpu
  strip -o "$dir/byol" target/gpu/release/byol
  xz -T0 -6 -f "$dir/byol"
  # With the `vulkan` feature compiled in, cubecl compiles SPIR-V for every Vulkan adapter,
  # `--device wgpu` included; only a build without it sends WGSL through the driver's own
  # compiler (lavapipe 22.3 crashes compiling cubecl's SPIR-V, and runs the WGSL build).
  cargo build --release --features wgpu --target-dir target/gpu-wgsl
  strip -o "$dir/byol-wgsl" target/gpu-wgsl/release/byol
  xz -T0 -6 -f "$dir/byol-wgsl"
  cp "${DATA:-../shared/data/cifar10-jpg.tar.gz}" "$dir/cifar10-jpg.tar.gz"
  # The loader (libvulkan.so.1) and the GL dispatch libraries NVIDIA's Vulkan driver loads.
  (cd "$dir/debs" && apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 \
    libgles2)
  du -sh "$dir"
  exit 0
fi

device=vulkan batch=512 width=1 steps=10 torch_device=cuda binary=
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --batch-size) batch=$2; shift 2 ;;
    --width) width=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --torch-device) torch_device=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
out=${OUT:-$dir/out}
mkdir -p "$out"
results=$out/gpu.jsonl log=$out/gpu.log
: >"$results"
: >"$log"

unpack() {
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$1" "$2"
  chmod +x "$2"
}
# The fallback when the SPIR-V path fails: the WGSL build, or the same binary on `--device wgpu`.
fallback=
if [ -z "$binary" ]; then
  [ -f "$dir/byol.xz" ] || { echo "$dir/byol.xz missing: run bench/gpu.sh --prepare first" >&2; exit 2; }
  binary=/tmp/byol-gpu
  unpack "$dir/byol.xz" "$binary"
  if [ -f "$dir/byol-wgsl.xz" ]; then
    fallback=/tmp/byol-gpu-wgsl
    unpack "$dir/byol-wgsl.xz" "$fallback"
  fi
fi
if ! ldconfig -p | grep -q libvulkan.so.1 && compgen -G "$dir/debs/*.deb" >/dev/null; then
  for f in "$dir"/debs/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
# The NVIDIA driver's files where a container mounts them, when the loader finds none.
nvidia=/usr/local/nvidia/share
if [ -z "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ] && [ -f $nvidia/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=$nvidia/vulkan/icd.d/nvidia_icd.json
  export __EGL_VENDOR_LIBRARY_FILENAMES=$nvidia/glvnd/egl_vendor.d/10_nvidia.json
fi
card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)
echo "GPU: ${card:-(nvidia-smi found none)}" | tee -a "$log" >&2

# Every command's limit is cut to what is left of the whole run's budget (a device call may
# run ten minutes; this leaves one for starting and copying).
deadline=$((SECONDS + ${BUDGET:-540}))
limit_of() {
  local left=$((deadline - SECONDS))
  echo $(($1 < left ? $1 : left))
}

# Runs one benchmark under a time limit, keeps its JSON line (labelled) and its log.
run() {
  local label=$1 limit
  limit=$(limit_of "$2")
  shift 2
  if [ "$limit" -lt 10 ]; then
    echo "== $label: skipped, the run's time budget is spent" | tee -a "$log" >&2
    return
  fi
  echo "== $label: $*" | tee -a "$log" >&2
  local line
  line=$(timeout "$limit" "$@" 2>/tmp/gpu-bench-stderr | tail -1)
  cat /tmp/gpu-bench-stderr >>"$log"
  if [ "${line:0:1}" = "{" ]; then
    echo "{\"label\": \"$label\", \"result\": $line}" >>"$results"
    echo "$line" | tee -a "$log" >&2
  else
    echo "   failed or timed out; the end of its log:" >&2
    tail -5 /tmp/gpu-bench-stderr >&2
  fi
}

common=(--width "$width" --batch-size "$batch" --steps "$steps" --warmup 3)
torch=(python3 bench/pytorch_byol.py --device "$torch_device" --width "$width" --batch-size "$batch"
  --steps "$steps" --warmup 3)
run torch-train-f32 60 "${torch[@]}"
run torch-train-amp 60 "${torch[@]}" --amp
run byol-train-f32 120 "$binary" bench train --device "$device" "${common[@]}"
if ! grep -q '"byol-train-f32"' "$results" && [ "$device" = vulkan ]; then
  # The SPIR-V path failed: wgpu with WGSL shaders (the build without `vulkan`, see --prepare).
  device=wgpu
  binary=${fallback:-$binary}
  run byol-train-f32 120 "$binary" bench train --device "$device" "${common[@]}"
fi
# f16 with a dynamic loss scale: where the GPU's tensor cores come in (wgpu has no bf16).
run byol-train-f16 120 "$binary" bench train --device "$device" "${common[@]}" --precision f16
run torch-train-bf16 45 "${torch[@]}" --bf16 --channels-last
run byol-infer-f32 40 "$binary" bench infer --device "$device" "${common[@]}"
run byol-infer-f16 40 "$binary" bench infer --device "$device" "${common[@]}" --precision f16
run torch-infer-f32 30 "${torch[@]}" --infer
run torch-infer-amp 30 "${torch[@]}" --infer --amp

# A short training run on real images: img/s per epoch as `byol train` prints it, and the loss.
train_limit=$(limit_of 150)
if [ -f "$dir/cifar10-jpg.tar.gz" ] && [ "$train_limit" -ge 30 ]; then
  rm -rf /tmp/byol-gpu-run
  echo "== byol train" | tee -a "$log" >&2
  timeout "$train_limit" "$binary" train --device "$device" --data "$dir/cifar10-jpg.tar.gz" \
    --width "$width" --batch-size "$batch" --train-limit $((batch * 20)) --epochs 2 \
    --knn-every 2 --out /tmp/byol-gpu-run 2>&1 | tee -a "$log" | tail -4 >&2
  if [ -f /tmp/byol-gpu-run/metrics.jsonl ]; then
    cp /tmp/byol-gpu-run/metrics.jsonl "$out/byol-train-metrics.jsonl"
  fi
fi

python3 - "$results" "$width" "$batch" "$card" <<'PY' | tee "$out/gpu.md"
import json, sys
path, width, batch, card = sys.argv[1:]
print(f"GPU: {card or '(nvidia-smi found none)'}\n")
rows = {}
for line in open(path):
    row = json.loads(line)
    rows[row["label"]] = row["result"]
def rate(label):
    return rows[label]["images_per_sec"] if label in rows else None
print(f"| {'stack':40} | train img/s (width {width}, batch {batch}) | vs PyTorch fp32 | vs PyTorch AMP | peak GPU MiB |")
print("|---|---|---|---|---|")
for label, name in [
    ("torch-train-f32", "PyTorch eager fp32"),
    ("torch-train-amp", "PyTorch eager AMP (fp16 + grad scaler)"),
    ("torch-train-bf16", "PyTorch bf16 autocast + channels_last"),
    ("byol-train-f32", "byol (burn wgpu/vulkan) f32"),
    ("byol-train-f16", "byol (burn wgpu/vulkan) f16, loss scaled"),
]:
    r = rate(label)
    if r is None:
        print(f"| {name} | (no result) | | | |")
        continue
    ratio = lambda ref: f"{r / rate(ref):.2f}" if rate(ref) else "-"
    memory = rows[label].get("peak_device_mib")
    print(f"| {name} | {r:.1f} | {ratio('torch-train-f32')} | {ratio('torch-train-amp')} | {memory and round(memory) or '-'} |")
print()
print(f"| inference (eval forward) | img/s, batch {batch} |")
print("|---|---|")
for label, name in [("torch-infer-f32", "PyTorch fp32"), ("torch-infer-amp", "PyTorch AMP fp16"),
                    ("byol-infer-f32", "byol f32"), ("byol-infer-f16", "byol f16")]:
    r = rate(label)
    print(f"| {name} | {'(no result)' if r is None else f'{r:.1f}'} |")
PY
