# The commands of README: `make bench` runs the main job, `make test` the test suite (one worker per core),
# `make selftest` verifies what a GPU can (run it on a machine with one).
# Each creates and fills the virtual environment $(VENV) on first use.
VENV ?= .venv
PYTHON ?= python3
BENCH_ARGS ?=
SELFTEST_ARGS ?=

.PHONY: bench test selftest lint clean

$(VENV)/.ready: pyproject.toml setup.py scripts/setup_venv.sh
	PYTHON=$(PYTHON) bash scripts/setup_venv.sh $(VENV)
	touch $@

bench: $(VENV)/.ready
	$(VENV)/bin/stt-fast bench $(BENCH_ARGS)

test: $(VENV)/.ready
	$(VENV)/bin/python -m pytest -q -n auto --durations=20

selftest: $(VENV)/.ready
	$(VENV)/bin/stt-fast selftest $(SELFTEST_ARGS)

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
