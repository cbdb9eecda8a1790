#!/usr/bin/env bash
# World v4's models (issue 19), each made by the project's own command, into $V4 (outputs/v4):
#
#   bash scripts/world_v4.sh            # every stage not yet done; rerun after a stop: each resumes
#   STAGES="eval_target" bash scripts/world_v4.sh   # some stages only
#
# v4 is v3 with one object per scene (data/world.py WORLD_MAX_OBJECTS): the v3 models below were made
# first, by the commands in their model cards and docs/results.md "World v3".
# Stages, in order (a stage is done once its output exists; training stages resume exactly from
# their last checkpoint):
#   evaluator    the v3 evaluator fine-tuned on v4 scenes (200 steps; its labels are v3's)
#   target       v4 world shards and code shards (30,000 scenes, the v3 tokenizer), then the 8-layer v3
#                target (15,250 steps on v3) fine-tuned on them (bf16; about 40 steps a minute on 2 cores)
#   eval_target  scripts/evaluate_world.py on 256 held-out prompts: alignment and what it is made of
#                (the bar: AR samples >= 0.6), FID, the realism bar
#   drafter      EAGLE drafter distilled on the target's code shards
#   spatial      right/below spatial heads on the same shards
#   scheduler    VVS's learned skip policy from traces of v4 prompts
#   ship         every v4 model folder copied to $V4/ship/<name> with float16 weights (the budget for what
#                the repository ships is 40 MB), model cards kept; prints the total size
# Logs: $V4/<stage>.log.
set -euo pipefail
PY=${PY:-.venv/bin/python}
V3=${V3:-outputs/v3}
V4=${V4:-outputs/v4}
TOK=$V3/tokenizer_big/tokenizer
TARGET=$V4/target/target
EVALUATOR=$V4/evaluator/evaluator
CODES=$V4/target/codes
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=${WANDB_MODE:-disabled}
STAGES=${STAGES:-evaluator target eval_target drafter spatial scheduler ship}
# quoted twice: the stages run through bash -c, and Hydra must still see the braces inside quotes
SHARDS="\"data.train_urls='$CODES/train-{000000..000029}.tar'\" data.heldout_urls=$CODES/heldout-000000.tar"
MODELS="target.ckpt=$TARGET tokenizer.ckpt=$TOK data.tokenizer=$TOK"

resume() {  # resume OUT_DIR: ckpt_path=last once the run in OUT_DIR has a checkpoint (a fresh run takes none)
  if [ -e "$1/checkpoints/last.ckpt" ]; then echo "ckpt_path=last"; fi
}

stage() {  # stage NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT exists or NAME is not asked for
  local name=$1 output=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  if [ -e "$output" ]; then echo "$name: done ($output)"; return 0; fi
  echo "$name: $* (log: $V4/$name.log)"
  local t0=$SECONDS
  "$@" >"$V4/$name.log" 2>&1 || { echo "$name: failed, see $V4/$name.log"; exit 1; }
  echo "$name: done in $((SECONDS - t0)) s -> $output"
}

stage evaluator "$EVALUATOR" bash -c "$PY -m train evaluator out_dir=$V4/evaluator init=$V3/evaluator/evaluator \
  data.world=v4 model.width=48 optim.lr=2e-4 optim.warmup_steps=20 trainer.max_steps=200 trainer.val_check_interval=100 \
  trainer.limit_val_batches=16 data.num_workers=1 checkpoint_every=100 $(resume $V4/evaluator)"
stage target "$TARGET" bash -c "$PY -m train target out_dir=$V4/target init=$V3/target8/target gpt.n_layer=8 \
  gpt.vocab_size=4096 data.build=true data.world=v4 data.build_train=30000 data.build_heldout=512 data.tokenizer=$TOK \
  optim.lr=3e-4 optim.warmup_steps=100 trainer.max_steps=4000 trainer.val_check_interval=1000 \
  trainer.limit_val_batches=8 checkpoint_every=100 trainer.precision=bf16-mixed $(resume $V4/target)"
stage eval_target "$V4/eval_target/report.json" $PY scripts/evaluate_world.py --target $TARGET --tokenizer $TOK \
  --evaluator $EVALUATOR --world v4 --num 256 --out $V4/eval_target
# shellcheck disable=SC2086  # the overrides are words on purpose
stage drafter "$V4/drafter/drafter" bash -c "$PY -m train drafter out_dir=$V4/drafter $MODELS $SHARDS \
  trainer.max_steps=1500 trainer.val_check_interval=500 trainer.limit_val_batches=4 optim.lr=5e-4 \
  optim.warmup_steps=50 checkpoint_every=250 $(resume $V4/drafter)"
stage spatial "$V4/spatial/spatial" bash -c "$PY -m train drafter drafter.kind=spatial drafter.right=4 \
  out_dir=$V4/spatial $MODELS $SHARDS trainer.max_steps=1500 trainer.val_check_interval=500 \
  trainer.limit_val_batches=4 optim.lr=5e-4 optim.warmup_steps=50 checkpoint_every=250 $(resume $V4/spatial)"
stage scheduler "$V4/scheduler/scheduler" $PY -m train scheduler out_dir=$V4/scheduler target.ckpt=$TARGET \
  tokenizer.ckpt=$TOK drafter.ckpt=$V4/drafter/drafter traces.world=v4 trainer.max_steps=3000 \
  trainer.val_check_interval=500 $(resume $V4/scheduler)
stage ship "$V4/ship" $PY -c "
import sys
from pathlib import Path
import torch
from decode.models.checkpoint import cast_model_folder
out = Path('$V4/ship.partial')  # renamed to ship once all fit the budget
folders = dict(tokenizer='$TOK', target='$TARGET', drafter='$V4/drafter/drafter', spatial='$V4/spatial/spatial',
               evaluator='$EVALUATOR', scheduler='$V4/scheduler/scheduler')
for name, src in folders.items():
    cast_model_folder(src, out / name, torch.float16)
total = sum(f.stat().st_size for f in out.rglob('*') if f.is_file())
print(f'{len(folders)} folders in float16: {total / 2**20:.1f} MiB')
if total > 40 * 2**20:
    sys.exit(f'over the 40 MB budget; left in {out}')
out.rename('$V4/ship')
"
