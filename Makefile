# Every target bootstraps .venv itself, so `make test` on a fresh clone is the whole set-up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-py lint format bench count clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m otel_raptor demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole suite on another installed CPython, in a venv of its own: `make test-py PY=3.13`
# (.venv313; pyenv's newest 3.13.x, else a working python3.13 on PATH). CI runs 3.11 only.
PYENV_ROOT ?= $(HOME)/.pyenv
OTHER_VENV   = .venv$(subst .,,$(PY))
OTHER_PYTHON = $(or $(lastword $(shell ls -d $(PYENV_ROOT)/versions/$(PY).*/bin/python 2>/dev/null \
	| grep -E '/$(subst .,\.,$(PY))\.[0-9]+/bin/python$$' | sort -V)),$(shell \
	p=$$(command -v python$(PY)) && "$$p" -c '' 2>/dev/null && echo "$$p"))

test-py:
ifneq ($(origin PY),command line)
	$(error usage: make test-py PY=3.13)
endif
	@test -n "$(OTHER_PYTHON)" || { echo "no CPython $(PY) found (pyenv or python$(PY) on PATH)" >&2; exit 1; }
	$(MAKE) --no-print-directory test VENV=$(OTHER_VENV) PYTHON=$(OTHER_PYTHON) \
		PY=$(OTHER_VENV)/bin/python PYTEST_ARGS="$(PYTEST_ARGS)"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy src
	$(VENV)/bin/mypy --strict tests/typing/api.py
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks examples
	$(VENV)/bin/ruff format src tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/bench_guard.py
	$(PY) benchmarks/bench_http.py
	$(PY) benchmarks/bench_chaos.py
	$(PY) benchmarks/bench_db.py

# Instructions per call instead of time (needs valgrind): immune to a noisy host.
count: $(STAMP)
	$(PY) benchmarks/count_overhead.py

clean:
	rm -rf $(VENV) .venv3[0-9]* build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
