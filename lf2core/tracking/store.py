"""The tracking store: which one (URI), how secrets are masked, bounded HTTP limits, the client.

The only place that decides the tracking URI: ``cfg.tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI`` or
``sqlite:///mlflow.db`` (artifacts of the local default in ``./mlartifacts``). ``LF2_TRACKING=off`` turns
every tracking function into a no-op.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import Lf2Error

log = logging.getLogger("lf2core.tracking")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"

_SECRET_KEY = re.compile(r"(key|secret|token|passw(or)?d|credential|auth)", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:[^=&]*(?:key|secret|token|signature|password)[^=&]*)=)[^&\s]+")


class TrackingError(Lf2Error):
    """The tracking server/registry refused an operation, or the model/alias asked for does not exist."""


def enabled() -> bool:
    """False when ``LF2_TRACKING`` is ``off``/``0``/``false``/``no``."""
    return os.environ.get("LF2_TRACKING", "on").strip().lower() not in ("off", "0", "false", "no", "disabled")


def mask(value: Any, key: str = "") -> Any:
    """Hide secrets: whole values of secret-looking keys, passwords in URIs, signed query strings."""
    if key and _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in ("", None):
        return "***"
    if isinstance(value, str):
        value = _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)
        value = _SECRET_QUERY.sub(r"\1***", value)
    return value


def masked_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Flat params with secrets masked and values stringified (MLflow stores params as strings)."""
    out = {}
    for k, v in params.items():
        v = mask(v, k)
        out[k] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"global": {"clusters": 3}}`` -> ``{"<prefix>/global/clusters": 3.0}``; non-numbers dropped."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, name))
        elif isinstance(v, bool):
            out[name] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[name] = float(v)
        elif hasattr(v, "item") and getattr(v, "size", 2) == 1:  # numpy scalar
            try:
                f = float(v.item())
            except (TypeError, ValueError):
                continue
            if math.isfinite(f):
                out[name] = f
    return {re.sub(r"[^A-Za-z0-9_\-. /]", "_", k): v for k, v in out.items()}


def resolve_tracking_uri(cfg: Any = None, tracking_uri: Optional[str] = None) -> str:
    uri = tracking_uri or (getattr(getattr(cfg, "tracking", None), "tracking_uri", "") if cfg is not None else "")
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # a relative sqlite path is fixed against the current directory now: mlflow caches one store per URI
        # string, so "sqlite:///mlflow.db" would otherwise keep pointing at the first directory it was used in
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


_uri: Optional[str] = None  # the store chosen by the last use()/configure() in this process

# MLflow's HTTP client waits 120 s per request and retries 7 times with backoff by default (~an hour
# against a silent server); lf2 bounds it unless the user set these variables (docs/reliability.md).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
HEALTH_TIMEOUT = 10.0  # seconds for the reachability check of a tracking server


def use(cfg: Any = None, tracking_uri: Optional[str] = None) -> str:
    """Choose the tracking store for this process (cheap: does not import mlflow); returns its URI.
    Also bounds MLflow's HTTP timeouts and retries (``HTTP_DEFAULTS``, where the environment sets none)."""
    global _uri
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    _uri = resolve_tracking_uri(cfg, tracking_uri)
    return _uri


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


_reachable: set[str] = set()  # stores checked by configure() in this process


def configure(cfg: Any = None, tracking_uri: Optional[str] = None, experiment: Optional[str] = None) -> Optional[str]:
    """Point mlflow at the tracking store (checked with ``check_reachable`` on first use in the process)
    and make sure the experiment exists; returns its id.

    A local store (sqlite/file) keeps artifacts in ``./mlartifacts`` (absolute path fixed when the
    experiment is created); a server keeps its own artifact location (``--artifacts-destination``).
    """
    if not enabled():
        return None
    import mlflow

    from .server import check_reachable

    uri = use(cfg, tracking_uri)
    if uri not in _reachable:  # once per process and store: a dead server fails here, named, in seconds
        check_reachable(tracking_uri=uri)
        _reachable.add(uri)
    mlflow.set_tracking_uri(uri)
    name = experiment or (cfg.tracking.experiment if cfg is not None else "lf2")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if _is_local_store(uri):
        location = Path(os.environ.get("LF2_MLFLOW_ARTIFACTS", DEFAULT_ARTIFACT_DIR)).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def client() -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=_uri or resolve_tracking_uri())


def set_uri(tracking_uri: Optional[str]) -> None:
    import mlflow

    mlflow.set_tracking_uri(use(tracking_uri=tracking_uri))
