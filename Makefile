# The README's two commands: `make demo` (the main job on the embedded default) and
# `make test` (the test suite). Each does all set-up from nothing: a virtual
# environment, torch first (2.13.0 is the CPU build on this project's machines), then
# the package with its test extras at the versions constraints.txt pins. Re-running
# skips what is already done.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

# The newest transformers the analyzer and trainer are tested with, laid over the venv
# (its other dependencies are the same as constraints.txt's).
NEWEST   ?= transformers==5.25.0 kernels==0.19.1 tomlkit==0.15.3
OVERLAY   = $(VENV)/newest-transformers
NEWEST_TESTS ?= tests/workbench/test_analyzer.py tests/workbench/test_external.py tests/trainer/test_probes.py \
	tests/trainer/test_rollout.py tests/trainer/test_forward.py

.PHONY: demo test test-all test-newest setup browser bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,trl,deepspeed,peft]" -c constraints.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/oisd demo

browser:
	@bash scripts/install-browser.sh

test: $(STAMP) browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-newest: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(OVERLAY) $(NEWEST)
	PYTHONPATH=$(OVERLAY) $(PY) -c "import transformers; print('analyzer tests on transformers', transformers.__version__)"
	PYTHONPATH=$(OVERLAY) $(PY) -m pytest -q -p no:cacheprovider $(NEWEST_TESTS)

test-all: $(STAMP) browser
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
