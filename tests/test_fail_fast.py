"""Dead, silent and flaky servers on 127.0.0.1: lf2 fails in bounded time naming the server, or retries
through a passing fault and completes. (Default-setting timings: bench/fail_fast.py, docs/reliability.md.)"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from faults import FaultyProxy, closed_port, silent_server

from lf2core import storage
from lf2core.errors import StorageError


@pytest.fixture()
def short_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LF2_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("LF2_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("LF2_S3_RETRY_SECONDS", "3")
    monkeypatch.setenv("LF2_S3_MAX_ATTEMPTS", "8")


def _point_s3_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_silent_s3_endpoint_fails_in_bounded_time(monkeypatch, short_limits) -> None:
    with silent_server() as url:
        _point_s3_at(monkeypatch, url)
        t0 = time.monotonic()
        with pytest.raises(StorageError) as e:
            storage.read_bytes("s3://bucket/key.bin")
        took = time.monotonic() - t0
    msg = str(e.value)
    assert msg.startswith(f"s3://bucket/key.bin: the S3 endpoint {url} accepted the connection but did not "
                          f"answer within 1 s")
    assert "gave up after" in msg and "\n" not in msg
    assert 2.0 <= took < 8.0  # retried within the 3 s budget, then stopped (1 s read timeout per attempt)


def test_dead_s3_endpoint_names_it(monkeypatch, short_limits) -> None:
    with closed_port() as url:
        _point_s3_at(monkeypatch, url)
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=rf"cannot reach the S3 endpoint {url} \(is it running"):
            storage.exists("s3://bucket/prefix")
        assert time.monotonic() - t0 < 8.0


def test_passing_500s_are_retried_and_the_operation_completes(s3_env, s3_server, monkeypatch, short_limits):
    monkeypatch.setenv("LF2_S3_RETRY_SECONDS", "20")
    with FaultyProxy(s3_server, fail=3, status=500) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage.write_bytes(f"s3://{s3_env}/a/b.bin", b"payload")
        assert proxy.failed == 3 and proxy.requests >= 4
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert storage.read_bytes(f"s3://{s3_env}/a/b.bin") == b"payload"


def test_stalled_requests_are_retried_and_a_stage_output_commits(s3_env, s3_server, monkeypatch, short_limits):
    monkeypatch.setenv("LF2_S3_RETRY_SECONDS", "20")
    with FaultyProxy(s3_server, fail=2, stall=2.5) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with storage.output_dir(f"s3://{s3_env}/out", "cluster") as d:
            (d / "labels.npz").write_bytes(b"L")
        assert proxy.failed == 2
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert storage.is_complete(f"s3://{s3_env}/out")


def test_lasting_500s_fail_in_bounded_time(s3_env, s3_server, monkeypatch, short_limits):
    with FaultyProxy(s3_server, fail=10_000, status=503) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=rf"the S3 endpoint {proxy.url} kept failing \(HTTP 503 InternalError\); gave up after"):
            storage.read_bytes(f"s3://{s3_env}/x")
        assert time.monotonic() - t0 < 8.0 and proxy.failed >= 2


def test_bad_limit_value_is_named(monkeypatch) -> None:
    monkeypatch.setenv("LF2_S3_READ_TIMEOUT", "soon")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match=r"environment variable LF2_S3_READ_TIMEOUT='soon': expected a positive "
                                           r"number of seconds"):
        storage.read_bytes("s3://b/k")


def test_cli_data_check_against_silent_s3_is_one_line(tmp_path) -> None:
    with silent_server() as url:
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "LF2_S3_READ_TIMEOUT": "1", "LF2_S3_RETRY_SECONDS": "2",
               "LF2_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "lf2core.cli", "data", "check", "s3://bucket/market"],
                           capture_output=True, text=True, env=env, timeout=120)
        took = time.monotonic() - t0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("lf2: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr
    assert f"the S3 endpoint {url} accepted the connection but did not answer" in errors[0]
    assert took < 30
