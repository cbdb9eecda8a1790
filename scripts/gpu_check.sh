#!/usr/bin/env bash
# The prepared device check for the benchmark issue's GPU half: one call on a GPU machine, 7 minutes at most
# (the steps' limits add up to 405 s; run it with timeout_s=480, which leaves a 15-minute budget room for a rerun).
#
#   here:   make device-wheels          # hydra-core, omegaconf, antlr4 as wheels in .whl/ (the GPU image lacks them)
#   device: bash scripts/gpu_check.sh   # with carry [".whl"]; python3 there holds a CUDA build of torch
#
# 1. the engine's invariants on the GPU (tests/decode/test_gpu.py: greedy EAGLE-2 = greedy AR, sampled VVS
#    with CUDA generators, compiled layers = eager tokens, the waits per step);
# 2. the cost model at LlamaGen-XL dimensions (random weights, bf16, batch 1), eager, combined with the v2
#    world's acceptance: predicted speed-ups, and the AR baseline's tokens/s next to a plain eager loop's;
# 3. XL again with a compiled graph per block (compile=layer): the baseline speed-ups must be taken against;
# 4. where the decode loop synchronizes with the GPU, per step and method: the CUDA sync debug mode's count
#    and the lines that waited, next to the CPU model's (scripts/host_syncs.py --cuda-debug);
# 5. one drafter round op by op (scripts/profile_round.py): host time, kernel launches, GPU time.
# Each step has its own time limit, so a slow one does not cost the others. The first run (2026-11-28, H200,
# docs/results/gpu_h200) took 89, 87, 119, 28 s for steps 1-4 (before the cuDNN fix, which cut step 2-3's
# drafter timings); the world's cost model (84 s) and compiling XL's whole stack (over 60 s) were dropped.
# Results in $OUT (the device tool's folder) or outputs/gpu_check, 7 files: log.txt (every step's output),
# xl_eager and xl_compiled (.md tables, .json timings that feed `scripts/cost_model.py times_from=...` on
# any machine), host_syncs.md, profile_round.txt.
# A dry run of the plumbing on a CPU: PY=.venv/bin/python DEVICE=cpu SIZE=tiny DTYPE=float32 bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-outputs/gpu_check}
DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-XL} DTYPE=${DTYPE:-bfloat16} PY=${PY:-python3}
WORK=${WORK:-/tmp/gpu_check}  # scratch; 8 files go to $OUT (the device tool returns 8 at most)
mkdir -p "$OUT" "$WORK"
LOG=$OUT/log.txt
: >"$LOG"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HYDRA_FULL_ERROR=1  # full tracebacks: a device call is too dear to rerun for one
ACCEPT=docs/results/world_v2_cpu_r2/results.json
step() {  # step NAME SECONDS COMMAND...: run with a limit, append its output to the log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$LOG"
}
keep() {  # keep NAME SIZE: the cost model's table and timings from the scratch folder into $OUT
  cp "$WORK/$1/cost_model_$2.md" "$OUT/$1.md" 2>/dev/null; cp "$WORK/$1/cost_model_$2.json" "$OUT/$1.json" 2>/dev/null
}
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available()
else 'no CUDA device')" 2>&1 | tee -a "$LOG"
step tests 90 $PY -m pytest -q -m gpu tests/decode/test_gpu.py -p no:cacheprovider
step xl_eager 90 $PY scripts/cost_model.py size=$SIZE batch=1 device=$DEVICE dtype=$DTYPE repeats=20 \
  results=$ACCEPT out_dir="$WORK/xl_eager"
keep xl_eager "$SIZE"
step xl_compiled 120 $PY scripts/cost_model.py size=$SIZE batch=1 device=$DEVICE dtype=$DTYPE repeats=20 \
  compile=layer results=$ACCEPT out_dir="$WORK/xl_compiled"
keep xl_compiled "$SIZE"
step syncs 60 $PY scripts/host_syncs.py --device $DEVICE --cuda-debug --out "$WORK/syncs"
cp "$WORK/syncs/host_syncs.md" "$OUT/host_syncs.md" 2>/dev/null
step profile 45 sh -c "$PY scripts/profile_round.py --device $DEVICE --dtype $DTYPE --size $SIZE >'$OUT/profile_round.txt' 2>&1"
