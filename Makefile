# Two entry points do everything on a fresh machine; each installs what is missing first.
#   make run   - export the bundled model for Android (g3n-export --size e2b --target android)
#   make test  - run the test suite (what CI runs)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.g3n-installed

.PHONY: setup run test clean

setup: $(STAMP)

# The stamp is rebuilt when the dependency list changes, so a stale environment is refreshed automatically.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/g3n-export --size e2b --target android $(ARGS)

# Test files run in parallel, one worker per core by default: the two ExecuTorch lowerings of the bundled model
# (tests/test_pipeline.py and tests/test_executorch.py) take about 11 minutes each and then overlap.
JOBS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) exports .pytest_cache
