# Two commands on a fresh machine: `make demo` and `make test`.
# Both create/refresh the local virtual environment .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned (==2.13.0, the local CPU wheel); a loose requirement pulls a CUDA build
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m actcomp_edge.demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out
