# Two commands do everything on a fresh machine (each sets up what is missing, then runs):
#   make demo   - SimCLR pretraining on the embedded digits data (2 Ray workers), ends with a kNN accuracy
#   make test   - the test suite (unit tests + real Ray/gloo, FFCV, Prometheus, S3 integration tests); `make test-cluster`
#                 for the multi-process cluster drills (CI runs both), `make test-slow` for the long ones
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=
# The container image: its name lives in deploy/image.env only (IMAGE=...); the cluster configs carry a copy.
include deploy/image.env
IMAGE_NOW   := $(shell sed -n 's/^IMAGE=//p' deploy/image.env)
IMAGE_FILES := deploy/image.env cluster/aws-gpu.yaml cluster/kuberay/raycluster.yaml cluster/kuberay/rayjob.yaml

.PHONY: setup demo test test-slow test-cluster clean monitor monitor-stop image image-push set-image

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

# CI's second stage: the real multi-process cluster drills (ray start, two nodes on loopback, job submit) and the
# long real-component drills (workers killed under Ray Train, an FFCV epoch on Ray, a real ASHA sweep, an S3 outage)
test-cluster: setup
	$(PY) -m pytest -m 'cluster and not slow' $(PYTEST_ARGS)
	$(PY) -m pytest -m 'drill and not slow' $(PYTEST_ARGS)   # its own process: the session's local Ray never meets a cluster's

# Local Prometheus on 127.0.0.1 scraping the local Ray (its service-discovery file), with deploy/'s rules;
# idempotent (a second call reloads the config and prints the URL). State in build/monitor/.
monitor:
	bash deploy/install-system-deps.sh
	bash deploy/monitor.sh start

monitor-stop:
	bash deploy/monitor.sh stop

# The image every cluster config runs (deploy/Dockerfile), under the name in deploy/image.env.
image:
	docker build -f deploy/Dockerfile -t $(IMAGE) .

image-push: image
	docker push $(IMAGE)

# Rename the image everywhere: make set-image IMAGE=registry.example.com/team/simclr-dist:0.2.0
set-image:
	@echo '$(IMAGE)' | grep -Eq '^[a-z0-9]([a-z0-9._/-]*[a-z0-9])?(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$$' \
	    || { echo "error: IMAGE=$(IMAGE) is not a valid image reference (lower-case repository[:tag])"; exit 2; }
	sed -i 's|$(IMAGE_NOW)|$(IMAGE)|g' $(IMAGE_FILES)
	@echo "image: $(IMAGE) (was $(IMAGE_NOW)) in $(IMAGE_FILES)"

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache
