#!/usr/bin/env bash
# The GPU check: the bundle's training on the embedded phantom and the derivative benchmark, on CUDA.
#
# Usage (repository root, monai_cidir importable, a CUDA device visible):
#     bash benchmarks/cuda_check.sh OUTDIR [STEPS]
# STEPS: any of "derivatives default paper" (all three when omitted), e.g. "paper" alone.
#
# Writes into OUTDIR: gpu.txt (nvidia-smi and torch's view of the device), derivatives_10k.md and
# derivatives_100k.md (benchmarks/derivatives.py --device cuda), bundle_default.log and
# bundle_paper.log (the quick-start command, timed, on CUDA: the default 300 x 2000 run, then a
# paper-length 2500 x 10000 run), and the metrics.csv of both runs. The bundle picks CUDA itself
# (train.json's "device" is cuda when torch sees one). Each run's alpha_curve.csv (with the per-alpha
# landmark TRE) is copied as alpha_curve_NAME_PATIENT.csv.
set -uo pipefail
out=${1:?usage: bash benchmarks/cuda_check.sh OUTDIR [STEPS]}
steps=" ${2:-derivatives default paper} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nproc; } > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

for n in 10000 100000; do
  [[ $steps == *" derivatives "* ]] || break
  python3 benchmarks/derivatives.py --device cuda --points $n --repeats 10 --warmup 2 --threads "$(nproc)" \
    --markdown "$out/derivatives_$((n / 1000))k.md" || status=1
done

run_bundle() {  # name, extra overrides...
  local name=$1; shift
  local dir
  dir=$(mktemp -d)
  local t0=$SECONDS
  python3 -m monai.bundle run training --config_file bundles/cidir_lung_ct/configs/train.json \
    --output_dir "$dir" "$@" > "$out/bundle_$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  echo "bundle $name: $((SECONDS - t0)) s wall, exit $rc" | tee -a "$out/bundle_$name.log"
  grep -E "^(patient|phantom|mean)" "$out/bundle_$name.log"
  grep -hoE '"(training_device|seconds_[a-z_]+|iterations)": [^,}]*' "$dir"/*/metrics.json
  cp "$dir/metrics.csv" "$out/metrics_$name.csv" 2>/dev/null
  for curve in "$dir"/*/alpha_curve.csv; do
    [ -f "$curve" ] && cp "$curve" "$out/alpha_curve_${name}_$(basename "$(dirname "$curve")").csv"
  done
}
[[ $steps != *" default "* ]] || run_bundle default
[[ $steps != *" paper "* ]] || run_bundle paper --max_iterations 2500 --num_points 10000 --iterations_per_epoch 250
exit $status
