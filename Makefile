# The two commands of the README. Each sets up .venv itself when it is missing or stale.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: quickstart test lint install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -c constraints.txt torch
	$(PIP) -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Runs sweeps/quickstart.yaml on a local Ray instance, logs to ./mlruns.db, prints the tables.
quickstart: $(VENV)/.installed
	$(VENV)/bin/rlsparsity sweep sweeps/quickstart.yaml

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .rlsparsity mlruns.db mlartifacts
