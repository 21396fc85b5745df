# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch on this workplace's local disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test lint bench clean browser app

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]" $(TORCH)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/diffinv demo --out outputs/demo

# The app's browser test needs Chromium and its WebDriver (Debian packages; root). If they cannot be installed
# the test skips and says why, so a failure here does not stop `make test`.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get install -y chromium chromium-driver >/dev/null 2>&1 || \
		  { apt-get update >/dev/null 2>&1 && apt-get install -y chromium chromium-driver >/dev/null 2>&1; } || \
		  echo "note: could not install chromium/chromium-driver; the browser test will skip"; }

app: install
	$(VENV)/bin/diffinv app

# CI=true: the deterministic hypothesis profile, and a test whose import fails fails instead of skipping.
test: install browser
	CI=$${CI:-true} $(PY) -m pytest -q -p no:cacheprovider
	$(VENV)/bin/ruff check src tests benchmarks

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: install
	$(PY) benchmarks/run.py --out BENCHMARKS.md

clean:
	rm -rf $(VENV) outputs build *.egg-info src/*.egg-info
