# Two commands on a fresh machine: `make demo` and `make test`.
# Both create/refresh the local virtual environment .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Second and third environments for the compatibility tests (tests/test_runtimes.py):
# the oldest supported onnxruntime (newest manylinux2014 aarch64 wheel; needs numpy<2) and
# the deprecated onnxruntime-training (x86_64 only; never in the same env as onnxruntime).
OLDEST := .venv-ort-oldest
TRAINING := .venv-ort-training

.PHONY: demo test setup clean compat-envs aarch64-check

setup: $(STAMP)

$(OLDEST)/.installed:
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet "onnxruntime==1.16.3" "numpy<2" "pyserial>=3.5,<4" "threadpoolctl>=3,<4"
	touch $@

$(TRAINING)/.installed:
	test -x $(TRAINING)/bin/python || $(PYTHON) -m venv $(TRAINING)
	# its Python package imports torch; 2.13.0 is the local CPU wheel
	$(TRAINING)/bin/python -m pip install --quiet "onnxruntime-training==1.19.2" "onnx==1.16.2" "numpy<2" "torch==2.13.0"
	touch $@

# A failed install of either only makes their tests skip (with the reason), not the suite fail.
compat-envs:
	-$(MAKE) $(OLDEST)/.installed
	-$(MAKE) $(TRAINING)/.installed

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned (==2.13.0, the local CPU wheel); a loose requirement pulls a CUDA build
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m actcomp_edge.host.demo

test: $(STAMP) compat-envs
	$(PY) -m pytest -q

# The device side on an emulated arm64 Debian userland with the stock PyPI wheels (root;
# tools/aarch64_check.py). The userland is cached in ~/.cache/actcomp-edge (ACTCOMP_CACHE).
aarch64-check: $(STAMP)
	$(PY) tools/aarch64_check.py --install-prerequisites

clean:
	rm -rf $(VENV) $(OLDEST) $(TRAINING) .venv-executorch out
