"""Fail fast, before any work: is the tracking server (and the artifact store it proxies) usable?"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from .store import HEALTH_TIMEOUT, TrackingError, enabled, mask, use


def _http_get(url: str, timeout: float) -> bytes:
    """GET with the credentials MLflow itself would send (user:password in the URI, or
    ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``, or ``MLFLOW_TRACKING_TOKEN``)."""
    import base64
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(parts.username or "") or os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    password = urllib.parse.unquote(parts.password or "") or os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc
    req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        req.add_header("Authorization", "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"])
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def check_reachable(cfg: Any = None, tracking_uri: Optional[str] = None, timeout: float = HEALTH_TIMEOUT) -> str:
    """Fail fast, before any training, when the tracking store cannot be used; returns its (masked) URI.

    A server (http/https) must answer ``GET /health`` within ``timeout`` seconds; when it proxies
    artifacts, listing its artifact root must work too (the server reaches its artifact store). A local
    sqlite store's directory must be writable. Raises ``TrackingError`` naming the server and the likely
    cause. No-op when tracking is disabled.
    """
    if not enabled():
        return ""
    uri = use(cfg, tracking_uri)
    shown = mask(uri)
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {shown}: directory {folder} is missing or not writable")
        return shown
    if not uri.startswith(("http://", "https://")):
        return shown
    import urllib.error

    base = uri.rstrip("/")
    try:
        _http_get(base + "/health", timeout)
    except urllib.error.HTTPError as e:
        raise TrackingError(f"MLflow tracking server {shown}: /health answered HTTP {e.code}; is this an "
                            f"MLflow server? (MLFLOW_TRACKING_URI / tracking.tracking_uri)") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        why = ("did not answer within %g s (server hung or overloaded?)" % timeout
               if "timed out" in str(reason) else f"unreachable ({reason}); is it running?")
        raise TrackingError(f"MLflow tracking server {shown}: {why} (MLFLOW_TRACKING_URI / "
                            f"tracking.tracking_uri)") from None
    try:  # a server that proxies artifacts must reach its artifact store
        _http_get(base + "/api/2.0/mlflow-artifacts/artifacts", timeout)
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            raise TrackingError(f"MLflow tracking server {shown}: its artifact store fails (HTTP {e.code} listing "
                                f"artifacts); check the server's --artifacts-destination and its S3 "
                                f"credentials") from None
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(f"MLflow tracking server {shown}: listing artifacts did not complete "
                            f"({getattr(e, 'reason', e)}); check its artifact store") from None
    return shown
