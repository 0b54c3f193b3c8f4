# arena — every stage is one target; variables can be overridden: make features DATA=/path/archive
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
# Every stage runs through tools/stage.sh: its exit 3 (done, some videos skipped and listed) does not stop a chained
# recipe; 1 and 2 do. ARENA_STRICT=1 makes exit 3 stop it too.
ARENA       := tools/stage.sh $(BIN)/arena

DATA        ?= archive
CACHE       ?= cache/features.h5
MODELS      ?= models
SUBMISSION  ?= SUBMISSION_DIRECTORY/PREDICTIONS.CSV
FRAMES      ?= 24,32,48
DEVICE      ?= auto
WORKERS     ?= 2
TRIALS      ?= 50
# Real runs use ImageNet weights from the timm hub cache; pass WEIGHTS=--weights=/path/model.safetensors
# for a local file, or WEIGHTS=--no-pretrained for a random backbone.
WEIGHTS     ?= --pretrained
FEATURE_ARGS ?=
TRAIN_ARGS  ?=
SUBMIT_ARGS ?=

# The embedded demo: a small synthetic dataset, a random-init backbone at a small input size.
DEMO_DIR    ?= demo
DEMO_DATA   := $(DEMO_DIR)/data
DEMO_CACHE  := $(DEMO_DIR)/features.h5
DEMO_MODELS := $(DEMO_DIR)/models
DEMO_SUB    := $(DEMO_DIR)/SUBMISSION_DIRECTORY/PREDICTIONS.CSV

STAMP := $(VENV)/.arena-installed

.PHONY: help setup test test-postgres lint demo features tune-head frame-test train-full train-folds submit evaluate doctor bench \
	bench-scaling clean-demo

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

setup: $(STAMP)  ## FFmpeg libraries (apt, when root), .venv, pip install -c constraints.txt -e '.[dev]' (fast when done)

$(STAMP): pyproject.toml constraints.txt
	@if ! ldconfig -p 2>/dev/null | grep -q 'libavcodec\.so' || ! command -v ffmpeg >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing FFmpeg (shared libraries for torchcodec) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; \
	  else \
	    echo "FFmpeg shared libraries are missing: install them (Debian/Ubuntu: sudo apt-get install -y ffmpeg;"; \
	    echo "macOS: brew install ffmpeg; conda: conda install -c conda-forge 'ffmpeg<8') and run make setup again."; \
	    exit 1; \
	  fi; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

test: setup  ## run the test suite
	$(BIN)/python -m pytest -q

test-postgres: setup  ## only the PostgreSQL study tests, on a throwaway server (installs Debian's postgresql when root)
	@if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing PostgreSQL with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else \
	    echo "PostgreSQL is missing: install it (Debian/Ubuntu: sudo apt-get install -y postgresql; macOS: brew install"; \
	    echo "postgresql) and run make test-postgres again, or set ARENA_SKIP_POSTGRES=1 to skip its tests."; exit 1; \
	  fi; \
	fi
	$(BIN)/python -m pytest -q tests/test_postgres.py

lint: setup  ## ruff over the package, tests and tools
	$(BIN)/ruff check arena tests tools

doctor: setup  ## check layout, FFmpeg, torch stack, GPU/NVML and weights for DATA
	$(ARENA) doctor --data $(DATA)

features: setup  ## decode every video once and cache backbone features for every TTA variant
	$(ARENA) features --data $(DATA) --cache $(CACHE) --frames $(FRAMES) \
	  --device $(DEVICE) --workers $(WORKERS) $(WEIGHTS) $(FEATURE_ARGS)

tune-head: setup  ## Optuna trials on the attention head from the cache, then the 24/32/48 frame test
	$(ARENA) tune-head --data $(DATA) --cache $(CACHE) --models $(MODELS) --n-trials $(TRIALS) --device $(DEVICE)
	$(ARENA) frame-test --data $(DATA) --cache $(CACHE) --models $(MODELS) --device $(DEVICE)

frame-test: setup  ## only the frame-count test (needs a tuned head)
	$(ARENA) frame-test --data $(DATA) --cache $(CACHE) --models $(MODELS) --device $(DEVICE)

train-full: setup  ## fine-tune backbone + head end to end (resumes with TRAIN_ARGS=--resume)
	$(ARENA) train-full --data $(DATA) --models $(MODELS) --device $(DEVICE) --workers $(WORKERS) $(WEIGHTS) $(TRAIN_ARGS)

train-folds: setup  ## fine-tune every fold of a K-fold split (arena split --folds K) -> MODELS/folds/fold_<i>
	$(ARENA) train-full --fold all --data $(DATA) --models $(MODELS) --device $(DEVICE) --workers $(WORKERS) \
	  $(WEIGHTS) $(TRAIN_ARGS)

submit: setup  ## full-video TTA inference on the test set -> $(SUBMISSION), verified against the cache
	$(ARENA) submit --data $(DATA) --models $(MODELS) --out $(SUBMISSION) --device $(DEVICE) --workers $(WORKERS) \
	  --verify $(CACHE) $(SUBMIT_ARGS)

evaluate: setup  ## metrics with and without TTA on the validation split
	$(ARENA) evaluate --data $(DATA) --models $(MODELS) --split val --device $(DEVICE)

# The demo backbone: random-init InceptionResNetV2 (no ImageNet weights here) at 112 px, the same seed everywhere,
# so the head-only model at submit time runs the very weights the cache was built with.
DEMO_BACKBONE   ?= --no-pretrained --image-size 112 --seed 0
# 3 and 5 frames nest (linspace(0, n-1, 3) is part of linspace(0, n-1, 5)): the frame test costs 5 decoded frames.
DEMO_FRAMES     ?= 3,5
DEMO_TRIALS     ?= 30
# 140 training videos: batches of 16 give the head 9 steps per epoch (64 would give 3 and stop it early).
DEMO_TUNE_ARGS  ?= --batch-size 16
# 140 clips of 3 frames, batches of 8: 18 steps per epoch. 2 epochs (measured 2026-12-02): val AUC 0.994, held-out
# test AUC 0.988; a third epoch cost 33 s of the 6 minutes on an AVX2 CPU (test AUC 0.973 after 3).
DEMO_TRAIN_ARGS ?= --frames 3 --batch-size 8 --accum-steps 1 --epochs 2 --es-patience 3
DEMO_DATA_ARGS  ?=

demo: setup $(DEMO_DATA)/test_public.csv  ## the whole chain on a generated dataset (2 CPU cores, AVX2 only: about 5.5 min)
	$(ARENA) inspect --decode 8 $(DEMO_DATA)/train/real/real_0001.mp4 $(DEMO_DATA)/train/fake/fake_0001.mp4 \
	  $(DEMO_DATA)/test/test_0001.mp4
	$(ARENA) doctor --data $(DEMO_DATA) --expect none
	$(ARENA) features --data $(DEMO_DATA) --cache $(DEMO_CACHE) --frames $(DEMO_FRAMES) \
	  --workers $(WORKERS) $(DEMO_BACKBONE)
	$(ARENA) tune-head --data $(DEMO_DATA) --cache $(DEMO_CACHE) --models $(DEMO_MODELS) --n-trials $(DEMO_TRIALS) \
	  $(DEMO_TUNE_ARGS)
	$(ARENA) frame-test --data $(DEMO_DATA) --cache $(DEMO_CACHE) --models $(DEMO_MODELS)
	$(ARENA) evaluate --data $(DEMO_DATA) --models $(DEMO_MODELS) --model head-only \
	  --labels $(DEMO_DATA)/test_labels.csv --out $(DEMO_DIR)/eval_head_only.json
	$(ARENA) train-full --data $(DEMO_DATA) --models $(DEMO_MODELS) --workers $(WORKERS) $(DEMO_BACKBONE) \
	  $(DEMO_TRAIN_ARGS)
	$(ARENA) submit --data $(DEMO_DATA) --models $(DEMO_MODELS) --out $(DEMO_SUB) --workers $(WORKERS) \
	  --verify $(DEMO_CACHE)
	$(ARENA) evaluate --data $(DEMO_DATA) --models $(DEMO_MODELS) --labels $(DEMO_DATA)/test_labels.csv \
	  --attention-first 2 --out $(DEMO_DIR)/eval_finetuned.json
	@echo "demo done: submission $(DEMO_SUB); metrics $(DEMO_DIR)/eval_head_only.json, $(DEMO_DIR)/eval_finetuned.json"

$(DEMO_DATA)/test_public.csv: | setup
	$(ARENA) demo-data $(DEMO_DATA) --force $(DEMO_DATA_ARGS)

bench: setup  ## speed claims vs baselines measured side by side, one table -> bench_out/summary.md/.json
	$(BIN)/python tools/bench_all.py

bench-scaling: setup  ## cost vs work (length, resolution, workers, videos, trials) -> bench_out/scaling.csv/.png
	$(BIN)/python tools/bench_scaling.py

clean-demo:  ## remove the demo's outputs (its data is regenerated by make demo)
	rm -rf $(DEMO_DIR)
