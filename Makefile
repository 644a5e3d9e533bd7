# The two entry points: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test slowest lint install up down clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or set PYTHON=..."; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Hosts without CUDA take the CPU build of torch; a plain `torch` requirement can pull several GB of CUDA.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q 'torch>=2.7'; \
	else $(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; fi
	@# uv resolves and installs the rest several times faster than pip; it keeps the torch above. It
	@# compiles bytecode at install: with PYTHONDONTWRITEBYTECODE set, nothing would ever be cached.
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[test]' || $(BIN)/python -m pip install -q -e '.[test]'
	@# Prefect's database migrations run once here, not in every new demo folder. Only a speed-up:
	@# without the template (a full disk, say) every new Prefect home migrates its own database.
	$(BIN)/vinasmol prefect-template || echo "warning: no Prefect database template; each new Prefect home will migrate its own"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vinasmol demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	@mkdir -p .cache
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 --junitxml=.cache/pytest.xml

# The ten slowest tests of the last `make test` (from its JUnit report).
slowest:
	@$(BIN)/python -c "import xml.etree.ElementTree as E; c=sorted(E.parse('.cache/pytest.xml').iter('testcase'), key=lambda t: -float(t.get('time'))); [print(f\"{float(t.get('time')):8.1f} s  {t.get('classname')}::{t.get('name')}\") for t in c[:10]]"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info

# Local stack on 127.0.0.1: Prefect server (SQLite, or $VINASMOL_PREFECT_DATABASE_URL), SeaweedFS as
# the S3 store, one process worker per pool (cpu, cuda); registers deployments and the automation.
up: $(STAMP)
	$(BIN)/python -m infra.stack up

down:
	@test -x $(BIN)/python && $(BIN)/python -m infra.stack down || true
