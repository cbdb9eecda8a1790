#!/usr/bin/env bash
# The prepared device check for the benchmark issue's GPU half: one call on a GPU machine, about 8 minutes.
#
#   here:   make device-wheels          # hydra-core, omegaconf, antlr4 as wheels in .whl/ (the GPU image lacks them)
#   device: bash scripts/gpu_check.sh   # with carry [".whl"]; python3 there holds a CUDA build of torch
#
# 1. the engine's invariants on the GPU (tests/decode/test_gpu.py: greedy EAGLE-2 = greedy AR, sampled VVS
#    with CUDA generators, compiled layers = eager tokens);
# 2. the cost model at LlamaGen-XL dimensions (random weights, bf16, batch 1), eager and then with compiled
#    layers, combined with the v2 world's acceptance: predicted speed-ups and the AR baseline's tokens/s
#    next to a plain eager loop's;
# 3. the same at the world's size (the shipped target and drafter, batch 8).
# Each step has its own time limit, so a slow one (inductor tracing 36 layers) does not cost the others.
# Results: $OUT (the device tool's folder) or outputs/gpu_check.
# A dry run of the plumbing on a CPU: DEVICE=cpu SIZE=tiny DTYPE=float32 bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-outputs/gpu_check}
DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-XL} DTYPE=${DTYPE:-bfloat16}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
ACCEPT=docs/results/world_v2_cpu/results.json
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available()
else 'no CUDA device')" | tee "$OUT/gpu.txt"
step tests 120 python3 -m pytest -q -m gpu tests/decode/test_gpu.py -p no:cacheprovider
step xl_eager 120 python3 scripts/cost_model.py size=$SIZE batch=1 device=$DEVICE dtype=$DTYPE repeats=20 \
  results=$ACCEPT out_dir="$OUT/xl_eager"
step xl_compiled 240 python3 scripts/cost_model.py size=$SIZE batch=1 device=$DEVICE dtype=$DTYPE repeats=20 \
  compile=true results=$ACCEPT out_dir="$OUT/xl_compiled"
step world 60 python3 scripts/cost_model.py size=world batch=8 device=$DEVICE dtype=float32 repeats=20 \
  results=$ACCEPT out_dir="$OUT/world"
cat "$OUT/steps.txt"
