# Two commands do everything on a fresh machine (each sets up what is missing, then runs):
#   make demo   - SimCLR pretraining on the embedded digits data (2 Ray workers), ends with a kNN accuracy
#   make test   - the test suite (fast unit tests + real Ray/gloo integration tests; `make test-slow` for the rest)
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow clean monitor monitor-stop

setup: $(STAMP)

$(STAMP): pyproject.toml deploy/install-system-deps.sh
	bash deploy/install-system-deps.sh
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (the project needs Python 3.11)"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m simclr_dist.pretrain $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Local Prometheus on 127.0.0.1 scraping the local Ray (its service-discovery file), with deploy/'s rules;
# idempotent (a second call reloads the config and prints the URL). State in build/monitor/.
monitor:
	bash deploy/install-system-deps.sh
	bash deploy/monitor.sh start

monitor-stop:
	bash deploy/monitor.sh stop

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache
