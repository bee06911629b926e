# indexer: `make run` (demo) and `make test` (lint + tests) set themselves up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

AUTOFAISS_VENV := build/autofaiss-venv

.PHONY: help install browser run test lint docs format bench bench-index slim-check image clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP) browser  ## Create .venv and install indexer (editable) with dev tools

browser:  ## Debian's chromium and chromedriver, for the page's browser test (as root)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver >/dev/null) || echo "chromium could not be installed"; \
	  else echo "not root: install chromium and chromium-driver for the browser test"; fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)  ## Generate a demo collection, build it and query it
	$(BIN)/indexer demo --out build/demo

test: lint browser  ## Lint, then run the whole test suite
	$(BIN)/pytest

lint: $(STAMP)  ## ruff, mypy, the layering (import-linter) and the package's shape (.ci/structure.py)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy indexer
	$(BIN)/lint-imports
	$(BIN)/python .ci/structure.py indexer

docs: $(STAMP)  ## Build the documentation site into site/ (mkdocs --strict: a warning fails)
	$(BIN)/mkdocs build --strict

format: $(STAMP)  ## Apply ruff's formatting and fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)  ## Throughput, memory, re-run and service benchmarks (about 17 minutes; see bench/)
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/runtimes.py
	$(BIN)/python bench/choice.py
	$(BIN)/python bench/rerun.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/heads.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/hostile.py
	$(BIN)/python bench/objectstore.py
	$(BIN)/python bench/ceiling.py
	$(BIN)/python bench/ceiling.py --photos 6000  # the steady state (target >= 0.85)

SLIM := build/slim
slim-check: $(STAMP)  ## Query a portable collection from a venv without torch or timm (downloads ~440 MB)
	$(BIN)/indexer demo --out build/slim-demo --images 60
	rm -rf $(SLIM) && $(PYTHON) -m venv $(SLIM)
	$(SLIM)/bin/pip install --quiet numpy pyarrow faiss-cpu pillow click tqdm onnxruntime
	$(SLIM)/bin/pip install --quiet --no-deps .
	! $(SLIM)/bin/python -c "import torch" 2>/dev/null
	! $(SLIM)/bin/python -c "import timm" 2>/dev/null
	$(SLIM)/bin/indexer query --index build/slim-demo/collection -k 3 \
	  "$$(ls build/slim-demo/images/*/* | head -1)"

IMAGES ?= cpu slim cuda
IMAGE_REPO ?= indexer
image:  ## Container images indexer:cpu, :slim, :cuda with docker or podman (IMAGES=, IMAGE_REPO=)
	@engine=; broken=; \
	for e in $(CONTAINER_ENGINE) docker podman; do \
	  command -v $$e >/dev/null 2>&1 || continue; \
	  if $$e info >/dev/null 2>&1; then engine=$$e; break; fi; broken=$${broken:-$$e}; \
	done; \
	if [ -n "$$broken" ] && [ -z "$$engine" ]; then \
	  echo "make image: '$$broken info' fails: start its daemon (systemctl start docker) or install podman"; \
	  exit 1; \
	elif [ -z "$$engine" ]; then \
	  echo "make image: no container engine: install docker or podman (apt-get install podman)"; \
	  exit 1; \
	fi; \
	for t in $(IMAGES); do \
	  echo "$$engine build --target $$t -t $(IMAGE_REPO):$$t ."; \
	  $$engine build --target $$t -t $(IMAGE_REPO):$$t . || exit 1; \
	done

bench-index: $(STAMP)  ## Index benchmarks: 1M x 64 vs exact and autofaiss; the incremental day (~15 min)
	@# autofaiss pins numpy<2, which pyarrow 18+ refuses: it gets a venv of its own.
	test -x $(AUTOFAISS_VENV)/bin/python || \
	  ($(PYTHON) -m venv $(AUTOFAISS_VENV) && \
	   $(AUTOFAISS_VENV)/bin/pip install --quiet autofaiss 'pyarrow<18') || \
	  (rm -rf $(AUTOFAISS_VENV); echo "autofaiss could not be installed: benchmarking without it")
	$(BIN)/python bench/index.py
	$(BIN)/python bench/incremental.py

clean:  ## Remove build outputs (keeps .venv)
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
