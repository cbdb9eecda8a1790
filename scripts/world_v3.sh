#!/usr/bin/env bash
# World v3's models (issue 19), each made by the project's own command, into $V3 (outputs/v3):
#
#   bash scripts/world_v3.sh            # every stage not yet done; rerun after a stop: each resumes
#   STAGES="eval_target" bash scripts/world_v3.sh   # some stages only
#
# Stages, in order (a stage is done once its output folder exists; training stages resume exactly
# from their last checkpoint, ckpt_path=last):
#   target       the LlamaGen t2i target (dim 256, 4096 codes) on 60,000 v3 scenes: 4 layers for 7,250
#                steps, then grown to 8 layers for 8,000 more (bf16; about 40 steps a minute on 2 cores)
#   eval_target  scripts/evaluate_world.py on 256 held-out prompts: alignment and what it is made of
#                (the bar: AR samples >= 0.6), FID, the realism bar
#   drafter      EAGLE drafter distilled on the target's code shards
#   spatial      right/below spatial heads on the same shards
#   scheduler    VVS's learned skip policy from traces of v3 prompts
#   ship         every v3 model folder copied to $V3/ship/<name> with float16 weights (the budget for what
#                the repository ships is 40 MB), model cards kept; prints the total size
# The tokenizer ($V3/tokenizer_big) and the evaluator ($V3/evaluator) were trained before, by the
# commands in their folders' model cards. Logs: $V3/<stage>.log.
set -euo pipefail
PY=${PY:-.venv/bin/python}
V3=${V3:-outputs/v3}
TOK=$V3/tokenizer_big/tokenizer
TARGET=$V3/target8/target
CODES=$V3/target/codes
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=${WANDB_MODE:-disabled}
STAGES=${STAGES:-target eval_target drafter spatial scheduler ship}
SHARDS="data.train_urls='$CODES/train-{000000..000059}.tar' data.heldout_urls=$CODES/heldout-000000.tar"
MODELS="target.ckpt=$TARGET tokenizer.ckpt=$TOK data.tokenizer=$TOK"

stage() {  # stage NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT exists or NAME is not asked for
  local name=$1 output=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  if [ -e "$output" ]; then echo "$name: done ($output)"; return 0; fi
  echo "$name: $* (log: $V3/$name.log)"
  local t0=$SECONDS
  "$@" >"$V3/$name.log" 2>&1 || { echo "$name: failed, see $V3/$name.log"; exit 1; }
  echo "$name: done in $((SECONDS - t0)) s -> $output"
}

# the 4-layer run (stopped at step 7250, objects stalled: docs/results.md "World v3"), grown to 8 layers
stage target "$TARGET" bash -c "$PY -m train target out_dir=$V3/target8 init=$V3/target/checkpoints/step_7250.ckpt \
  gpt.n_layer=8 gpt.vocab_size=4096 $SHARDS data.tokenizer=$TOK data.world=v3 optim.lr=5e-4 trainer.max_steps=8000 \
  trainer.val_check_interval=1000 trainer.limit_val_batches=8 checkpoint_every=250 trainer.precision=bf16-mixed \
  ckpt_path=last"
stage eval_target "$V3/eval_target/report.json" $PY scripts/evaluate_world.py --target $TARGET --tokenizer $TOK \
  --evaluator $V3/evaluator/evaluator --world v3 --num 256 --out $V3/eval_target
# shellcheck disable=SC2086  # the overrides are words on purpose
stage drafter "$V3/drafter/drafter" bash -c "$PY -m train drafter out_dir=$V3/drafter $MODELS $SHARDS \
  trainer.max_steps=1500 trainer.val_check_interval=500 trainer.limit_val_batches=4 optim.lr=5e-4 \
  optim.warmup_steps=50 checkpoint_every=250 ckpt_path=last"
stage spatial "$V3/spatial/spatial" bash -c "$PY -m train drafter drafter.kind=spatial drafter.right=4 \
  out_dir=$V3/spatial $MODELS $SHARDS trainer.max_steps=1500 trainer.val_check_interval=500 \
  trainer.limit_val_batches=4 optim.lr=5e-4 optim.warmup_steps=50 checkpoint_every=250 ckpt_path=last"
stage scheduler "$V3/scheduler/scheduler" $PY -m train scheduler out_dir=$V3/scheduler target.ckpt=$TARGET \
  tokenizer.ckpt=$TOK drafter.ckpt=$V3/drafter/drafter traces.world=v3 trainer.max_steps=3000 \
  trainer.val_check_interval=500 ckpt_path=last
stage ship "$V3/ship" $PY -c "
import sys
from pathlib import Path
import torch
from decode.models.checkpoint import cast_model_folder
out = Path('$V3/ship.partial')  # renamed to ship once all fit the budget
folders = dict(tokenizer='$TOK', target='$TARGET', drafter='$V3/drafter/drafter', spatial='$V3/spatial/spatial',
               evaluator='$V3/evaluator/evaluator', scheduler='$V3/scheduler/scheduler')
for name, src in folders.items():
    cast_model_folder(src, out / name, torch.float16)
total = sum(f.stat().st_size for f in out.rglob('*') if f.is_file())
print(f'{len(folders)} folders in float16: {total / 2**20:.1f} MiB')
if total > 40 * 2**20:
    sys.exit(f'over the 40 MB budget; left in {out}')
out.rename('$V3/ship')
"
