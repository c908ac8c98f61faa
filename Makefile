# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create the project venv (.venv) when missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fermine-installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export RAY_USAGE_STATS_ENABLED := 0
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: install demo lint test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/fermine demo --out runs/demo

lint: install
	$(VENV)/bin/ruff check flows tasks workers storage tests bench

test: lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/attack.py
	$(PY) bench/mine.py

clean:
	rm -rf runs .pytest_cache
