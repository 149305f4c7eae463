# Two set-up commands for a fresh machine: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test venv clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmeye demo --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) demo_out
