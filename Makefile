# Set-up is automatic: each target creates or updates the virtual environment first.
#   make demo   trains and evaluates on the synthetic dataset (CPU, a few minutes)
#   make test   runs the test suite (and ruff)
# Python 3.12 is found as `python3.12`, or under ~/.pyenv; override with `make PYTHON=/path/to/python3.12`.

PYTHON ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do \
  $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV ?= .venv
WORKDIR ?= workdirs/demo
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint tensorboard clean

$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "error: Python 3.12 not found; install it or pass PYTHON=/path/to/python3.12" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python main.py --config configs/demo.py --workdir $(WORKDIR)

# Two pytest workers (pytest-xdist): the suite is mostly single-threaded compilation and
# subprocess start-up, so two workers use both cores of a small machine.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n 2

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir workdirs

clean:
	rm -rf $(VENV) workdirs
