"""The tracking server is checked before any work, fails in bounded time naming the server, and no MLflow
run is left RUNNING after an error (real ``mlflow server`` / sqlite store; dead servers on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from faults import closed_port, silent_server

from lf2core import tracking
from lf2core.config import load_config

TINY = ["data.height=32", "data.width=16", "model.arch=resnet18_narrow", "model.weights=none"]


def test_reachable_server_and_local_store(mlflow_server: str, tmp_path: Path) -> None:
    assert tracking.check_reachable(tracking_uri=mlflow_server) == mlflow_server
    assert tracking.check_reachable(tracking_uri=f"sqlite:///{tmp_path}/m.db").startswith("sqlite:///")
    with pytest.raises(tracking.TrackingError, match=r"directory .*/nope is missing or not writable"):
        tracking.check_reachable(tracking_uri=f"sqlite:///{tmp_path}/nope/m.db")


def test_dead_server_named_at_once() -> None:
    with closed_port() as url:
        t0 = time.monotonic()
        with pytest.raises(tracking.TrackingError, match=rf"MLflow tracking server {url}: unreachable \(.*\); is it "
                                                         r"running\? \(MLFLOW_TRACKING_URI"):
            tracking.check_reachable(tracking_uri=url)
        assert time.monotonic() - t0 < 5


def test_silent_server_times_out_with_credentials_masked() -> None:
    with silent_server() as url:
        uri = url.replace("http://", "http://alice:s3cr3t@")
        t0 = time.monotonic()
        with pytest.raises(tracking.TrackingError) as e:
            tracking.check_reachable(tracking_uri=uri, timeout=1.5)
        assert time.monotonic() - t0 < 6
    assert "did not answer within 1.5 s" in str(e.value) and "s3cr3t" not in str(e.value)


def test_promote_against_dead_server_blames_the_server(tmp_path: Path) -> None:
    with closed_port() as url:
        r = subprocess.run([sys.executable, "-m", "lf2core.cli", "promote", "--tracking-uri", url],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"lf2: error: MLflow tracking server {url}: unreachable")
    assert "does not exist" not in r.stderr


def _status(run_id: str) -> tuple[str, dict]:
    run = mlflow.MlflowClient().get_run(run_id)
    return run.info.status, run.data.tags


def test_failed_block_ends_run_failed_with_error_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("demo", TINY + ["tracking.experiment=ff"])
    with pytest.raises(ValueError):
        with tracking.start_run(cfg, "boom") as rid:
            raise ValueError("stage exploded")
    status, tags = _status(rid)
    assert status == "FAILED" and tags["lf2.error"] == "ValueError: stage exploded"
    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run(cfg, "ctrl-c") as rid2:
            raise KeyboardInterrupt
    assert _status(rid2)[0] == "KILLED"
    rid3 = tracking.create_run(cfg, "register")
    with pytest.raises(RuntimeError):
        with tracking.ended_on_error(rid3):
            raise RuntimeError("registry refused")
    assert _status(rid3)[0] == "FAILED"
    rid4 = tracking.create_run(cfg, "ok")
    with tracking.ended_on_error(rid4):
        pass
    assert _status(rid4)[0] == "FINISHED"


def test_http_limits_bounded_unless_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in tracking.HTTP_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    tracking.use(tracking_uri="http://127.0.0.1:1")
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"  # the user's choice is kept
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_pipeline_run_against_dead_mlflow_fails_before_any_task(tmp_path: Path) -> None:
    with closed_port() as url:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", "pipeline", "run", "--out", str(tmp_path / "p")],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env={**__import__("os").environ, "MLFLOW_TRACKING_URI": url})
        took = time.monotonic() - t0
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"lf2: error: MLflow tracking server {url}: unreachable")
    assert not (tmp_path / "p").exists() and took < 60  # no task ran: no pipeline root, no pretraining


def test_pipeline_cli_help_and_bad_numbers() -> None:
    from pipelines.cli import lf2_main

    with pytest.raises(SystemExit) as e:
        lf2_main(["pipeline", "--help"])
    assert e.value.code == 0
    for argv, message in ((["compile", "--out", "x.yaml", "--rounds", "-1"], "argument --rounds: must be >= 1, got -1"),
                          (["compile", "--out", "x.yaml", "--gpus", "-2"], "argument --gpus: must be >= 0, got -2")):
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", "pipeline", *argv], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
