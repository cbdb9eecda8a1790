#!/usr/bin/env bash
# The prepared device check for the benchmark issue's GPU half: one call on a GPU machine, 9 minutes at most
# (the steps' limits add up to 540 s; run it with timeout_s=600).
#
#   here:   make device-wheels          # hydra-core, omegaconf, antlr4 as wheels in .whl/ (the GPU image lacks them)
#   device: bash scripts/gpu_check.sh   # with carry [".whl"]; python3 there holds a CUDA build of torch
#
# 1. the engine's invariants on the GPU (tests/decode/test_gpu.py: greedy EAGLE-2 = greedy AR, sampled VVS
#    with CUDA generators, compiled layers = eager tokens);
# 2. the cost model at LlamaGen-XL dimensions (random weights, bf16, batch 1), eager, combined with the v2
#    world's acceptance: predicted speed-ups, and the AR baseline's tokens/s next to a plain eager loop's;
# 3. the cost model at the world's size (the shipped target and drafter, batch 8), compiled as one graph;
# 4. where the decode loop synchronizes with the GPU, per step and method (scripts/host_syncs.py with the
#    CUDA sync debug mode next to the CPU model's count; the table goes to the log);
# 5. XL again with a compiled graph per block (compile=layer);
# 6. what compiling XL's whole stack as one graph costs up front (scripts/compile_time.py).
# Each step has its own time limit, so a slow one does not cost the others. The compiled XL run comes
# last, per block: on the 2-core CPU here, tracing XL's 36-layer stack as one graph took 70-80 s per
# shape kind, per block about 8 s.
# Results in $OUT (the device tool's folder) or outputs/gpu_check, 8 files: log.txt (every step's output),
# each cost-model run's table and timings (xl_eager, xl_compiled, world: .md and .json; the .json feeds
# `scripts/cost_model.py times_from=...` on any machine) and compile_stack.json.
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
step world 90 $PY scripts/cost_model.py size=world batch=8 device=$DEVICE dtype=float32 repeats=20 \
  compile=true results=$ACCEPT out_dir="$WORK/world"
keep world world
step syncs 60 $PY scripts/host_syncs.py --device $DEVICE --cuda-debug --out "$WORK/syncs"
step xl_compiled 150 $PY scripts/cost_model.py size=$SIZE batch=1 device=$DEVICE dtype=$DTYPE repeats=20 \
  compile=layer results=$ACCEPT out_dir="$WORK/xl_compiled"
keep xl_compiled "$SIZE"
step compile_stack 60 $PY scripts/compile_time.py --size $SIZE --scope stack --device $DEVICE --dtype $DTYPE \
  --out "$OUT/compile_stack.json"
