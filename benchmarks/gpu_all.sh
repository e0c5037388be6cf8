#!/usr/bin/env bash
# Everything the GPU checks and benchmarks need, in one device call (device time is scarce).
#
#   bash benchmarks/gpu_all.sh OUTDIR [parts]
#
# parts (default all, comma-separated): tests, gemv, attn, router, generate, train, memory, packed;
# not by default: l2 (gpu_l2.py), pdl (gpu_pdl.py), persistent (gpu_persistent.py), gap (gpu_step_gap.py --trace), sweep (gpu_gemv_sweep.py, options in SWEEP_ARGS), ab (gpu_ab.py over AB_SWITCHES, default "fold_norms decode_attn").
# Each part has its own time limit, so one that hangs cannot starve the rest; logs and JSON results
# land in OUTDIR. Run from the project root with mamba-ssm importable (see BENCHMARKS.md's set-up).
#
# A fresh GPU machine spends minutes compiling Triton kernels (ours and mamba-ssm's, per shape and
# autotune config): a cold test_kernels_cuda.py alone took 225 s. Triton's cache therefore travels
# as xz-compressed parts of at most 15 MiB (the device returns files of at most 16 MiB, and the
# unpacked cache is too large to carry): the run unpacks ./.triton-cache-pack/* (git-ignored; carry
# it) into ./.triton-cache and leaves the updated cache's parts in OUTDIR. For the next call:
#   rm -rf .triton-cache-pack && mkdir .triton-cache-pack && cp FILES_AT/triton-cache.txz.* .triton-cache-pack/
# At the end every log and JSON file goes into OUTDIR/results.tgz (the device returns at most 8
# files); summary.txt stays beside it. GPU_TESTS selects test paths for the tests part (default
# tests/gpu), e.g. to split it across calls, TESTS_LIMIT its time limit (default 360 s); SAVE_CACHE=0
# skips returning the cache. Use a fresh OUTDIR per run.
set -uo pipefail
out=${1:?usage: gpu_all.sh OUTDIR [parts]}
parts=${2:-tests,gemv,attn,router,generate,train,memory,packed}
mkdir -p "$out"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
if compgen -G ".triton-cache-pack/triton-cache.txz.*" > /dev/null; then
  cat .triton-cache-pack/triton-cache.txz.* | xz -d | tar xf - -C "$TRITON_CACHE_DIR" && echo "triton cache unpacked"
fi
finish() {  # bundle the results; return the cache unless SAVE_CACHE=0
  local files
  files=$(cd "$out" && ls | grep -v -e '^summary.txt$' -e '^results.tgz$' -e '^triton-cache.txz')
  [ -n "$files" ] && (cd "$out" && tar czf results.tgz --remove-files $files)
  [ "${SAVE_CACHE:-1}" = 1 ] || return 0
  tar cf - -C "$TRITON_CACHE_DIR" . | xz -T0 -6 | split -b 15m -d - "$out/triton-cache.txz."
  if [ "$(ls "$out"/triton-cache.txz.* | wc -l)" -gt 4 ]; then
    rm -f "$out"/triton-cache.txz.*; echo "triton cache too large to return" | tee -a "$out/summary.txt"
  fi
}
trap finish EXIT
has() { [[ ",$parts," == *",$1,"* ]]; }
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s (limit $limit)" | tee -a "$out/summary.txt"
  tail -4 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee -a "$out/summary.txt"
# Per-test durations, and a stack dump of any test still running after 150 s. The tests get a copy of
# the Triton cache: a test that autotunes a kernel at the model's shapes (timed alone, on the test's
# inputs) would otherwise leave its pick on disk for the benchmarks after it (in the ninth session
# one such pick made the expert GEMVs 20% slower inside the model).
if has tests; then
  rm -rf "$TRITON_CACHE_DIR-tests" && cp -a "$TRITON_CACHE_DIR" "$TRITON_CACHE_DIR-tests"
  step tests "${TESTS_LIMIT:-360}" env TRITON_CACHE_DIR="$TRITON_CACHE_DIR-tests" python3 -m pytest ${GPU_TESTS:-tests/gpu} \
    -q -p no:cacheprovider --durations=15 -o faulthandler_timeout=150
fi
has gemv && step gemv 150 env TRITON_PRINT_AUTOTUNING=1 python3 benchmarks/gpu_gemv.py --out "$out/gemv.json"
has attn && step attn 90 python3 benchmarks/gpu_attention.py
has router && step router 60 python3 benchmarks/gpu_router_precision.py --out "$out/router.json"
# TRITON_PRINT_AUTOTUNING: the expert-GEMV configs the autotuner picks, per shape (to prune the list).
has generate && step generate 240 env TRITON_PRINT_AUTOTUNING=1 python3 benchmarks/gpu_generate.py --profile ${GENERATE_ARGS:-} --out "$out/generate.json"
# The autotuner's picks of that run, with their shape keys, into the summary: a pick that differs
# between runs moved batch 1 by 5% in the tenth session (BENCHMARKS.md).
has generate && grep -B3 "best config selected" "$out/generate.log" | grep -E "^Triton autotuning|with key|best config" \
  | sed -e 's/^Triton autotuning for function /autotuned /' | tee -a "$out/summary.txt" > /dev/null
has sweep && step sweep 420 python3 benchmarks/gpu_gemv_sweep.py ${SWEEP_ARGS:-} --out "$out/sweep.json"
has l2 && step l2 120 python3 benchmarks/gpu_l2.py --out "$out/l2.json"
has pdl && step pdl 150 python3 benchmarks/gpu_pdl.py --out "$out/pdl.json"
has persistent && step persistent 150 python3 benchmarks/gpu_persistent.py --out "$out/persistent.json"
has gap && step gap 300 python3 benchmarks/gpu_step_gap.py --trace --out "$out/gap.json"
has ab && step ab 240 python3 benchmarks/gpu_ab.py $(printf -- '--switch %s ' ${AB_SWITCHES:-fold_norms decode_attn}) --out "$out/ab.json"
has train && step train 300 python3 benchmarks/gpu_train.py --parts step --compile --profile --out "$out/train.json"
has memory && step memory 200 python3 benchmarks/gpu_train.py --parts memory --out "$out/memory.json"
has packed && step packed 200 python3 benchmarks/gpu_train.py --parts packed --skip-hf --out "$out/packed.json"
exit 0
