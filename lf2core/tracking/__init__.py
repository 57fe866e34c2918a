"""MLflow 3 tracking, registry and promotion: the only lf2core package that imports mlflow.

Layout in MLflow (chosen so that comparing pipeline runs in the UI is easy):

- one MLflow run per pipeline run, in experiment ``cfg.tracking.experiment``; params = the resolved
  config (``Config.flat()``, secrets masked), tags ``lf2.recipe``, ``lf2.source``, ``lf2.target``;
- every stage logs into that run with ``step = round index``: ``pretrain/...`` (step = epoch),
  ``cluster/<set>/clusters``, ``cluster/<set>/outlier_ratio``, ``cluster/<set>/nmi|ari``,
  ``finetune/...`` losses, ``eval/mAP``, ``eval/R1`` ... so the metric charts show curves over rounds
  and the runs table compares final values;
- artifacts: ``config.yaml``, ``round_XX/cluster_stats.png``, ``eval/ranklist.png``, ``*/metrics.json``;
- ``register`` logs the teacher as an MLflow PyTorch model (signature + input example), registers it
  as ``lf2-reid``, tags the version with data/recipe/metrics and points the alias ``candidate`` at it;
  ``promote`` moves ``champion`` only when the candidate beats the champion's target mAP (aliases, not
  the deprecated stages).

Tracking URI: ``cfg.tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``
(artifacts of the local default in ``./mlartifacts``). ``LF2_TRACKING=off`` turns every function here
into a no-op (returning ``None``).

The package: ``store`` (which store, masking, HTTP limits, the client), ``server`` (reachability
check), ``runs`` (runs and what is logged into them), ``registry`` (register + promotion gate).
"""

from .registry import (CANDIDATE_ALIAS, TARGET_METRIC, PromotionDecision, describe_aliases, log_and_register_model,
                       promote, promote_main, version_metric)
from .runs import (create_run, end_run, ended_on_error, log_artifact, log_metrics, log_params, log_text, set_tags,
                   start_run)
from .server import check_reachable
from .store import (DEFAULT_ARTIFACT_DIR, DEFAULT_TRACKING_URI, HEALTH_TIMEOUT, HTTP_DEFAULTS, TrackingError,
                    configure, enabled, flatten_metrics, mask, masked_params, resolve_tracking_uri, use)

__all__ = [
    "CANDIDATE_ALIAS", "DEFAULT_ARTIFACT_DIR", "DEFAULT_TRACKING_URI", "HEALTH_TIMEOUT", "HTTP_DEFAULTS", "TARGET_METRIC",
    "PromotionDecision", "TrackingError", "check_reachable", "configure", "create_run", "describe_aliases",
    "enabled", "end_run", "ended_on_error", "flatten_metrics", "log_and_register_model", "log_artifact",
    "log_metrics", "log_params", "log_text", "mask", "masked_params", "promote", "promote_main",
    "resolve_tracking_uri", "set_tags", "start_run", "use", "version_metric",
]
