# One entry point for a fresh machine: each target creates .venv and installs the project
# (pinned by constraints.txt) when missing; a second run only checks a stamp file.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench venv lock lint clean-data

venv: $(STAMP)

# Bytecode: pip would compile all ~21,000 files of the stack, one at a time (~67 of the
# install's ~152 s on 2 cores). The install compiles what the commands import (~4,500
# modules, ~28 s) and Python the rest when first imported. Where PYTHONDONTWRITEBYTECODE is
# set (some machines set it for every shell) Python would never write it, and each process
# would compile again what it imports: make's commands run without it.
unexport PYTHONDONTWRITEBYTECODE
WARM_IMPORTS := torch, torchvision, ray.train.torch, ray.data, mlflow, prefect, flows.cli, \
	pipelines.train, pipelines.ingest, pipelines.evaluate

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, got " + sys.version.split()[0]'
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	@echo "installing the project and its pinned stack (first time: ~2 min, ~6.6 GB)"
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e '.[dev,crf]'
	@echo "compiling the bytecode of what the commands import"
	$(PY) -c 'import $(WARM_IMPORTS)'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fcn demo --project-dir $(DATA)

# Three sessions side by side (pytest-xdist), one per group of tests in tests/conftest.py
# (SESSION_GROUPS): they keep both cores busy. PYTEST_ARGS="-n 0" runs them in one session.
test: $(STAMP)
	$(PY) -m pytest -n 3 --dist loadgroup --durations=15 $(PYTEST_ARGS)

# The inner loop: the model core, configs, readers, images, manifests and the CPU side of the
# GPU path; no Ray, MLflow, Prefect or server is started (tests marked slow are left out).
FAST_TESTS := $(wildcard tests/test_core_*.py) tests/test_config.py tests/test_layers.py \
	tests/test_gpu_path.py tests/test_context.py tests/test_sources.py tests/test_images.py \
	tests/test_hha.py tests/test_train_details.py tests/test_infra.py tests/test_bench.py \
	tests/test_prefect_home.py tests/test_metric_logger.py tests/test_predict_nyud.py \
	tests/test_signals.py tests/test_cli_hints.py tests/test_job_args.py tests/test_db_template.py \
	tests/test_ray_start.py
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" --durations=5 $(FAST_TESTS) $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/bench_model.py
	$(PY) bench/bench_ingest.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_infer.py
	$(PY) bench/bench_storage.py
	$(PY) bench/bench_pipeline.py
	$(PY) bench/bench_stage_start.py
	$(PY) bench/bench_train_cli.py
	$(PY) bench/bench_predict.py

lint: $(STAMP)
	$(PY) -m ruff check fcn_core pipelines flows tests bench

# Re-resolve the pinned stack and rewrite constraints.txt (needs the package index).
lock: $(STAMP)
	{ echo "# Exact versions resolved for the pinned stack on Python 3.11 (make lock regenerates)."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v fcn-pipeline; } > constraints.txt

clean-data:
	rm -rf $(DATA)
