"""MLflow 3 tracking, registry and promotion: the only lf2core package that imports mlflow.

Layout in MLflow (chosen so that comparing pipeline runs in the UI is easy; docs/tracking.md):

- one MLflow run per pipeline run (or ``lf2 run-local --mlflow``), in experiment ``cfg.tracking.experiment``;
  params = the resolved config (``Config.flat()``, secrets masked); lineage tags and dataset inputs
  (``lineage``);
- metric keys namespaced by the unit of their step (``catalog``): ``epoch/*`` (pretraining),
  ``round/*`` (the adaptation curve ``round/target/*`` at step = rounds done, clustering, finetune,
  timing), ``summary/*`` (one value per run: what the runs table sorts by); what is logged when is
  decided by ``lf2core.run_log`` for the pipeline and run-local alike;
- artifacts: ``config.yaml``, ``report/`` (plots + summary, rebuilt each round), ``round_NN/stats.json``,
  ``eval/``, ``pretrain/metrics.json``;
- ``register`` logs the teacher as an MLflow pyfunc that takes images (``lf2core.serving.pyfunc``;
  signature + input example), registers it as ``lf2-reid``, tags the version with data/recipe/metrics
  and points the alias ``candidate`` at it; ``lf2 export`` attaches the ONNX file and its parity report
  to a version (tag ``lf2.onnx.parity``); ``promote`` moves ``champion`` only when the candidate beats
  the champion's target mAP and did not fail its export parity (aliases, not the deprecated stages).

Tracking URI: ``cfg.tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``
(artifacts of the local default in ``./mlartifacts``). ``LF2_TRACKING=off`` turns every function here
into a no-op (returning ``None``).

The package: ``store`` (which store, masking, HTTP limits, the client), ``server`` (reachability
check), ``runs`` (runs and what is logged into them), ``registry`` (register + promotion gate),
``catalog`` (metric keys, units, rounding; no mlflow import), ``lineage`` (tags, dataset inputs),
``compare`` (``lf2 compare``, UI links).
"""

from .registry import (CANDIDATE_ALIAS, PARITY_TAG, TARGET_METRIC, PromotionDecision, describe_aliases,
                       download_model, invalid_input, log_and_register_pyfunc, log_version_report, promote,
                       promote_main, register_model, resolve_model_uri, version_metric)
from .runs import (create_run, end_run, ended_on_error, log_artifact, log_metrics, log_model_metrics, log_params,
                   log_text, metric_history, read_artifact_text, run_tags, set_tags, start_run, system_metrics)
from .server import check_reachable
from .store import (DEFAULT_ARTIFACT_DIR, DEFAULT_TRACKING_URI, HEALTH_TIMEOUT, HTTP_DEFAULTS, TrackingError,
                    configure, enabled, flatten_metrics, mask, masked_params, resolve_tracking_uri, use)

__all__ = [
    "CANDIDATE_ALIAS", "PARITY_TAG", "DEFAULT_ARTIFACT_DIR", "DEFAULT_TRACKING_URI", "HEALTH_TIMEOUT", "HTTP_DEFAULTS", "TARGET_METRIC",
    "PromotionDecision", "TrackingError", "check_reachable", "configure", "create_run", "describe_aliases",
    "download_model", "enabled", "end_run", "ended_on_error", "flatten_metrics", "invalid_input",
    "log_and_register_pyfunc", "log_artifact", "log_version_report", "register_model", "resolve_model_uri",
    "log_metrics", "log_params", "log_text", "mask", "masked_params", "promote", "promote_main",
    "resolve_tracking_uri", "set_tags", "start_run", "use", "version_metric", "log_model_metrics", "metric_history",
    "read_artifact_text", "run_tags", "system_metrics",
]
