"""S3 through boto3: the client, bounded retries, error translation and the object operations that
``lf2core.storage`` dispatches ``s3://`` URIs to. Nothing else in lf2 imports boto3.

Every operation is bounded (``S3_SETTINGS``: connect and read timeouts, attempts, total retry seconds,
each overridable by the environment variable of that name): transient errors are retried with
exponential backoff, and a dead or silent endpoint fails in about a minute with one ``StorageError``
naming the URI and the endpoint. A single object only ever becomes visible complete (PUT and
CompleteMultipartUpload are atomic).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from ..errors import StorageError
from .cache import cache_slot
from .uri import split_s3

log = logging.getLogger("lf2core.storage")

MULTIPART_THRESHOLD = 64 * 1024 * 1024  # bytes; bigger files are uploaded in parts
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024

T = TypeVar("T")
_client: Any = None
_client_key: Optional[tuple] = None


S3_SETTINGS = {  # environment variable -> default; documented in docs/reliability.md
    "LF2_S3_CONNECT_TIMEOUT": 5.0,  # seconds to open a connection
    "LF2_S3_READ_TIMEOUT": 20.0,  # seconds without a byte from the server before a request fails
    "LF2_S3_RETRY_SECONDS": 40.0,  # no new attempt after this long: a dead endpoint fails in ~1 minute
    "LF2_S3_MAX_ATTEMPTS": 8,  # attempts per operation (each whole: botocore itself does not retry)
}


def s3_setting(name: str) -> float:
    """A number from ``S3_SETTINGS``, overridden by the environment; a bad value names the variable."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return S3_SETTINGS[name]
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise StorageError(f"environment variable {name}={raw!r}: expected a positive number of "
                           f"{'attempts' if name.endswith('ATTEMPTS') else 'seconds'}")
    return value


def s3_endpoint() -> str:
    """The S3 endpoint in use (for error messages): ``$AWS_ENDPOINT_URL[_S3]`` or AWS's own."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3 (default endpoint)"


def _s3() -> Any:
    """A boto3 S3 client configured from the standard AWS environment (cached per environment).

    botocore's own retries are off: ``_retry`` retries whole operations within ``LF2_S3_RETRY_SECONDS``."""
    global _client, _client_key
    key = tuple(os.environ.get(k) for k in (
        "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", *S3_SETTINGS,
    ))
    if _client is None or key != _client_key:
        import boto3
        from botocore.config import Config as BotoConfig

        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
        _client = boto3.session.Session().client(
            "s3",
            region_name=region,
            config=BotoConfig(retries={"total_max_attempts": 1, "mode": "standard"},
                              connect_timeout=s3_setting("LF2_S3_CONNECT_TIMEOUT"),
                              read_timeout=s3_setting("LF2_S3_READ_TIMEOUT")),
        )
        _client_key = key
    return _client


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE,
                          max_concurrency=4, use_threads=True, num_download_attempts=1)


def _error_code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    if not code:
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(status or "")
    return code


def _translate(exc: BaseException, uri: str) -> StorageError:
    """A boto3/botocore exception -> one clear ``StorageError`` naming ``uri``."""
    from botocore import exceptions as bexc

    code = _error_code(exc)
    if not code and exc.__cause__ is not None:  # boto3's S3UploadFailedError wraps the ClientError
        code = _error_code(exc.__cause__)
    text = str(exc)
    if code == "NoSuchBucket" or "NoSuchBucket" in text:
        bucket = uri[5:].split("/", 1)[0]
        return StorageError(f"{uri}: bucket '{bucket}' does not exist")
    if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "AllAccessDisabled") or "AccessDenied" in text or "(403)" in text:
        return StorageError(f"{uri}: access denied ({code or 'forbidden'}); check the S3 credentials and "
                            f"bucket policy")
    if code in ("NoSuchKey", "404", "NotFound"):
        return StorageError(f"{uri}: no such object")
    if isinstance(exc, bexc.NoCredentialsError):
        return StorageError(f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                            f"or an AWS profile)")
    if isinstance(exc, (bexc.EndpointConnectionError, bexc.ConnectionError)):
        return StorageError(f"{uri}: cannot reach the S3 endpoint {s3_endpoint()} ({_short(exc)})")
    return StorageError(f"{uri}: S3 error {code or type(exc).__name__}: {exc}")


def _transient(exc: BaseException) -> bool:
    from botocore import exceptions as bexc

    if isinstance(exc, (bexc.EndpointConnectionError, bexc.ConnectionClosedError, bexc.ReadTimeoutError,
                        bexc.ConnectTimeoutError, bexc.ConnectionError)):
        return True
    code = _error_code(exc)
    return code in ("500", "502", "503", "504", "InternalError", "SlowDown", "ServiceUnavailable",
                    "RequestTimeout", "Throttling")


def retry(uri: str, fn: Callable[[], T]) -> T:
    """Run an S3 operation; transient failures are retried with exponential backoff + jitter.

    Bounded: at most ``LF2_S3_MAX_ATTEMPTS`` attempts, and none started after ``LF2_S3_RETRY_SECONDS``;
    each attempt is bounded by the connect/read timeouts. A whole transfer is one attempt (a multipart
    upload whose connection dropped is retried whole). Non-transient errors are translated at once; the
    final error names the URI, the endpoint and how long was tried.
    """
    attempts = int(s3_setting("LF2_S3_MAX_ATTEMPTS"))
    budget = s3_setting("LF2_S3_RETRY_SECONDS")
    t0 = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:
            if not type(e).__module__.startswith(("boto3", "botocore", "s3transfer", "urllib3")):
                raise
            if not _transient(e):
                raise _translate(e, uri) from None
            elapsed = time.monotonic() - t0
            delay = min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())
            if attempt == attempts or elapsed + delay > budget:
                raise _give_up(e, uri, attempt, time.monotonic() - t0) from None
            log.warning("%s: transient S3 error (%s), retry %d/%d in %.1fs", uri, _short(e), attempt,
                        attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _give_up(exc: BaseException, uri: str, attempts: int, seconds: float) -> StorageError:
    from botocore import exceptions as bexc

    tried = f"{attempts} attempt(s) in {seconds:.0f} s; limits: LF2_S3_RETRY_SECONDS, LF2_S3_READ_TIMEOUT"
    if isinstance(exc, bexc.ReadTimeoutError):
        why = (f"the S3 endpoint {s3_endpoint()} accepted the connection but did not answer within "
               f"{s3_setting('LF2_S3_READ_TIMEOUT'):g} s (server hung or overloaded?)")
    elif isinstance(exc, (bexc.EndpointConnectionError, bexc.ConnectTimeoutError, bexc.ConnectionError)):
        why = f"cannot reach the S3 endpoint {s3_endpoint()} (is it running? check AWS_ENDPOINT_URL)"
    else:
        status = (getattr(exc, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        why = (f"the S3 endpoint {s3_endpoint()} kept failing ("
               f"{f'HTTP {status} ' if status else ''}{_error_code(exc) or type(exc).__name__})")
    return StorageError(f"{uri}: {why}; gave up after {tried}")


def parallel(fn: Callable[[Any], None], items: list) -> None:
    """Run ``fn`` over ``items`` on ``$LF2_S3_WORKERS`` threads (default 8); the first error is raised
    once the running transfers end (boto3 clients are thread-safe)."""
    workers = max(1, int(os.environ.get("LF2_S3_WORKERS", "8")))
    if workers == 1 or len(items) <= 1:
        for it in items:
            fn(it)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = [pool.submit(fn, it) for it in items]
        errors = []
        for f in futures:
            try:
                f.result()
            except BaseException as e:  # collect; cancel the rest
                errors.append(e)
                for g in futures:
                    g.cancel()
        if errors:
            raise errors[0]


def head(uri: str) -> Optional[dict]:
    """HEAD an object; None if it does not exist (a missing bucket raises)."""
    bucket, key = split_s3(uri)
    if not key:
        return None

    def op() -> Optional[dict]:
        from botocore.exceptions import ClientError

        try:
            return _s3().head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if _error_code(e) in ("404", "NoSuchKey", "NotFound"):
                # HEAD on a missing bucket is also 404: tell the two apart
                check_bucket(uri)
                return None
            raise

    return retry(uri, op)


def check_bucket(uri: str) -> None:
    bucket, _ = split_s3(uri)
    from botocore.exceptions import ClientError

    try:
        _s3().head_bucket(Bucket=bucket)
    except ClientError as e:
        if _error_code(e) in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"{uri}: bucket '{bucket}' does not exist") from None
        raise


def list_objects(uri: str) -> list[dict]:
    """All objects under the prefix ``uri/`` (dicts with Key, Size, ETag)."""
    bucket, key = split_s3(uri)
    prefix = prefix_of(key)

    def op() -> list[dict]:
        out: list[dict] = []
        for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend(page.get("Contents", []))
        return out

    return retry(uri, op)


# ---------------------------------------------------------------------------------------- operations
def prefix_of(key: str) -> str:
    """``a/b`` -> ``a/b/`` (the objects "below" a key), ``""`` for the bucket root."""
    return key.rstrip("/") + "/" if key else ""


def exists(uri: str) -> bool:
    if head(uri) is not None:
        return True
    bucket, key = split_s3(uri)
    resp = retry(uri, lambda: _s3().list_objects_v2(Bucket=bucket, Prefix=prefix_of(key), MaxKeys=1))
    return resp.get("KeyCount", 0) > 0


def list_files(uri: str) -> list[str]:
    _, key = split_s3(uri)
    prefix = prefix_of(key)
    return sorted(o["Key"][len(prefix):] for o in list_objects(uri))


def read_bytes(uri: str) -> bytes:
    bucket, key = split_s3(uri)
    if not key:
        raise StorageError(f"{uri}: is a bucket, expected an object")

    def op() -> bytes:
        return _s3().get_object(Bucket=bucket, Key=key)["Body"].read()

    try:
        return retry(uri, op)
    except StorageError as e:
        if "no such object" in str(e):
            check_bucket(uri)
            if exists(uri):
                raise StorageError(f"{uri}: is a prefix (directory), expected an object") from None
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """A single PUT: the object appears whole or not at all."""
    bucket, key = split_s3(uri)
    if not key:
        raise StorageError(f"{uri}: missing object key")
    retry(uri, lambda: _s3().put_object(Bucket=bucket, Key=key, Body=data))


def upload_file(path: str | os.PathLike, uri: str) -> None:
    """Upload one local file (multipart above ``MULTIPART_THRESHOLD``)."""
    bucket, key = split_s3(uri)
    cfg = _transfer_config()
    retry(uri, lambda: _s3().upload_file(str(path), bucket, key, Config=cfg))


def remove(uri: str) -> None:
    bucket, key = split_s3(uri)
    retry(uri, lambda: _s3().delete_object(Bucket=bucket, Key=key))


def download(uri: str) -> Path:
    """The object or every object under the prefix ``uri``, downloaded once into the cache (keyed by the
    URI and the objects' ETags, so a changed object is fetched again; an entry appears only complete:
    downloaded into a temp dir, then renamed); returns the local file or directory."""
    obj = head(uri)
    bucket, key = split_s3(uri)
    if obj is not None:  # a single object
        slot = cache_slot(uri, f"file:{obj.get('ETag')}:{obj.get('ContentLength')}")
        target = slot / Path(key).name
        if not target.is_file():
            _download_into(slot, [(key, Path(key).name)], uri, bucket)
        return target
    objects = list_objects(uri)
    if not objects:
        raise StorageError(f"{uri}: no such object or prefix")
    prefix = prefix_of(key)
    listing = sorted((o["Key"], o.get("ETag", ""), o.get("Size", 0)) for o in objects)
    slot = cache_slot(uri, "dir:" + json.dumps(listing))
    target = slot / "d"
    if not target.is_dir():
        _download_into(slot, [(k, "d/" + k[len(prefix):]) for k, _, _ in listing if not k.endswith("/")], uri,
                       bucket)
    return target


def _download_into(slot: Path, items: list[tuple[str, str]], uri: str, bucket: str) -> None:
    """Download ``(key, relative_dest)`` pairs into ``slot`` atomically (temp sibling, then rename)."""
    slot.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{slot.name}.", suffix=".partial", dir=slot.parent))
    try:
        cfg = _transfer_config()
        client = _s3()

        def one(item: tuple[str, str]) -> None:
            key, rel = item
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            retry(f"s3://{bucket}/{key}", lambda: client.download_file(bucket, key, str(dest), Config=cfg))

        parallel(one, items)
        try:
            os.replace(tmp, slot)
        except OSError:
            if not slot.exists():  # a concurrent reader won the race otherwise
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def delete_keys(uri: str, bucket: str, keys: list[str]) -> None:
    for i in range(0, len(keys), 1000):
        chunk = [{"Key": k} for k in keys[i:i + 1000]]
        retry(uri, lambda chunk=chunk: _s3().delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True}))


def check_bucket_or_raise(uri: str) -> None:
    """Fail before the (possibly long) stage runs if the output bucket is missing or unreachable."""
    retry(uri, lambda: check_bucket(uri))
