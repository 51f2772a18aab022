# `make run` and `make test` each build their own environment (.venv) first, from scratch if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXPERIMENT ?= defect-detection
# Extra `mlflow run` arguments, e.g. make run ARGS="-P epochs=1 -P hparams=small"
ARGS ?=

# The store: MLFLOW_TRACKING_URI from the environment, else from .env, else MLflow's SQLite default.
# Exported, because `mlflow run` itself creates main's run and does not read .env.
ifndef MLFLOW_TRACKING_URI
MLFLOW_TRACKING_URI := $(shell sed -n 's/^\(export \)\{0,1\}MLFLOW_TRACKING_URI=//p' .env 2>/dev/null | tail -n 1 | tr -d "\"'")
endif
MLFLOW_TRACKING_URI := $(or $(MLFLOW_TRACKING_URI),sqlite:///mlflow.db)
export MLFLOW_TRACKING_URI
# A URI with user:token@ in it: the stages strip it (steps.mlflow_io.tracking.credentials_from_uri), but
# `mlflow run` itself prints each run's URL with the URI as given; keep the token out of logs.
ifneq ($(findstring @,$(MLFLOW_TRACKING_URI)),)
export MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT := true
endif

.PHONY: venv run test test-fast lint mlproject bench bench-pipeline bench-accuracy bench-levers bench-drift bench-near-copies bench-spark bench-streaming bench-workers bench-pretrained bench-serving bench-memory bench-parity bench-front bench-first-epoch bench-store bench-startup server serve ui verify-registry prod-history clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(BIN)/.installed

## The whole pipeline on the default data (ELPV, fetched from the installed package on first run).
run: venv
	$(BIN)/python -m steps.mlflow_io.tracking
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow run . -e main --env-manager local \
		--experiment-name pipeline/$(EXPERIMENT) -P experiment=$(EXPERIMENT) $(ARGS)

## The default test suite: unit, data, model and end-to-end `mlflow run` tests, in TEST_WORKERS
## processes (pytest-xdist; a test file stays in one worker, so its module fixtures are built once;
## files are handed out longest first, in tests/conftest.py's order, not reordered by test count).
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(XDIST)

## MLproject as steps/core/parameters.py writes it, style (ruff) over steps/ and tests/, types (mypy) over steps/, and that requirements.txt
## resolves for Apple silicon (one TensorFlow with Linux, the Metal plugin; needs the package index).
lint: venv
	$(BIN)/python -m steps.core.parameters --check
	$(BIN)/ruff check steps tests
	$(BIN)/ruff format --check steps tests
	$(BIN)/mypy
	$(BIN)/python tests/mac_requirements.py

## MLproject, written from the parameter table (steps/core/parameters.py); make lint fails when they differ.
mlproject: venv
	$(BIN)/python -m steps.core.parameters

## The quick tiers: everything but tests/e2e and the tests marked slow.
test-fast: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(XDIST) -m "not e2e and not slow"

## Training speed (side by side with a plain Keras loop, against the machine's peak, precision,
## scaling), then the default pipeline timed on the full ELPV set with its test accuracy; results go
## to BENCHMARKS.md. A smoke check on a tiny subset: make bench ARGS=--quick
bench: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_training.py --write $(ARGS)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_pipeline.py --write $(ARGS)

## Only the pipeline part of `make bench`; ARGS takes -P overrides, e.g. ARGS="-P hparams=small"
bench-pipeline: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_pipeline.py --write $(ARGS)

## Test accuracy, balanced accuracy and defect recall of each set, the first at three training
## seeds, beside the best set trained from scratch, trained as `train` does; results go to
## BENCHMARKS.md. Other sets: ARGS="--sets a,b". A smoke check: make bench-accuracy ARGS=--quick
bench-accuracy: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_accuracy.py --write $(ARGS)

## Levers for a stronger model: each --variant (a set with fields changed) trained at --seeds seeds
## as train trains it, each --ensemble the mean of variants; test accuracy, ROC-AUC, recall and
## precision at the validation-chosen cut-off, McNemar against the first; results go to BENCHMARKS.md.
## Trainings are kept in bench-out/levers/. A smoke check: make bench-levers ARGS=--quick
bench-levers: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_levers.py --write $(ARGS)

## The drift check: false alarms on held-out batches, detection of changed images, infer's cost with it;
## results go to BENCHMARKS.md. A smoke check: make bench-drift ARGS=--quick
bench-drift: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_drift.py --write $(ARGS)

## How label tells a changed copy of a test image from another image; results go to BENCHMARKS.md
bench-near-copies: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_near_copies.py --write $(ARGS)

## infer's Spark engine on a standalone cluster of 1 and 2 workers against local mode; results go to
## BENCHMARKS.md. A smoke check: make bench-spark ARGS=--quick
bench-spark: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_spark.py --write $(ARGS)

## What fine-tuning the pretrained backbone costs: training images/s by image size, frozen blocks and
## precision, side by side; results go to BENCHMARKS.md. A smoke check: make bench-pretrained ARGS=--quick
bench-pretrained: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_pretrained.py --write $(ARGS)

## The registered model serving images, against the bare network, side by side; REST latency; load
## time. Results go to BENCHMARKS.md. A smoke check: make bench-serving ARGS=--quick
bench-serving: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_serving.py --write $(ARGS)

## Training from images streamed off disk at 1x and 10x the data against the in-memory input: anonymous
## memory and images/s, side by side; results go to BENCHMARKS.md. A smoke check: make bench-streaming ARGS=--quick
bench-streaming: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_streaming.py --write $(ARGS)

## Training images/s with one and two local workers (-P workers=N), alternated; results go to
## BENCHMARKS.md. A smoke check on the tiny set: make bench-workers ARGS=--quick
bench-workers: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_workers.py --write $(ARGS)

## Peak memory of scoring 64-megapixel frames, infer's way against a stacked batch, side by side;
## results go to BENCHMARKS.md. A smoke check on small frames: make bench-memory ARGS=--quick
bench-memory: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_memory.py --write $(ARGS)

## The exports' parity check: its peak memory and time at the stages' batch size against its own;
## results go to BENCHMARKS.md. A smoke check: make bench-parity ARGS=--quick
bench-parity: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_parity.py --write $(ARGS)

## The scoring front: its peak memory under each attack the review posted, and its images/s and
## latency against bare `mlflow models serve`, side by side; results go to BENCHMARKS.md. ARGS=--quick
bench-front: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/benchmarks/bench_front.py --write $(ARGS)

## Building a set's network and its first epoch, the optimizer's variables made by make_model
## against left to Keras's first trace, side by side; results go to BENCHMARKS.md. One round: ARGS=--quick
bench-first-epoch: venv
	$(BIN)/python tests/benchmarks/bench_first_epoch.py --write $(ARGS)

## A new SQLite store against a copy of an empty one (what each test store is), side by side;
## results go to BENCHMARKS.md. One round: ARGS=--quick
bench-store: venv
	$(BIN)/python tests/benchmarks/bench_store.py --write $(ARGS)

## What a stage's process costs besides its work: the entry points' collector thresholds against
## Python's defaults (train, evaluate, infer on a tiny set), and ml-dtypes 0.6 against 0.7's import;
## results go to BENCHMARKS.md. One round: ARGS=--quick
bench-startup: venv
	$(BIN)/python tests/benchmarks/bench_startup.py --write $(ARGS)

## A tracking server on loopback for the pipeline to use over HTTP: SQLite backend, artifacts
## served by the server itself. Then: MLFLOW_TRACKING_URI=http://127.0.0.1:$(PORT) make run
PORT ?= 5000
server: venv
	$(BIN)/mlflow server --backend-store-uri sqlite:///server.db --artifacts-destination ./mlartifacts \
		--host 127.0.0.1 --port $(PORT)

## Production_Reg@prod over REST on loopback: the scoring front (steps/served/front.py), MLflow's scoring
## protocol within bounds, following the alias (docs/serving.md). Set DEFECT_SERVE_TOKEN to require a token.
SERVE_PORT ?= 5001
serve: venv
	$(BIN)/python -m steps.served.front --port=$(SERVE_PORT)

## The MLflow UI on the store, at http://127.0.0.1:5000
ui: venv
	$(BIN)/mlflow ui --backend-store-uri "$(MLFLOW_TRACKING_URI)" --host 127.0.0.1 --port 5000

## Check the files of every registered version of Production_Reg and tag those that pass (code_sha256),
## as evaluate does: once, for versions registered before evaluate checked them, so promote can choose them.
verify-registry: venv
	$(BIN)/python -m steps.promote verify

## Every move of Production_Reg@prod, oldest first: by evaluate (the rule) or promote (by hand).
prod-history: venv
	$(BIN)/python -m steps.promote history

clean:
	rm -rf $(VENV) .pytest_cache
