#!/usr/bin/env bash
# The prepared device check: one call on a GPU machine, under 8 minutes (the steps' limits add up to
# 450 s; run it with timeout_s=480, which leaves a 15-minute budget room for a rerun).
#
#   here:   make device-wheels          # hydra-core, omegaconf, antlr4 as wheels in .whl/ (the GPU image lacks
#                                       # them) and .whl/world_captions.pt: the world prompts' caption features,
#                                       # so no text encoder is needed there
#   device: bash scripts/gpu_check.sh   # with carry [".whl"]; python3 there holds a CUDA build of torch
#
# 1. the engine's invariants on the GPU (tests/decode/test_gpu.py: greedy EAGLE-2 = greedy AR, sampled VVS
#    with CUDA generators, compiled layers = eager tokens, the waits per step);
# 2. make bench-xl: each method's world decisions replayed at LlamaGen-XL size (random weights, bf16,
#    batch 1), AR and every row compiled alike (compile=layer), tree=auto with costs timed on this GPU;
# 2b. the same with static shapes (ar, eagle2, vvs; compiled static: each pass kind traces once and inductor
#    captures it as a CUDA graph), the launch-bound steps' remedy;
# 3. the world benchmark on 16 held-out prompts with fid=false (no Inception weights there): speed and
#    quality side by side, tree=auto's VVS row included;
# 4. where the decode loop synchronizes with the GPU, per step and method (scripts/host_syncs.py --cuda-debug).
# Each step has its own time limit, so a slow one does not cost the others. Earlier runs (2026-11-28, H200,
# docs/results/gpu_h200) measured the cost model and one drafter round op by op (scripts/cost_model.py,
# scripts/profile_round.py: still there to run by hand).
# Results in $OUT (the device tool's folder) or outputs/gpu_check: log.txt (every step's output), bench_xl.md,
# bench_xl.csv, bench_xl_static.md, world.md, world.csv, host_syncs.md.
# A dry run of the plumbing on a CPU: PY=.venv/bin/python DEVICE=cpu SIZE=tiny DTYPE=float32 COMPILE=false bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-outputs/gpu_check}
DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-XL} DTYPE=${DTYPE:-bfloat16} PY=${PY:-python3} COMPILE=${COMPILE:-layer}
CAPTIONS=${CAPTIONS:-.whl/world_captions.pt}
TEXT="text_encoder=precomputed text_encoder.path=$CAPTIONS"
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
step() {  # step NAME SECONDS COMMAND...: run with a limit, append its output to the log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$LOG"
}
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available()
else 'no CUDA device')" 2>&1 | tee -a "$LOG"
step tests 90 $PY -m pytest -q -m gpu tests/decode/test_gpu.py -p no:cacheprovider
XL_ARGS="size=$SIZE device=$DEVICE dtype=$DTYPE compile=$COMPILE trace_prompts=2"
[ "$SIZE" = tiny ] && XL_ARGS="$XL_ARGS vocab_size=1024 cls_token_num=48 caption_dim=384"
step bench_xl 130 $PY scripts/bench_xl.py $XL_ARGS $TEXT out_dir="$WORK/bench_xl"
cp "$WORK/bench_xl/results.md" "$OUT/bench_xl.md" 2>/dev/null; cp "$WORK/bench_xl/results.csv" "$OUT/bench_xl.csv" 2>/dev/null
step bench_xl_static 90 $PY scripts/bench_xl.py $XL_ARGS $TEXT static_shapes=true 'runs=[ar,eagle2,vvs]' \
  out_dir="$WORK/bench_xl_static"
cp "$WORK/bench_xl_static/results.md" "$OUT/bench_xl_static.md" 2>/dev/null
step world 90 $PY scripts/benchmark.py device=$DEVICE $TEXT num_prompts=16 'seeds=[0]' fid=false \
  'runs=[{label: ar, method: ar},{label: eagle2, method: eagle2},{label: lantern_pp, method: lantern_pp},{label: vvs, method: vvs},{label: vvs_auto, method: vvs, tree: {auto: true}}]' \
  out_dir="$WORK/world"
cp "$WORK/world/results.md" "$OUT/world.md" 2>/dev/null; cp "$WORK/world/results.csv" "$OUT/world.csv" 2>/dev/null
step syncs 50 $PY scripts/host_syncs.py --device $DEVICE --cuda-debug --out "$WORK/syncs"
cp "$WORK/syncs/host_syncs.md" "$OUT/host_syncs.md" 2>/dev/null
