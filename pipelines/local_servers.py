"""Local stand-ins for the production services, on 127.0.0.1: a moto S3 server, an ``mlflow server``
whose artifacts are proxied to that S3, and ``mlflow models serve`` for a registered model. Used by
``make demo-s3``, bench/serving.py and the integration tests.

    with moto_s3_server() as s3_url, mlflow_server(workdir, "s3://mlflow/artifacts", s3_env(s3_url)) as url:
        ...
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

BIN = Path(sys.executable).parent
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment pointing boto3 (and MLflow's S3 client) at ``endpoint`` with moto's test credentials."""
    return {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}


def _wait(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.3)
    _stop(proc)
    raise RuntimeError(f"server for {url} did not answer within {timeout:.0f}s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text()[-3000:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def moto_s3_server(log_dir: Optional[Path] = None, timeout: float = 60) -> Iterator[str]:
    """Start ``moto_server`` on 127.0.0.1 at a free port; yields its URL; stops it on exit."""
    port = free_port()
    log_dir = Path(log_dir or ".")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "moto.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=fh,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url + "/moto-api/", proc, timeout, log)
        yield url
    finally:
        _stop(proc)


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    env = s3_env(endpoint)
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1").create_bucket(Bucket=bucket)


@contextlib.contextmanager
def mlflow_server(workdir: Path, artifacts_destination: str, env: Optional[dict[str, str]] = None,
                  timeout: float = 240) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (sqlite store in ``workdir``, artifacts proxied to
    ``artifacts_destination``); yields its URL; stops it on exit."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "mlflow-server.log"
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{workdir.resolve() / 'mlflow.db'}",
           "--artifacts-destination", artifacts_destination, "--workers", "1"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url + "/health", proc, timeout, log)
        yield url
    finally:
        _stop(proc)


@contextlib.contextmanager
def model_server(model_uri: str, workdir: Path, env: Optional[dict[str, str]] = None, timeout: float = 240,
                 workers: int = 1) -> Iterator[str]:
    """``mlflow models serve -m MODEL_URI --env-manager local`` on 127.0.0.1 at a free port (the tracking
    store from ``env`` / the environment); yields its URL once ``/ping`` answers; stops it on exit."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "model-server.log"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    # the server execs `uvicorn` by name: this interpreter's bin/ goes first on PATH
    full_env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **(env or {})}
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=workdir,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url + "/ping", proc, timeout, log)
        yield url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session together with the workers it spawned."""
    import signal

    try:  # the group too when the parent already exited: its uvicorn workers may still run
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
