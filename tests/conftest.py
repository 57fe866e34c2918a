"""Shared fixtures: real servers on 127.0.0.1, started lazily once per session.

- ``s3_server``: a moto S3 server (``moto_server``) on a free port; yields its endpoint URL.
- ``s3_env``: per-test environment pointing boto3 at it (AWS_ENDPOINT_URL, fake credentials) with a fresh
  bucket; yields the bucket name.
- ``mlflow_server``: an ``mlflow server`` with a sqlite backend and proxied artifacts in the moto bucket
  ``mlflow-artifacts``; yields its URL.
- ``one_torch_thread``: one torch intra-op thread for a whole test module, restored afterwards (modules
  opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).
"""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

from pipelines.local_servers import create_bucket, mlflow_server as _mlflow_server, moto_s3_server, s3_env as _s3_env


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads: on a shared CPU one thread is much faster (OpenMP
    barriers stall when the other thread is descheduled; 2 threads were ~10x slower on a loaded machine).
    One fixed count also keeps the bit-exact reproducibility checks comparable."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_s3_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


@pytest.fixture()
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point boto3 at the moto server and create a fresh bucket; yields the bucket name."""
    for k, v in _s3_env(s3_server).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LF2_S3_MAX_ATTEMPTS", "2")
    bucket = f"lf2-test-{uuid.uuid4().hex[:10]}"
    create_bucket(s3_server, bucket)
    yield bucket


@pytest.fixture(scope="session")
def mlflow_server(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a sqlite store and artifacts proxied to s3://mlflow-artifacts."""
    create_bucket(s3_server, "mlflow-artifacts")
    with _mlflow_server(tmp_path_factory.mktemp("mlflow-server"), "s3://mlflow-artifacts/artifacts",
                        _s3_env(s3_server)) as url:
        yield url
