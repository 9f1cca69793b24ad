# The two commands a newcomer needs:   make run   and   make test
# PYTHON picks the interpreter for .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: run test test-fast lock audit verify verify-k8s bench clean

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-dev.txt
	touch $@

## Development server: DEBUG on, SQLite, in-memory channel layer, Daphne's runserver.
run: $(STAMP)
	DEBUG=True $(BIN)/python manage.py migrate --noinput
	DEBUG=True $(BIN)/python manage.py runserver 127.0.0.1:8000

## Everything: unit, integration (real Redis/PostgreSQL/gunicorn), browser, and every target.
## Two lanes side by side: the VM and platform targets, and the rest (tests/README.md).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --lanes

## Only what needs no Docker: unit, integration, browser and fault tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit tests/integration tests/browser tests/faults

## Re-resolve both locks (with hashes) from requirements.in / requirements-dev.in.
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links -o requirements.txt requirements.in
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links -o requirements-dev.txt requirements-dev.in

## Benchmark of the production stack, before (issue #13) and after (about 50 minutes; a quiet machine).
bench: $(STAMP)
	$(BIN)/python -m bench --reference

## Known vulnerabilities in the production lock (needs PyPI's JSON API or OSV).
audit: $(STAMP)
	$(BIN)/pip-audit --strict --require-hashes -r requirements.txt

## Black-box check of any deployment: make verify URL=https://chat.example.com
verify: $(STAMP)
	$(BIN)/python -m tests.contract.verify $(URL)

## The contract against a real cluster: make verify-k8s URL=https://chat.example.com
verify-k8s: $(STAMP)
	tests/k8s/verify_cluster.sh $(URL)

clean:
	rm -rf $(VENV) staticfiles db.sqlite3 .pytest_cache
