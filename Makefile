# lf2 — the two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= runs/demo

VARIANT ?= all

.PHONY: install demo demo-s3 demo-docker test test-slow test-fast test-containers images base-image engine bench lint clean

install: $(STAMP)  ## create .venv/ and install lf2 with its pinned dependencies

$(STAMP): pyproject.toml docker/requirements-cpu.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c docker/requirements-cpu.lock -e '.[test]'  # the CPU image's exact versions
	touch $(STAMP)

demo: install  ## synthetic a -> b, whole pipeline locally (kfp.local), MLflow in ./mlflow.db, register + promote
	$(PY) -m pipelines.demo --out $(DEMO_OUT) --rounds-per-task 3  # 3 rounds a task: -2 min of process starts

demo-s3: install  ## the same against a local S3 server (moto) and an mlflow server on 127.0.0.1
	$(PY) -m pipelines.demo --out $(DEMO_OUT)-s3 --s3

test: install  ## the test suite but the slow integration tests (one OpenMP thread per process: small tensors)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -m "not slow"

test-slow: install  ## the slow integration tests (kfp.local pipelines, torchrun DDP, mlflow server, recipe dry runs)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -m slow

lint: install  ## hadolint the Dockerfile
	$(VENV)/bin/hadolint docker/Dockerfile

engine:  ## make sure a Docker engine answers (installs docker.io and starts dockerd when root)
	bash docker/engine.sh start

base-image: install engine  ## lf2-base:bookworm from Debian packages (debootstrap), for sites without a registry
	$(PY) docker/build.py base

images: install engine  ## the CPU and GPU images, lf2:<version>-<sha>[-gpu] (base and wheelhouse made as needed; VARIANT=cpu|gpu)
	$(PY) docker/build.py images --variant $(VARIANT) $(IMAGE_ARGS)

test-containers: install  ## start the engine, build the CPU image, run a tiny pipeline in containers, stop what it started
	PY=$(PY) bash docker/test-containers.sh

demo-docker: install engine  ## the demo in the CPU image: kfp.local.DockerRunner + local S3 and mlflow servers (host network)
	$(PY) docker/build.py images --variant cpu --quiet
	$(PY) -m pipelines.demo --out $(DEMO_OUT)-docker --runner docker

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache
