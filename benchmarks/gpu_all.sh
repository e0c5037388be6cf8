#!/usr/bin/env bash
# Everything the GPU checks and benchmarks need, in one device call (device time is scarce).
#
#   bash benchmarks/gpu_all.sh OUTDIR [parts]
#
# parts (default all, comma-separated): tests, gemv, attn, generate, train, memory, packed.
# Each part has its own time limit, so one that hangs cannot starve the rest; logs and JSON results
# land in OUTDIR. Run from the project root with mamba-ssm importable (see BENCHMARKS.md's set-up).
set -uo pipefail
out=${1:?usage: gpu_all.sh OUTDIR [parts]}
parts=${2:-tests,gemv,attn,generate,train,memory,packed}
mkdir -p "$out"
has() { [[ ",$parts," == *",$1,"* ]]; }
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s (limit $limit)" | tee -a "$out/summary.txt"
  tail -4 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$out/summary.txt"
# Per-test durations, and a stack dump of any test still running after 150 s.
has tests && step tests 360 python3 -m pytest tests/gpu -q -p no:cacheprovider --durations=15 -o faulthandler_timeout=150
has gemv && step gemv 120 python3 benchmarks/gpu_gemv.py
has attn && step attn 90 python3 benchmarks/gpu_attention.py
# TRITON_PRINT_AUTOTUNING: the expert-GEMV configs the autotuner picks, per shape (to prune the list).
has generate && step generate 240 env TRITON_PRINT_AUTOTUNING=1 python3 benchmarks/gpu_generate.py --profile --out "$out/generate.json"
has train && step train 300 python3 benchmarks/gpu_train.py --parts step --compile --profile --out "$out/train.json"
has memory && step memory 200 python3 benchmarks/gpu_train.py --parts memory --out "$out/memory.json"
has packed && step packed 200 python3 benchmarks/gpu_train.py --parts packed --skip-hf --out "$out/packed.json"
exit 0
