# Two commands: `make run` and `make test`. Both create .venv/ and install on first use.
# `make docs` builds the documentation site into site/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The torch wheels this machine kind ships on disk (pip takes them from there, no download).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install run distill test lint docs bench bench-full clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	# torch is already satisfied, so resolving the project cannot pull another build.
	# The executorch extra is installed too: its tests run in `make test` (none skip); the
	# docs extra lets `make docs` build the site in a fresh clone.
	$(BIN)/pip install --quiet -e ".[dev,executorch,docs]" $(TORCH)
	touch $@

# The tiny search: builds (first time, ~8 min on 2 cores) or reuses the tiny world and a CPU
# latency table, evolves to half the original latency, writes runs/tiny-<time>/report.html.
run: install
	$(BIN)/diffnas search experiments/tiny.yaml --name tiny-$$(date +%Y%m%d-%H%M%S)

# After `make run`: train its found network from the full one (experiments/tiny.yaml's distill:
# section, a few minutes on 2 cores) and add it to the run's report (docs/distill.md).
distill: install
	$(BIN)/diffnas distill $$(ls -td runs/tiny-* | head -1)
	$(BIN)/diffnas report $$(ls -td runs/tiny-* | head -1)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The site (mkdocs.yml): --strict fails on a broken link, a page missing from the navigation
# or a module the API reference cannot read.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: install
	$(BIN)/python experiments/benchmarks/run_all.py --profile quick

bench-full: install
	$(BIN)/python experiments/benchmarks/run_all.py --profile full

clean:
	rm -rf $(VENV) .pytest_cache site
