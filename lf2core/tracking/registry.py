"""The model registry: log + register the evaluated teacher (alias ``candidate``), and the promotion gate
that moves ``champion`` only to a better version (aliases, not the deprecated stages)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .runs import create_run, ended_on_error
from . import store
from .store import TrackingError, configure, enabled, mask, resolve_tracking_uri, set_uri
from .server import check_reachable

CANDIDATE_ALIAS = "candidate"
TARGET_METRIC = "mAP"


def log_and_register_model(
    model: Any,
    input_example: Any,
    *,
    cfg: Any,
    run_id: Optional[str] = None,
    tags: Optional[Mapping[str, Any]] = None,
    alias: str = CANDIDATE_ALIAS,
    code_paths: Optional[list[str]] = None,
    pip_requirements: Optional[list[str]] = None,
) -> Optional[dict[str, Any]]:
    """Log ``model`` (torch ``nn.Module`` in eval mode) as an MLflow PyTorch model with a signature
    inferred from ``input_example`` (numpy float32 [1, 3, H, W]) -> output [1, D]; register it as
    ``cfg.tracking.registered_model``; tag the version and point ``alias`` at it.

    Returns ``{"name", "version", "model_uri", "run_id", "alias"}``; ``None`` when tracking is off.
    """
    if not enabled():
        return None
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    configure(cfg)
    name = cfg.tracking.registered_model
    with torch.no_grad():
        output = model(torch.as_tensor(input_example)).detach().cpu().numpy()
    signature = infer_signature(input_example, output)
    own_run = run_id is None
    if own_run:
        run_id = create_run(cfg, run_name="register")
    with ended_on_error(run_id, end=own_run):
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model, name="model", signature=signature, input_example=input_example,
                registered_model_name=name, code_paths=code_paths, pip_requirements=pip_requirements,
                serialization_format="pickle",  # torch.export (pt2) would specialise the batch size
            )
        version = str(info.registered_model_version)
        client = store.client()
        for k, v in (tags or {}).items():
            client.set_model_version_tag(name, version, k, str(mask(v, k)))
        client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "model_uri": f"models:/{name}/{version}", "run_id": run_id,
            "alias": alias}


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
        for key in (f"eval/{metric}", metric):
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

    Gate (skipped with ``force``): the candidate's target mAP must be known, at least ``min_map`` when
    given, and strictly greater than the current holder's mAP. The decision says why in ``reason``.
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
    if not force:
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


register_model = log_and_register_model  # the name used in docs/internal-api.md
