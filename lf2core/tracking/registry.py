"""The model registry: log + register the evaluated teacher as an image-in pyfunc (alias ``candidate``),
the promotion gate that moves ``champion`` only to a better version (aliases, not the deprecated stages)
and refuses a version whose ONNX export parity failed, and the registry side of ``lf2 export`` /
``lf2 search`` (resolve and download a ``models:/`` URI, attach a report to a version)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from .runs import create_run, ended_on_error, log_model_metrics
from . import store
from .store import TrackingError, configure, enabled, mask, resolve_tracking_uri, set_uri
from .server import check_reachable

CANDIDATE_ALIAS = "candidate"
TARGET_METRIC = "mAP"
# MLflow 3's log_model links every run metric logged at its ``step`` (default 0: round 0's finetune loss ...)
# to the logged model; lf2 logs no metric at this step, and links the final evaluation explicitly instead
NO_METRICS_STEP = -1
PARITY_TAG = "lf2.onnx.parity"  # "passed" | "failed", set by `lf2 export`; promote refuses "failed"


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
    model_metrics: Optional[Mapping[str, float]] = None,
    model_metrics_step: int = 0,
) -> Optional[dict[str, Any]]:
    """Log an image-in pyfunc (``loader_module`` + ``data_path``, the lf2 serving model) with the
    signature ``image: binary`` -> float32 ``[-1, output_dim]`` and ``input_images`` (encoded images) as
    input example; register it as ``cfg.tracking.registered_model``, tag the version with ``tags`` and
    point ``alias`` at it; ``model_metrics`` are logged into the run linked to the logged model (its page
    shows them). Returns ``{"name", "version", "model_uri", "run_id", "alias", "model_id"}``; ``None`` when
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
            registered_model_name=name, pip_requirements=pip_requirements, step=NO_METRICS_STEP,
        )

    return _log_and_register(log, cfg, run_id, tags, alias, model_metrics, model_metrics_step)


def _log_and_register(log: Any, cfg: Any, run_id: Optional[str], tags: Optional[Mapping[str, Any]],
                      alias: str, model_metrics: Optional[Mapping[str, float]] = None,
                      model_metrics_step: int = 0) -> dict[str, Any]:
    import mlflow

    configure(cfg)
    name = cfg.tracking.registered_model
    own_run = run_id is None
    if own_run:
        run_id = create_run(cfg, run_name="register")
    with ended_on_error(run_id, end=own_run):
        with mlflow.start_run(run_id=run_id):
            info = log(name)
        model_id = getattr(info, "model_id", None) or ""
        log_model_metrics(run_id, model_id, model_metrics or {}, model_metrics_step)
        version = str(info.registered_model_version)
        client = store.client()
        for k, v in (tags or {}).items():
            client.set_model_version_tag(name, version, k, str(mask(v, k)))
        client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "model_uri": f"models:/{name}/{version}", "run_id": run_id,
            "alias": alias, "model_id": model_id}


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
    set_uri(tracking_uri)
    from mlflow.exceptions import MlflowException

    name = m["name"]
    try:
        if m["version"]:
            return name, str(store.client().get_model_version(name, m["version"]).version)
        return name, str(store.client().get_model_version_by_alias(name, m["alias"]).version)
    except MlflowException:
        raise TrackingError(f"{uri}: no such registered model version or alias at "
                            f"{mask(resolve_tracking_uri(tracking_uri=tracking_uri))}") from None


def download_model(uri: str, dst: Optional[str] = None, tracking_uri: Optional[str] = None) -> str:
    """Download the registered model ``uri`` (``models:/...``) into ``dst`` (default: a cache folder keyed
    by name and version); returns the local directory."""
    import mlflow.artifacts

    name, version = resolve_model_uri(uri, tracking_uri)
    if dst is None:
        from .. import storage

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
    set_uri(tracking_uri)
    client = store.client()
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
    """The target metric of a registered version: its ``metric.<name>`` tag, else its run's
    ``summary/target_<name>`` (``eval/<name>`` for runs logged before the metric catalogue)."""
    client = store.client()
    mv = client.get_model_version(model_name, version)
    tag = (mv.tags or {}).get(f"metric.{metric}")
    if tag not in (None, ""):
        try:
            return float(tag)
        except ValueError:
            pass
    if mv.run_id:
        metrics = client.get_run(mv.run_id).data.metrics
        for key in (f"summary/target_{metric}", f"eval/{metric}", metric):
            if key in metrics:
                return float(metrics[key])
    return None


def _version_by_alias(model_name: str, alias: str) -> Optional[str]:
    from mlflow.exceptions import MlflowException

    try:
        return str(store.client().get_model_version_by_alias(model_name, alias).version)
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
    set_uri(tracking_uri)
    from mlflow.exceptions import MlflowException

    client = store.client()
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
    set_uri(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        rm = store.client().get_registered_model(model_name)
    except MlflowException:
        return {}
    return {a: str(v) for a, v in (rm.aliases or {}).items()}




register_model = log_and_register_pyfunc  # the name used in docs/internal-api.md
