# Each target bootstraps .venv by itself: a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

OPENBLAS := /usr/lib/x86_64-linux-gnu/libopenblas.so.0
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: demo test bench bench-full lint openblas clean redis package-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tokenizers,mlx-lm,serve,shared]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/multi_conversation.py

test: $(STAMP) redis
	$(PY) -m pytest -q

# Style and types over src/: ruff's formatter and linter, then mypy (configured in pyproject.toml).
LINT_STAMP := $(VENV)/.lint-stamp
$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[lint]'
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff format --check src
	$(VENV)/bin/ruff check src
	$(VENV)/bin/mypy

# The shared-tier tests start their own redis-server (Debian's package) on loopback ports.
redis:
	@command -v redis-server >/dev/null || test -x /usr/bin/redis-server || { \
		command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -qq redis-server >/dev/null 2>&1 || \
		  { apt-get update -qq && apt-get install -y -qq redis-server; } >/dev/null 2>&1; }; } || \
		echo "redis-server is missing and could not be installed (apt-get install redis-server): the shared-tier tests skip"

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,tokenizers,mlx-lm,serve,shared,bench]'
	touch $(BENCH_STAMP)

# Benchmarks preload the system OpenBLAS when there is one (about 16x faster prefill
# than the reference BLAS in the mlx wheel); benchmarks/run.py sets LD_PRELOAD for each script
# and prints which BLAS MLX ran on.
# make bench: every script's --quick run (each headline target on smaller runs), one table of
# targets at the end; ~7 minutes on 2 cores. make bench-full: the full runs behind the README's
# figures (about an hour; the 32-layer restore at 32k tokens needs ~16 GiB of memory at its peak).
bench: $(BENCH_STAMP) redis openblas
	$(PY) benchmarks/run.py --quick

bench-full: $(BENCH_STAMP) redis openblas
	$(PY) benchmarks/run.py

openblas:
	@test -e $(OPENBLAS) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -qq libopenblas0-pthread || { apt-get update -qq && apt-get install -y -qq libopenblas0-pthread; }; } >/dev/null 2>&1; } || \
		echo "no system OpenBLAS: MLX runs on the reference BLAS of its wheel"

# The wheel and the sdist build with no deprecation warning, and each installs into a fresh
# venv where `kvtrie serve --help` runs (CI runs this before the tests).
PKG_VENV := build/pkg-venv
package-check: $(STAMP)
	rm -rf dist $(PKG_VENV) && mkdir -p build
	$(PY) -m pip install -q build
	$(PY) -m build --outdir dist . > build/package.log 2>&1 || { cat build/package.log; exit 1; }
	! grep -i "deprecat" build/package.log
	for artifact in dist/*.whl dist/*.tar.gz; do \
		rm -rf $(PKG_VENV) && $(PYTHON) -m venv $(PKG_VENV) && \
		$(PKG_VENV)/bin/pip install -q "$$artifact[serve]" 2>&1 | grep -v "^WARNING: Location" ; \
		KVTRIE_HUGE_PAGES=0 $(PKG_VENV)/bin/kvtrie serve --help | grep -q -- --api-keys || exit 1; \
		$(PKG_VENV)/bin/python -c "import kvtrie, importlib.metadata as m; assert m.version('kvtrie') == kvtrie.__version__" || exit 1; \
		echo "$$artifact: installs, kvtrie serve --help runs"; \
	done

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
