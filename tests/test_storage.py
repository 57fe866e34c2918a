"""lf2core.storage against the local file system and a real moto S3 server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import boto3
import pytest
from botocore.config import Config as BotoConfig
from botocore.stub import Stubber

from lf2core import storage
from lf2core.errors import StorageError


# ------------------------------------------------------------------------------------------------ local
def test_local_roundtrip_and_file_scheme(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b.bin"
    storage.write_bytes(str(p), b"hello")
    assert storage.read_bytes(f"file://{p}") == b"hello"
    assert storage.exists(str(p)) and not storage.exists(str(tmp_path / "nope"))
    assert [x.name for x in p.parent.iterdir()] == ["b.bin"]  # no temp file left behind
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(str(tmp_path / "nope"))


def test_local_output_dir_commit_and_failure(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with storage.output_dir(str(dest), "test-stage") as d:
        (d / "x.txt").write_text("1")
    assert storage.is_complete(str(dest)) and (dest / "x.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with storage.output_dir(str(dest), "test-stage") as d:
            (d / "y.txt").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in dest.iterdir()) == ["_LF2_OUTPUT.json", "x.txt"]  # old files intact, ...
    assert not storage.is_complete(str(dest))  # ... but no longer marked complete: a rerun began replacing it
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial dir left


def test_join() -> None:
    assert storage.join("s3://b/p/", "x", "/y/") == "s3://b/p/x/y"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"


# ------------------------------------------------------------------------------------------------ s3
def _objects(bucket: str, prefix: str = "") -> dict[str, bytes]:
    s3 = boto3.client("s3")
    out = {}
    for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        out[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def test_s3_bytes_exists_and_errors(s3_env: str) -> None:
    uri = f"s3://{s3_env}/dir/obj.bin"
    storage.write_bytes(uri, b"\x00\x01payload")
    assert _objects(s3_env) == {"dir/obj.bin": b"\x00\x01payload"}  # written by boto3, read back by boto3
    assert storage.read_bytes(uri) == b"\x00\x01payload"
    assert storage.exists(uri) and storage.exists(f"s3://{s3_env}/dir")
    assert not storage.exists(f"s3://{s3_env}/dir/missing") and not storage.exists(f"s3://{s3_env}/di")
    with pytest.raises(StorageError, match=rf"s3://{s3_env}/dir/missing: no such object"):
        storage.read_bytes(f"s3://{s3_env}/dir/missing")
    with pytest.raises(StorageError, match="expected an object"):
        storage.read_bytes(f"s3://{s3_env}/dir")
    for call in (lambda u: storage.write_bytes(u, b"x"), storage.read_bytes, storage.exists):
        with pytest.raises(StorageError, match=r"s3://no-such-bucket-lf2/k: bucket 'no-such-bucket-lf2' does not exist"):
            call("s3://no-such-bucket-lf2/k")


def test_remove_files_local_and_s3(s3_env: str, tmp_path: Path) -> None:
    for base in (str(tmp_path / "state"), f"s3://{s3_env}/runs"):
        for name in ("x.partial/state.pt", "x.partial/mine.txt", "x.partial2/state.pt"):
            storage.write_bytes(f"{base}/{name}", b"1")
        storage.remove_files(f"{base}/x.partial", ["state.pt"])
        assert not storage.exists(f"{base}/x.partial/state.pt")
        assert storage.exists(f"{base}/x.partial/mine.txt") and storage.exists(f"{base}/x.partial2/state.pt")
        storage.remove_files(f"{base}/x.partial", ["mine.txt"])
        assert not storage.exists(f"{base}/x.partial")  # an emptied local directory goes too
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["x.partial2"]


def test_s3_output_dir_atomic_commit(s3_env: str) -> None:
    uri = f"s3://{s3_env}/runs/r1/cluster"
    with pytest.raises(RuntimeError):
        with storage.output_dir(uri, "test-stage") as d:
            (d / "labels.npz").write_bytes(b"L")
            raise RuntimeError("stage failed")
    assert _objects(s3_env) == {}  # nothing half-written is visible
    with storage.output_dir(uri, "test-stage") as d:
        (d / "labels.npz").write_bytes(b"L1")
        (d / "sub").mkdir()
        (d / "sub" / "stats.json").write_text("{}")
    objs = _objects(s3_env)
    assert json.loads(objs.pop("runs/r1/cluster/_LF2_OUTPUT.json")) == {
        "format": "lf2-output/1", "stage": "test-stage", "files": ["labels.npz", "sub/stats.json"]}
    assert objs == {"runs/r1/cluster/labels.npz": b"L1", "runs/r1/cluster/sub/stats.json": b"{}",
                    "runs/r1/cluster/_COMPLETE": b"ok\n"}
    assert storage.is_complete(uri)
    with storage.output_dir(uri, "test-stage") as d:  # a re-run replaces the whole output, stale objects removed
        (d / "labels.npz").write_bytes(b"L2")
    objs = _objects(s3_env)
    assert json.loads(objs.pop("runs/r1/cluster/_LF2_OUTPUT.json"))["files"] == ["labels.npz"]
    assert objs == {"runs/r1/cluster/labels.npz": b"L2", "runs/r1/cluster/_COMPLETE": b"ok\n"}
    assert storage.list_files(uri) == ["_COMPLETE", "_LF2_OUTPUT.json", "labels.npz"]
    with pytest.raises(StorageError, match="does not exist"):
        with storage.output_dir("s3://no-such-bucket-lf2/x", "test-stage"):
            pytest.fail("the missing bucket must be reported before the stage runs")


def test_s3_multipart_upload(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.s3, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage.s3, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = f"s3://{s3_env}/ckpt/big.bin"
    storage.upload_file(src, uri)
    head = boto3.client("s3").head_object(Bucket=s3_env, Key="ckpt/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # 3 parts of <= 5 MiB: the multipart ETag form
    assert hashlib.sha256(storage.read_bytes(uri)).digest() == hashlib.sha256(data).digest()


def test_s3_local_path_cache(s3_env: str, tmp_path: Path) -> None:
    storage.set_cache_dir(tmp_path / "cache")
    try:
        storage.write_bytes(f"s3://{s3_env}/ds/train/1.jpg", b"one")
        storage.write_bytes(f"s3://{s3_env}/ds/query/2.jpg", b"two")
        root = storage.local_path(f"s3://{s3_env}/ds")
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == ["query/2.jpg",
                                                                                             "train/1.jpg"]
        assert (root / "train" / "1.jpg").read_bytes() == b"one"
        assert storage.local_path(f"s3://{s3_env}/ds") == root  # cached
        f = storage.local_path(f"s3://{s3_env}/ds/train/1.jpg")
        assert f.read_bytes() == b"one" and f.name == "1.jpg"
        storage.write_bytes(f"s3://{s3_env}/ds/train/1.jpg", b"changed")
        root2 = storage.local_path(f"s3://{s3_env}/ds")  # new ETag -> fetched again
        assert root2 != root and (root2 / "train" / "1.jpg").read_bytes() == b"changed"
        assert not list((tmp_path / "cache").rglob("*.partial"))
        with pytest.raises(StorageError, match=rf"s3://{s3_env}/nothing: no such object or prefix"):
            storage.local_path(f"s3://{s3_env}/nothing")
    finally:
        storage.set_cache_dir(None)


# ------------------------------------------------------------------------------------------------ stubbed
@pytest.fixture()
def stubbed(monkeypatch: pytest.MonkeyPatch):
    """A client with botocore retries off, so only lf2's own backoff loop is exercised."""
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y",
                          endpoint_url="http://127.0.0.1:9", config=BotoConfig(retries={"max_attempts": 1}))
    monkeypatch.setattr(storage.s3, "_s3", lambda: client)
    monkeypatch.setattr(storage.s3.time, "sleep", lambda s: None)
    with Stubber(client) as stub:
        yield stub
        stub.assert_no_pending_responses()


def test_access_denied_message(stubbed: Stubber) -> None:
    stubbed.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
    with pytest.raises(StorageError, match=r"^s3://b/secret\.bin: access denied"):
        storage.read_bytes("s3://b/secret.bin")


def test_transient_errors_are_retried(stubbed: Stubber, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LF2_S3_MAX_ATTEMPTS", "3")
    stubbed.add_client_error("put_object", service_error_code="SlowDown", http_status_code=503)
    stubbed.add_client_error("put_object", service_error_code="InternalError", http_status_code=500)
    stubbed.add_response("put_object", {"ETag": '"e"'}, {"Bucket": "b", "Key": "k", "Body": b"v"})
    storage.write_bytes("s3://b/k", b"v")  # third attempt succeeds


def test_retries_give_up_with_clear_error(stubbed: Stubber, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LF2_S3_MAX_ATTEMPTS", "2")
    for _ in range(2):
        stubbed.add_client_error("put_object", service_error_code="SlowDown", http_status_code=503)
    with pytest.raises(StorageError, match=r"^s3://b/k: the S3 endpoint AWS S3 \(default endpoint\) kept failing "
                                           r"\(HTTP 503 SlowDown\); gave up after 2 attempt\(s\) in 0 s"):
        storage.write_bytes("s3://b/k", b"v")


def test_s3_failed_upload_leaves_no_complete_marker(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{s3_env}/runs/r2/finetune"
    real = storage.outputs.upload_file

    def flaky(path, dest):  # one of 20 files cannot be uploaded
        if str(dest).endswith("f07.bin"):
            raise StorageError(f"{dest}: access denied (AccessDenied)")
        real(path, dest)

    monkeypatch.setattr(storage.outputs, "upload_file", flaky)
    with pytest.raises(StorageError, match=r"f07\.bin: access denied"):
        with storage.output_dir(uri, "test-stage") as d:
            for i in range(20):
                (d / f"f{i:02d}.bin").write_bytes(bytes([i]))
    assert not storage.is_complete(uri)
    assert f"runs/r2/finetune/{storage.COMPLETE_MARKER}" not in _objects(s3_env)


def test_failed_local_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (here: the disk is full) removes its temp file and the directories it made."""
    import errno

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd: int, mode: str) -> None:
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.local.os, "fdopen", FullDisk)
    with pytest.raises(OSError, match="No space left"):
        storage.write_bytes(str(tmp_path / "run.partial" / "state.pt"), b"x" * 100)
    assert list(tmp_path.iterdir()) == []
