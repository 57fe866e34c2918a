"""Where stage inputs come from and outputs go: local paths (``file://`` allowed) and ``s3://`` URIs.

Every stage goes through these few functions, so a stage never knows which backend it talks to:

- ``local_path(uri)``: a local ``Path`` for an input file or directory. An s3:// file or prefix is
  downloaded once into a cache (``set_cache_dir`` / ``$LF2_CACHE_DIR`` / ``~/.cache/lf2``), keyed by the
  URI and the objects' ETags, and committed to the cache atomically.
- ``output_dir(uri)``: context manager giving a local scratch directory; on success its contents are
  committed to ``uri`` (local: one rename; s3: every file uploaded - multipart for big ones - then a
  ``_COMPLETE`` marker last). On failure nothing new is committed.
- ``read_bytes / write_bytes / exists / join / is_complete / list_files / upload_file``.

S3 goes through boto3 only here. The endpoint and credentials come from the standard AWS environment
and config files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws/config`` ...), so MinIO, moto or
any S3-compatible store works. A single S3 object only ever becomes visible complete (PUT and
CompleteMultipartUpload are atomic). Every operation is bounded (``S3_SETTINGS``: connect and read
timeouts, attempts, total retry seconds, each overridable by the environment variable of that name):
transient errors are retried with exponential backoff, and a dead or silent endpoint fails in about
a minute with one ``StorageError`` naming the URI and the endpoint, e.g.
``s3://bucket/key: bucket 'bucket' does not exist``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from .errors import DataError, StorageError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
MULTIPART_THRESHOLD = 64 * 1024 * 1024  # bytes; bigger files are uploaded in parts
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024

T = TypeVar("T")
_cache_dir_override: Optional[Path] = None
_client: Any = None
_client_key: Optional[tuple] = None


# ============================================================================================ generic
def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _strip_file(uri: str) -> str:
    uri = str(uri)
    return uri[len("file://"):] if uri.startswith("file://") else uri


def join(uri: str, *parts: str) -> str:
    """Join path components for a local path or a URI."""
    uri = str(uri)
    if is_remote(uri):
        out = uri.rstrip("/")
        for p in parts:
            p = str(p).strip("/")
            if p:
                out += "/" + p
        return out
    return str(Path(_strip_file(uri), *parts))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; raises ``StorageError`` for a malformed URI."""
    if not is_remote(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: missing bucket name")
    return bucket, key


def set_cache_dir(path: Optional[str | os.PathLike]) -> None:
    """Where ``local_path`` downloads s3:// inputs (``cfg.data.cache_dir``); ``None``/"" = default."""
    global _cache_dir_override
    _cache_dir_override = Path(path).expanduser() if path else None


def cache_dir() -> Path:
    if _cache_dir_override is not None:
        return _cache_dir_override
    env = os.environ.get("LF2_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lf2"


# ============================================================================================ S3 plumbing
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


def _retry(uri: str, fn: Callable[[], T]) -> T:
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


def _parallel(fn: Callable[[Any], None], items: list) -> None:
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


def _head(uri: str) -> Optional[dict]:
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
                _check_bucket(uri)
                return None
            raise

    return _retry(uri, op)


def _check_bucket(uri: str) -> None:
    bucket, _ = split_s3(uri)
    from botocore.exceptions import ClientError

    try:
        _s3().head_bucket(Bucket=bucket)
    except ClientError as e:
        if _error_code(e) in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"{uri}: bucket '{bucket}' does not exist") from None
        raise


def _list(uri: str) -> list[dict]:
    """All objects under the prefix ``uri/`` (dicts with Key, Size, ETag)."""
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""

    def op() -> list[dict]:
        out: list[dict] = []
        for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend(page.get("Contents", []))
        return out

    return _retry(uri, op)


# ============================================================================================ API
def exists(uri: str) -> bool:
    """True if ``uri`` is an existing file/object or a non-empty directory/prefix."""
    uri = str(uri)
    if not is_remote(uri):
        return Path(_strip_file(uri)).exists()
    if _head(uri) is not None:
        return True
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    resp = _retry(uri, lambda: _s3().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1))
    return resp.get("KeyCount", 0) > 0


def list_files(uri: str) -> list[str]:
    """Relative paths of all files below a directory or prefix (sorted)."""
    uri = str(uri)
    if not is_remote(uri):
        root = Path(_strip_file(uri))
        if not root.is_dir():
            raise StorageError(f"{uri}: not a directory")
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    _, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    return sorted(o["Key"][len(prefix):] for o in _list(uri))


def _cache_slot(uri: str, fingerprint: str) -> Path:
    h = hashlib.sha256(uri.encode()).hexdigest()[:20]
    return cache_dir() / "s3" / h / hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def local_path(uri: str) -> Path:
    """A local path holding the file or directory ``uri`` (downloaded to the cache first when remote).

    The cache entry is keyed by the URI and the ETags of its objects, so a changed object is fetched
    again; an entry appears only complete (downloaded into a temp dir, then renamed).
    """
    uri = str(uri)
    if not is_remote(uri):
        p = Path(_strip_file(uri))
        if not p.exists():
            raise StorageError(f"{uri}: no such file or directory")
        return p
    head = _head(uri)
    bucket, key = split_s3(uri)
    if head is not None:  # a single object
        slot = _cache_slot(uri, f"file:{head.get('ETag')}:{head.get('ContentLength')}")
        target = slot / Path(key).name
        if target.is_file():
            return target
        _download_into(slot, [(key, Path(key).name)], uri, bucket)
        return target
    objects = _list(uri)
    if not objects:
        raise StorageError(f"{uri}: no such object or prefix")
    prefix = key.rstrip("/") + "/" if key else ""
    listing = sorted((o["Key"], o.get("ETag", ""), o.get("Size", 0)) for o in objects)
    slot = _cache_slot(uri, "dir:" + json.dumps(listing))
    target = slot / "d"
    if target.is_dir():
        return target
    _download_into(slot, [(k, "d/" + k[len(prefix):]) for k, _, _ in listing if not k.endswith("/")], uri, bucket)
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
            _retry(f"s3://{bucket}/{key}", lambda: client.download_file(bucket, key, str(dest), Config=cfg))

        _parallel(one, items)
        try:
            os.replace(tmp, slot)
        except OSError:
            if not slot.exists():  # a concurrent reader won the race otherwise
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_bytes(uri: str) -> bytes:
    uri = str(uri)
    if not is_remote(uri):
        p = local_path(uri)
        if p.is_dir():
            raise StorageError(f"{uri}: is a directory, expected a file")
        return p.read_bytes()
    bucket, key = split_s3(uri)
    if not key:
        raise StorageError(f"{uri}: is a bucket, expected an object")

    def op() -> bytes:
        return _s3().get_object(Bucket=bucket, Key=key)["Body"].read()

    try:
        return _retry(uri, op)
    except StorageError as e:
        if "no such object" in str(e):
            _check_bucket(uri)
            if exists(uri):
                raise StorageError(f"{uri}: is a prefix (directory), expected an object") from None
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (local: temp name + rename; s3: a single PUT)."""
    uri = str(uri)
    if is_remote(uri):
        bucket, key = split_s3(uri)
        if not key:
            raise StorageError(f"{uri}: missing object key")
        _retry(uri, lambda: _s3().put_object(Bucket=bucket, Key=key, Body=data))
        return
    p = Path(_strip_file(uri))
    made = _make_parents(p)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _shareable(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        for d in made:  # a failed write (a full disk, say) leaves no empty directory behind
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _shareable(path: str | os.PathLike) -> None:
    """Give a temp file/directory (created 0600/0700) the permissions of an ordinary one under the
    process umask (0644/0755 by default), so that outputs on a shared file system are readable by the
    group/others as the site's umask intends (docs/reliability.md)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def _make_parents(p: Path) -> list[Path]:
    """Create the missing parent directories of ``p``; returns them, deepest first."""
    missing = [d for d in [p.parent, *p.parent.parents] if not d.exists()]
    p.parent.mkdir(parents=True, exist_ok=True)
    return missing


def upload_file(path: str | os.PathLike, uri: str) -> None:
    """Upload one local file to ``uri`` (multipart above ``MULTIPART_THRESHOLD``; local: atomic copy)."""
    uri = str(uri)
    if not is_remote(uri):
        dest = Path(_strip_file(uri))
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            _shareable(tmp)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    bucket, key = split_s3(uri)
    cfg = _transfer_config()
    _retry(uri, lambda: _s3().upload_file(str(path), bucket, key, Config=cfg))


def _delete_keys(uri: str, bucket: str, keys: list[str]) -> None:
    for i in range(0, len(keys), 1000):
        chunk = [{"Key": k} for k in keys[i:i + 1000]]
        _retry(uri, lambda chunk=chunk: _s3().delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True}))


def _check_bucket_or_raise(uri: str) -> None:
    """Fail before the (possibly long) stage runs if the output bucket is missing or unreachable."""
    _retry(uri, lambda: _check_bucket(uri))


# ============================================================================================ outputs
# An output directory/prefix written by ``output_dir`` holds, beside the stage's files, two control files:
# ``_LF2_OUTPUT.json`` (which stage wrote it and the list of files it wrote: lf2 only ever replaces or
# deletes files named there) and ``_COMPLETE`` (written last; absent while an output is being replaced).
OWNER_FILE = "_LF2_OUTPUT.json"
OWNER_FORMAT = "lf2-output/1"
CONTROL_FILES = (COMPLETE_MARKER, OWNER_FILE)
_overwrite_default = False


def set_overwrite(allowed: bool) -> None:
    """Whether ``output_dir`` may write into a location holding files that lf2 did not write there (the
    CLI's ``--overwrite``). Even then lf2 only replaces files of the names it writes; it deletes none."""
    global _overwrite_default
    _overwrite_default = bool(allowed)


def overwrite_allowed() -> bool:
    return _overwrite_default


def _read_owner(uri: str) -> Optional[dict]:
    """The ownership record of an output location, or None (absent, unreadable or not lf2's)."""
    try:
        rec = json.loads(read_bytes(join(uri, OWNER_FILE)))
    except (StorageError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("format") != OWNER_FORMAT or not isinstance(rec.get("files"), list):
        return None
    return rec


def present_files(uri: str) -> Optional[list[str]]:
    """Relative paths of the files at an output location; None when nothing is there. Raises
    ``StorageError`` when the location is a file or an object, or (S3) a whole bucket."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        if not key.strip("/"):
            raise StorageError(f"{uri}: a bucket root is never an output location; give a prefix, "
                               f"e.g. s3://{bucket}/lf2/run1")
        _check_bucket_or_raise(uri)
        if _head(uri) is not None:
            raise StorageError(f"{uri}: is an existing object, not an output prefix; lf2 will not replace it")
        return list_files(uri) or None
    p = Path(_strip_file(uri))
    if p.is_symlink() and not p.exists():
        raise StorageError(f"{uri}: is a broken symbolic link")
    if not p.exists():
        return None
    if not p.is_dir():
        raise StorageError(f"{uri}: is an existing file, not a directory; lf2 will not replace it")
    if not any(p.iterdir()):
        return None
    return list_files(uri)


def claim_output(uri: str, owner: str, overwrite: Optional[bool] = None) -> set[str]:
    """Check that stage ``owner`` may write its output at ``uri``, and mark a previous output of the same
    stage as being replaced (its ``_COMPLETE`` is removed, so a killed or failed rerun never leaves an
    output that looks complete). Returns the files of that previous output, which lf2 may replace.

    Allowed: a location that does not exist or is empty, or that holds exactly a previous output of the
    same stage. Anything else - files lf2 did not write, another stage's output, an existing file or
    object, an s3:// bucket root - raises ``StorageError`` naming the location. ``overwrite`` (default:
    ``set_overwrite``) lets lf2 write beside foreign files, never over a file/object nor at a bucket root.
    """
    uri = str(uri)
    overwrite = _overwrite_default if overwrite is None else overwrite
    present = present_files(uri)
    if present is None:
        return set()
    rec = _read_owner(uri)
    same_stage = rec is not None and rec.get("stage") == owner
    owned = set(rec["files"]) if same_stage else set()
    if not overwrite:
        if rec is not None and not same_stage:
            raise StorageError(f"{uri}: holds the output of lf2 stage '{rec.get('stage')}', not '{owner}'; "
                               f"use another location (or --overwrite to write beside it)")
        foreign = sorted(f for f in present if f not in owned and f not in CONTROL_FILES)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise StorageError(f"{uri}: is not empty and holds files lf2 did not write there ({foreign[0]}{more}); "
                               f"use an empty or new location (or --overwrite: lf2 deletes none of them)")
    if COMPLETE_MARKER in present:
        _remove_one(join(uri, COMPLETE_MARKER))
    return owned


def _remove_one(uri: str) -> None:
    """Delete one file/object; a local directory this leaves empty is removed too (lf2 made it)."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        _retry(uri, lambda: _s3().delete_object(Bucket=bucket, Key=key))
        return
    p = Path(_strip_file(uri))
    with contextlib.suppress(FileNotFoundError):
        p.unlink()
    for parent in p.parents:
        try:
            parent.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def output_dir(uri: str, owner: str, overwrite: Optional[bool] = None) -> Iterator[Path]:
    """Yield a scratch directory; commit it to ``uri`` as stage ``owner``'s output only if the block succeeds.

    On entry the location is claimed (``claim_output``: refused unless empty, new, or a previous output of
    the same stage). On success a new local directory appears whole by one rename; otherwise every file
    is moved (local) or uploaded (s3, multipart for big ones) into place, the files of the previous output
    that the new one lacks are deleted - only those, as listed in its ``_LF2_OUTPUT.json`` - and the new
    ownership record and ``_COMPLETE`` are written last: a reader (or KFP's cache) that checks
    ``is_complete`` never takes a partial output. On failure nothing new is committed and the scratch
    directory is removed (one left by a killed process is removed by the next ``output_dir`` there).
    """
    uri = str(uri)
    claim_output(uri, owner, overwrite)
    if is_remote(uri):
        tmp = Path(tempfile.mkdtemp(prefix="lf2-out-"))
    else:
        dest = Path(_strip_file(uri))
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            _remove_dead_scratch(dest)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.lf2-{os.getpid()}-", suffix=".partial",
                                        dir=dest.parent))
            _shareable(tmp)
        except OSError as e:
            raise StorageError(f"{uri}: cannot create the output directory there ({e.strerror or e})") from None
    try:
        yield tmp
        _commit(tmp, uri, owner)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_dead_scratch(dest: Path) -> None:
    """Remove scratch directories of this output left by killed lf2 processes (``.NAME.lf2-PID-*.partial``)."""
    for p in dest.parent.glob(f".{dest.name}.lf2-*-*.partial"):
        pid = p.name[len(dest.name) + 6:].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _commit(tmp: Path, uri: str, owner: str) -> None:
    for name in CONTROL_FILES:  # only the top level's control files are lf2's own here
        with contextlib.suppress(FileNotFoundError):
            (tmp / name).unlink()
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    record = (json.dumps({"format": OWNER_FORMAT, "stage": owner, "files": files}, indent=1) + "\n").encode()
    local = not is_remote(uri)
    if local and not Path(_strip_file(uri)).exists():
        (tmp / OWNER_FILE).write_bytes(record)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        os.replace(tmp, Path(_strip_file(uri)))
        return
    owned = claim_output(uri, owner, overwrite=True)  # re-read: the location may have changed since entry
    if local:
        for f in files:
            target = Path(_strip_file(uri)) / f
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / f, target)
            except OSError as e:
                raise StorageError(f"{target}: cannot be written ({e.strerror or e})") from None
    else:
        bucket, key = split_s3(uri)
        _parallel(lambda f: upload_file(tmp / f, f"s3://{bucket}/{key.rstrip('/')}/{f}"), files)
    for f in sorted(owned - set(files)):
        _remove_one(join(uri, f))
    write_bytes(join(uri, OWNER_FILE), record)
    write_bytes(join(uri, COMPLETE_MARKER), b"ok\n")


def remove_files(uri: str, names: list[str]) -> None:
    """Delete the named files, written by lf2, under a local directory or s3:// prefix (a local directory
    left empty is removed too); nothing else there is touched."""
    for name in names:
        _remove_one(join(str(uri), name))


def is_complete(uri: str) -> bool:
    """True if ``uri`` is an output directory committed by ``output_dir``."""
    return exists(join(uri, COMPLETE_MARKER))


def copy_tree(src: str, dest: str, owner: str) -> None:
    """Copy a local or s3:// directory to ``dest`` as ``owner``'s output (``output_dir``: atomic commit)."""
    root = local_path(src)
    with output_dir(dest, owner) as out:
        if root.is_dir():
            shutil.copytree(root, out, dirs_exist_ok=True)
        else:
            shutil.copy2(root, out / root.name)


def read_npz(uri: str, what: str = "arrays") -> tuple[dict[str, Any], bytes]:
    """Read an ``.npz`` file (local or s3://) -> ({name: np.ndarray}, raw bytes); no pickles.

    ``what`` names the content in the error (``DataError`` naming the URI) when it is missing or malformed.
    """
    import io

    import numpy as np

    try:
        raw = read_bytes(uri)
    except Exception as e:
        raise DataError(f"{uri}: cannot read {what} ({e})") from None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"{uri}: not a valid .npz file ({e})") from None
    return arrays, raw
