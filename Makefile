# lf2 — the two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: install demo demo-s3 test test-fast bench lint clean

install: $(STAMP)  ## create .venv/ and install lf2 with its pinned dependencies

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install  ## synthetic a -> b, whole pipeline locally (kfp.local), MLflow in ./mlflow.db, register + promote
	$(PY) -m pipelines.demo --out $(DEMO_OUT)

demo-s3: install  ## the same against a local S3 server (moto) and an mlflow server on 127.0.0.1
	$(PY) -m pipelines.demo --out $(DEMO_OUT)-s3 --s3

test: install  ## the full test suite (one OpenMP thread per process: the tests use small tensors)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest

lint: install  ## hadolint the Dockerfiles
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.gpu

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache
