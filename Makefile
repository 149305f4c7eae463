# Two set-up commands for a fresh machine: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
# offline by design: no hub look-ups, no analytics or download-count calls
export HF_HUB_OFFLINE := 1
export HF_UPDATE_DOWNLOAD_COUNTS := 0
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: demo test venv clean bench browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmeye demo --config configs/demo.yaml

test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# The web demo's browser test drives Debian's chromium (browser builds cannot be downloaded by
# selenium or playwright here); install it when missing (CI runs as root on Debian).
browser:
	@test -x /usr/bin/chromedriver || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

clean:
	rm -rf $(VENV) demo_out
