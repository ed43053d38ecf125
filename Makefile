# fedweights — `make demo` runs the main job, `make test` runs the suite (both set up .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH_INDEX ?=

.PHONY: install demo test test-fast bench proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The pinned torch first: an unpinned one could pull a multi-GB CUDA build. TORCH_INDEX (e.g.
	# https://download.pytorch.org/whl/cpu) picks where it comes from; empty: pip's configured sources.
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedweights simulate --he --dp --clients 4 --rounds 5 --out runs/demo

test: install
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadgroup

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

bench: install
	mkdir -p bench/results
	$(BIN)/python -m bench.run_all --out bench/results

proto: install
	$(BIN)/python tools/gen_proto.py

clean:
	rm -rf $(VENV) runs bench/results .pytest_cache
