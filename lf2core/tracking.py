"""MLflow 3 tracking, registry and promotion: the only lf2core module that imports mlflow.

Layout in MLflow (chosen so that comparing pipeline runs in the UI is easy):

- one MLflow run per pipeline run, in experiment ``cfg.tracking.experiment``; params = the resolved
  config (``Config.flat()``, secrets masked), tags ``lf2.recipe``, ``lf2.source``, ``lf2.target``;
- every stage logs into that run with ``step = round index``: ``pretrain/...`` (step = epoch),
  ``cluster/<set>/clusters``, ``cluster/<set>/outlier_ratio``, ``cluster/<set>/nmi|ari``,
  ``finetune/...`` losses, ``eval/mAP``, ``eval/R1`` ... so the metric charts show curves over rounds
  and the runs table compares final values;
- artifacts: ``config.yaml``, ``round_XX/cluster_stats.png``, ``eval/ranklist.png``, ``*/metrics.json``;
- ``register`` logs the teacher as an MLflow pyfunc that takes images (``lf2core.serving.pyfunc``;
  signature + input example), registers it as ``lf2-reid``, tags the version with data/recipe/metrics
  and points the alias ``candidate`` at it; ``lf2 export`` attaches the ONNX file and its parity report
  to a version (tag ``lf2.onnx.parity``);
  ``promote`` moves ``champion`` only when the candidate beats the champion's target mAP and did not
  fail its export parity (aliases, not the deprecated stages).

Tracking URI: ``cfg.tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``
(artifacts of the local default in ``./mlartifacts``). ``LF2_TRACKING=off`` turns every function here
into a no-op (returning ``None``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from .errors import Lf2Error

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
CANDIDATE_ALIAS = "candidate"
TARGET_METRIC = "mAP"
PARITY_TAG = "lf2.onnx.parity"  # "passed" | "failed", set by `lf2 export`; promote refuses "failed"

_SECRET_KEY = re.compile(r"(key|secret|token|passw(or)?d|credential|auth)", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:[^=&]*(?:key|secret|token|signature|password)[^=&]*)=)[^&\s]+")


class TrackingError(Lf2Error):
    """The tracking server/registry refused an operation, or the model/alias asked for does not exist."""


# ============================================================================================ helpers
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


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def configure(cfg: Any = None, tracking_uri: Optional[str] = None, experiment: Optional[str] = None) -> Optional[str]:
    """Point mlflow at the tracking store and make sure the experiment exists; returns its id.

    A local store (sqlite/file) keeps artifacts in ``./mlartifacts`` (absolute path fixed when the
    experiment is created); a server keeps its own artifact location (``--artifacts-destination``).
    """
    if not enabled():
        return None
    import mlflow

    uri = use(cfg, tracking_uri)
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


def _client() -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=_uri or resolve_tracking_uri())


# ============================================================================================ runs
def create_run(cfg: Any, run_name: Optional[str] = None, tags: Optional[Mapping[str, str]] = None,
               experiment: Optional[str] = None) -> Optional[str]:
    """Create the pipeline's parent run (not left active in this process); logs params and config.yaml."""
    if not enabled():
        return None
    exp_id = configure(cfg, experiment=experiment)
    all_tags = {"lf2.recipe": str(cfg.recipe), "lf2.source": f"{cfg.data.source.name}:{mask(cfg.data.source.root)}",
                "lf2.target": f"{cfg.data.target.name}:{mask(cfg.data.target.root)}"}
    all_tags.update(tags or {})
    if run_name:
        all_tags["mlflow.runName"] = run_name
    run = _client().create_run(exp_id, tags=all_tags)
    run_id = run.info.run_id
    log_params(cfg.flat(), run_id=run_id)
    log_text(_masked_yaml(cfg), "config.yaml", run_id=run_id)
    return run_id


def _masked_yaml(cfg: Any) -> str:
    import yaml

    def walk(d: Any, prefix: str = "") -> Any:
        if isinstance(d, dict):
            return {k: walk(v, f"{prefix}{k}.") for k, v in d.items()}
        return mask(d, prefix.rstrip("."))

    return yaml.safe_dump(walk(cfg.to_dict()), sort_keys=False)


@contextlib.contextmanager
def start_run(cfg: Any, run_name: Optional[str] = None, tags: Optional[Mapping[str, str]] = None,
              run_id: Optional[str] = None) -> Iterator[Optional[str]]:
    """Context: an active MLflow run (new, or ``run_id`` resumed) yielding its id; ``None`` if disabled.

    The run ends FINISHED on success, FAILED if the block raises (KILLED on Ctrl-C), the error as the
    tag ``lf2.error``.
    """
    if not enabled():
        yield None
        return
    import mlflow

    configure(cfg)
    if run_id is None:
        run_id = create_run(cfg, run_name, tags)
    with ended_on_error(run_id, end=False):
        with mlflow.start_run(run_id=run_id) as run:
            yield run.info.run_id


def end_run(run_id: Optional[str], status: str = "FINISHED") -> None:
    if not enabled() or not run_id:
        return
    _client().set_terminated(run_id, status=status)


@contextlib.contextmanager
def ended_on_error(run_id: Optional[str], end: bool = True) -> Iterator[None]:
    """On an exception in the block, end ``run_id`` FAILED (KILLED on Ctrl-C / SIGTERM-as-SystemExit) with
    the error as the tag ``lf2.error``, then re-raise; on success end it FINISHED when ``end``. A tracking
    server that is itself the failure is logged, not allowed to hide the original error."""
    try:
        yield
    except BaseException as e:
        if enabled() and run_id:
            status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
            try:
                _client().set_tag(run_id, "lf2.error", mask(f"{type(e).__name__}: {e}")[:4000])
                end_run(run_id, status)
            except Exception as te:  # noqa: BLE001 - the original error matters more
                log.warning("could not mark MLflow run %s %s (%s)", run_id, status, te)
        raise
    if end:
        end_run(run_id)


def log_params(params: Mapping[str, Any], run_id: Optional[str] = None) -> None:
    if not enabled():
        return
    run_id = run_id or _active_run_id()
    if not run_id:
        return
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in masked_params(params).items()]
    for i in range(0, len(items), 100):
        _client().log_batch(run_id, params=items[i:i + 100])


def log_metrics(metrics: Mapping[str, Any], step: Optional[int] = None, run_id: Optional[str] = None,
                prefix: str = "") -> dict[str, float]:
    """Log the numeric leaves of ``metrics`` (nested dicts flattened with ``/``) at ``step``.

    Returns the flat dict that was logged (empty when disabled or no run)."""
    if not enabled():
        return {}
    run_id = run_id or _active_run_id()
    if not run_id:
        return {}
    import time

    from mlflow.entities import Metric

    flat = flatten_metrics(metrics, prefix)
    ts = int(time.time() * 1000)
    items = [Metric(k, v, ts, int(step or 0)) for k, v in flat.items()]
    for i in range(0, len(items), 500):
        _client().log_batch(run_id, metrics=items[i:i + 500])
    return flat


def log_artifact(path: str | os.PathLike, artifact_path: Optional[str] = None, run_id: Optional[str] = None) -> None:
    if not enabled():
        return
    run_id = run_id or _active_run_id()
    if not run_id or not Path(path).exists():
        return
    if Path(path).is_dir():
        _client().log_artifacts(run_id, str(path), artifact_path)
    else:
        _client().log_artifact(run_id, str(path), artifact_path)


def log_text(text: str, artifact_file: str, run_id: Optional[str] = None) -> None:
    if not enabled():
        return
    run_id = run_id or _active_run_id()
    if run_id:
        _client().log_text(run_id, text, artifact_file)


def set_tags(tags: Mapping[str, Any], run_id: Optional[str] = None) -> None:
    if not enabled():
        return
    run_id = run_id or _active_run_id()
    for k, v in (tags or {}).items():
        if run_id:
            _client().set_tag(run_id, k, str(mask(v, k)))


def _active_run_id() -> Optional[str]:
    if "mlflow" not in sys.modules:
        return None
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


# ============================================================================================ registry
def log_and_register_pyfunc(
    loader_module: str,
    data_path: str,
    input_images: list[bytes],
    output_dim: int,
    *,
    cfg: Any,
    run_id: Optional[str] = None,
    tags: Optional[Mapping[str, Any]] = None,
    alias: str = CANDIDATE_ALIAS,
    code_paths: Optional[list[str]] = None,
    pip_requirements: Optional[list[str]] = None,
) -> Optional[dict[str, Any]]:
    """Log an image-in pyfunc (``loader_module`` + ``data_path``, the lf2 serving model) with the
    signature ``image: binary`` -> float32 ``[-1, output_dim]`` and ``input_images`` (encoded images) as
    input example; register it as ``cfg.tracking.registered_model``, tag the version with ``tags`` and
    point ``alias`` at it. Returns ``{"name", "version", "model_uri", "run_id", "alias"}``; ``None`` when
    tracking is off."""
    if not enabled():
        return None
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    signature = ModelSignature(inputs=Schema([ColSpec(DataType.binary, "image")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(output_dim)))]))

    def log(name: str) -> Any:
        return mlflow.pyfunc.log_model(
            name="model", loader_module=loader_module, data_path=data_path, code_paths=code_paths,
            signature=signature, input_example=pd.DataFrame({"image": list(input_images)}),
            registered_model_name=name, pip_requirements=pip_requirements,
        )

    return _log_and_register(log, cfg, run_id, tags, alias)


def _log_and_register(log: Any, cfg: Any, run_id: Optional[str], tags: Optional[Mapping[str, Any]],
                      alias: str) -> dict[str, Any]:
    import mlflow

    configure(cfg)
    name = cfg.tracking.registered_model
    own_run = run_id is None
    if own_run:
        run_id = create_run(cfg, run_name="register")
    with ended_on_error(run_id, end=own_run):
        with mlflow.start_run(run_id=run_id):
            info = log(name)
        version = str(info.registered_model_version)
        client = _client()
        for k, v in (tags or {}).items():
            client.set_model_version_tag(name, version, k, str(mask(v, k)))
        client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "model_uri": f"models:/{name}/{version}", "run_id": run_id,
            "alias": alias}


def invalid_input(message: str) -> Exception:
    """The exception a served model raises for a bad request: the scoring server answers HTTP 400 with
    ``message`` (an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[0-9]+)|@(?P<alias>[^/]+))/?$")


def resolve_model_uri(uri: str, tracking_uri: Optional[str] = None) -> tuple[str, str]:
    """``(name, version)`` of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``; TrackingError otherwise."""
    m = _MODEL_URI.match(str(uri))
    if not m:
        raise TrackingError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    if not enabled():
        raise TrackingError(f"{uri}: tracking is disabled (LF2_TRACKING=off)")
    check_reachable(tracking_uri=tracking_uri)
    _set_uri(tracking_uri)
    from mlflow.exceptions import MlflowException

    name = m["name"]
    try:
        if m["version"]:
            return name, str(_client().get_model_version(name, m["version"]).version)
        return name, str(_client().get_model_version_by_alias(name, m["alias"]).version)
    except MlflowException:
        raise TrackingError(f"{uri}: no such registered model version or alias at "
                            f"{mask(resolve_tracking_uri(tracking_uri=tracking_uri))}") from None


def download_model(uri: str, dst: Optional[str] = None, tracking_uri: Optional[str] = None) -> str:
    """Download the registered model ``uri`` (``models:/...``) into ``dst`` (default: a cache folder keyed
    by name and version); returns the local directory."""
    import mlflow.artifacts

    name, version = resolve_model_uri(uri, tracking_uri)
    if dst is None:
        from . import storage

        key = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{mask(resolve_tracking_uri(tracking_uri=tracking_uri))}")
        dst = str(storage.cache_dir() / "models" / key[-80:] / f"{name}-v{version}")
    done = Path(dst) / ".complete"
    if done.is_file():
        return dst
    Path(dst).mkdir(parents=True, exist_ok=True)
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=dst)
    done.write_text("")
    return dst


def log_version_report(model_name: str, version: str, files: Mapping[str, str], artifact_path: str,
                       tags: Mapping[str, Any], location_tag: str = "",
                       tracking_uri: Optional[str] = None) -> Optional[str]:
    """Attach ``files`` (local paths) to a registered version -- logged under ``artifact_path`` in the
    version's run -- and set ``tags`` on the version (``location_tag``: also a tag holding where the files
    went); returns the artifact URI (``runs:/...``)."""
    if not enabled():
        return None
    _set_uri(tracking_uri)
    client = _client()
    mv = client.get_model_version(model_name, version)
    where = None
    if mv.run_id:
        for path in files.values():
            client.log_artifact(mv.run_id, str(path), artifact_path)
        where = f"runs:/{mv.run_id}/{artifact_path}"
    for k, v in tags.items():
        client.set_model_version_tag(model_name, version, k, str(mask(v, k)))
    if where and location_tag:
        client.set_model_version_tag(model_name, version, location_tag, where)
    return where


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    model_name: str
    version: Optional[str] = None
    alias: str = "champion"
    candidate_metric: Optional[float] = None
    champion_version: Optional[str] = None
    champion_metric: Optional[float] = None
    details: dict[str, Any] = field(default_factory=dict)


def version_metric(model_name: str, version: str, metric: str = TARGET_METRIC) -> Optional[float]:
    """The target metric of a registered version: its ``metric.<name>`` tag, else its run's ``eval/<name>``."""
    client = _client()
    mv = client.get_model_version(model_name, version)
    tag = (mv.tags or {}).get(f"metric.{metric}")
    if tag not in (None, ""):
        try:
            return float(tag)
        except ValueError:
            pass
    if mv.run_id:
        metrics = client.get_run(mv.run_id).data.metrics
        for key in (f"eval/{metric}", metric):
            if key in metrics:
                return float(metrics[key])
    return None


def _version_by_alias(model_name: str, alias: str) -> Optional[str]:
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def promote(
    version: Optional[str] = None,
    alias: str = "champion",
    min_map: Optional[float] = None,
    force: bool = False,
    model_name: str = "lf2-reid",
    tracking_uri: Optional[str] = None,
    metric: str = TARGET_METRIC,
) -> PromotionDecision:
    """Move ``alias`` to ``version`` (default: the ``candidate`` alias) if it earns it.

    Gate (skipped with ``force``): the version must not have failed its ONNX export parity check (tag
    ``lf2.onnx.parity=failed``; forcing over it is recorded as the tag ``lf2.forced_over``), the
    candidate's target mAP must be known, at least ``min_map`` when given, and strictly greater than the
    current holder's mAP. The decision says why in ``reason``.
    """
    if not enabled():
        return PromotionDecision(False, "tracking is disabled (LF2_TRACKING=off)", model_name, version, alias)
    check_reachable(tracking_uri=tracking_uri)
    _set_uri(tracking_uri)
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        raise TrackingError(f"registered model '{model_name}' does not exist at "
                            f"{mask(resolve_tracking_uri(tracking_uri=tracking_uri))}") from None
    if version is None:
        version = _version_by_alias(model_name, CANDIDATE_ALIAS)
        if version is None:
            raise TrackingError(f"model '{model_name}' has no '{CANDIDATE_ALIAS}' alias; pass --version")
    try:
        client.get_model_version(model_name, version)
    except MlflowException:
        raise TrackingError(f"model '{model_name}' has no version {version}") from None
    cand = version_metric(model_name, version, metric)
    holder = _version_by_alias(model_name, alias)
    held = version_metric(model_name, holder, metric) if holder else None
    d = PromotionDecision(False, "", model_name, version, alias, cand, holder, held)
    if holder == version:
        d.reason = f"version {version} already holds '{alias}'"
        return d
    parity = (client.get_model_version(model_name, version).tags or {}).get(PARITY_TAG)
    if not force:
        if parity == "failed":
            d.reason = (f"version {version} failed its ONNX export parity check ({PARITY_TAG}=failed; see "
                        f"`lf2 export` and the version's parity report); use --force to promote anyway")
            return d
        if cand is None:
            d.reason = f"version {version} has no {metric} recorded; cannot compare (use --force)"
            return d
        if min_map is not None and cand < min_map:
            d.reason = f"version {version} {metric} {cand:.4f} is below the floor {min_map:.4f}"
            return d
        if holder is not None and held is not None and not cand > held:
            d.reason = (f"version {version} {metric} {cand:.4f} does not beat '{alias}' version {holder} "
                        f"{metric} {held:.4f}")
            return d
    client.set_registered_model_alias(model_name, alias, version)
    client.set_model_version_tag(model_name, version, f"lf2.promoted_to_{alias}", "forced" if force else "gated")
    if force and parity == "failed":
        client.set_model_version_tag(model_name, version, "lf2.forced_over", f"{PARITY_TAG}=failed")
    d.promoted = True
    if force:
        d.reason = f"forced: '{alias}' -> version {version}"
    elif holder is None:
        d.reason = f"no '{alias}' yet: version {version} ({metric} {cand:.4f}) becomes '{alias}'"
    elif held is None:
        d.reason = f"'{alias}' version {holder} has no {metric}: version {version} ({metric} {cand:.4f}) replaces it"
    else:
        d.reason = (f"version {version} {metric} {cand:.4f} beats version {holder} {metric} {held:.4f}: "
                    f"'{alias}' -> {version}")
    return d


def _set_uri(tracking_uri: Optional[str]) -> None:
    import mlflow

    mlflow.set_tracking_uri(use(tracking_uri=tracking_uri))


def promote_main(version: Optional[str] = None, alias: str = "champion", min_map: Optional[float] = None,
                 force: bool = False, model_name: str = "lf2-reid", tracking_uri: Optional[str] = None) -> int:
    """``lf2 promote``: prints the decision; exit 0 if the alias moved (or already there), 1 if refused."""
    d = promote(version, alias, min_map, force, model_name, tracking_uri)
    word = "promoted" if d.promoted else "not promoted"
    print(f"lf2 promote: {word}: {d.reason}")
    if d.promoted or d.reason.endswith(f"already holds '{alias}'"):
        return 0
    return 1


def describe_aliases(model_name: str = "lf2-reid", tracking_uri: Optional[str] = None) -> dict[str, str]:
    """``{alias: version}`` of a registered model (empty when disabled or missing)."""
    if not enabled():
        return {}
    _set_uri(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        rm = _client().get_registered_model(model_name)
    except MlflowException:
        return {}
    return {a: str(v) for a, v in (rm.aliases or {}).items()}


register_model = log_and_register_pyfunc  # the name used in docs/internal-api.md
