# Two commands for users (README): `make bench` runs the main job, `make test` the test suite.
# Both create and fill the virtual environment $(VENV) on first use.
VENV ?= .venv
PYTHON ?= python3
BENCH_ARGS ?=

.PHONY: bench test lint clean

$(VENV)/.ready: pyproject.toml setup.py scripts/setup_venv.sh
	PYTHON=$(PYTHON) bash scripts/setup_venv.sh $(VENV)
	touch $@

bench: $(VENV)/.ready
	$(VENV)/bin/stt-fast bench $(BENCH_ARGS)

test: $(VENV)/.ready
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
