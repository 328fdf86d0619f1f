# The two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRAS ?= dev,accel
STAMP  := $(VENV)/.installed-$(EXTRAS)

.PHONY: install check-compiled demo test mutate bench clean

$(STAMP): pyproject.toml setup.py $(wildcard moe/bindings/*.pyx moe/bindings/*.pxd)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# Fails loudly when the Cython kernels did not build, unless MOE_ALLOW_PURE_PYTHON=1 is set on purpose.
check-compiled: install
	$(PY) -c "import os, sys, moe.bindings as b; ok = b.HAVE_COMPILED or os.environ.get('MOE_ALLOW_PURE_PYTHON') == '1'; print('moe.bindings: compiled path', 'live' if b.HAVE_COMPILED else 'MISSING'); sys.exit(0 if ok else 'the compiled kernels are missing (set MOE_ALLOW_PURE_PYTHON=1 to run on the numpy path on purpose)')"

# The main job: train one MoE model on the built-in benchmark (tables, checkpoint, profile),
# then add the held-out task from 10 examples per class.
demo: install
	rm -rf runs/demo
	$(VENV)/bin/moe train --out runs/demo
	$(VENV)/bin/moe add-task runs/demo

# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
test: check-compiled
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Mutation testing of the numerical core (docs/TESTING.md): plants small bugs, checks the tests
# notice. CPU-heavy and not part of `make test`; e.g. `make mutate MUTATE_ARGS="moe/optim.py --jobs 2"`.
mutate: check-compiled
	$(PY) tools/mutate.py $(MUTATE_ARGS)

# Speed is measured here, never in tests. Installs the bench-only peers (torch CPU, mixture-of-experts).
# The commands behind each table of bench/RESULTS.md; E = 4096 needs ~10 GiB (peers drop their grads).
bench: install
	$(PY) -m pip install --quiet -e ".[bench]"
	uptime
	$(PY) bench/layer.py --E 8,64,512 --pypi
	$(PY) bench/layer.py --E 4096 --peer-grads drop
	$(PY) bench/kernels.py --tiny
	$(PY) bench/accel_calibration.py
	$(PY) bench/sharding.py --only ipc:1,ipc:2
	$(PY) bench/hier_scale.py
	uptime

clean:
	rm -rf $(VENV) build *.egg-info moe/bindings/*.c moe/bindings/*.so
