# propdsl: `make demo` and `make test` each set up .venv when it is missing, then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2

.PHONY: setup demo test test-fast lint bench reproduce clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

# the main job on the offline default data: check, train, evaluate and verify the digits spec
demo: $(STAMP)
	$(VENV)/bin/propdsl check specs/digits.prop
	$(VENV)/bin/propdsl train specs/digits.prop --out runs/demo --force
	$(VENV)/bin/propdsl eval specs/digits.prop --run runs/demo
	$(VENV)/bin/propdsl verify specs/digits.prop --run runs/demo --samples 100

# style, types (mypy) and the import layers of docs/architecture.md (lint-imports)
lint: $(STAMP)
	$(VENV)/bin/ruff check propdsl tests benchmarks examples
	$(VENV)/bin/ruff format --check propdsl tests benchmarks examples
	$(VENV)/bin/mypy propdsl
	$(VENV)/bin/lint-imports

# the whole suite, slow end-to-end and fuzz tests included (what CI runs)
test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)
	@echo "the loss-side tests again, every attack objective traced from its first hot call:"
	PROPDSL_TRACE_AFTER=0 $(VENV)/bin/pytest -q -p no:cacheprovider -m "not slow and not fuzz" \
	  -k "loss or attack or compile or tracing or train or pairs or woods" $(PYTEST_ARGS)

# the quick loop while developing
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow and not fuzz" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run.py

# the four paper reproductions on digits (docs/reproductions.md); REPRO_ARGS, e.g. --data mnist
REPRO_ARGS ?=
reproduce: $(STAMP)
	@for p in casadio chen woods etmann; do \
	  $(PY) benchmarks/reproduce_$$p.py $(REPRO_ARGS) || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .import_linter_cache .hypothesis dist build
