"""MLflow runs: the pipeline's run, params/metrics/artifacts/tags logged into it, and its end status
(never left RUNNING after an error)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from .store import client, configure, enabled, flatten_metrics, mask, masked_params

log = logging.getLogger("lf2core.tracking")
# MLflow 3's UI shows an experiment as GenAI (traces) or model training by this tag
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def create_run(cfg: Any, run_name: Optional[str] = None, tags: Optional[Mapping[str, str]] = None,
               experiment: Optional[str] = None) -> Optional[str]:
    """Create the pipeline's parent run (not left active in this process); logs params and config.yaml."""
    if not enabled():
        return None
    from .lineage import lineage_tags

    exp_id = configure(cfg, experiment=experiment)
    c = client()
    if EXPERIMENT_KIND_TAG not in c.get_experiment(exp_id).tags:  # the UI opens on the training runs
        c.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    all_tags = lineage_tags(cfg)
    all_tags.update(tags or {})
    if run_name:
        all_tags["mlflow.runName"] = run_name
    run = c.create_run(exp_id, tags={k: str(mask(v, k)) for k, v in all_tags.items()})
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
    client().set_terminated(run_id, status=status)


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
                client().set_tag(run_id, "lf2.error", mask(f"{type(e).__name__}: {e}")[:4000])
                end_run(run_id, status)
            except Exception as te:  # noqa: BLE001 - the original error matters more
                log.warning("could not mark MLflow run %s %s (%s)", run_id, status, te)
        raise
    if end:
        end_run(run_id)


def log_params(params: Mapping[str, Any], run_id: Optional[str] = None) -> None:
    if not enabled():
        return
    run_id = run_id or active_run_id()
    if not run_id:
        return
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in masked_params(params).items()]
    for i in range(0, len(items), 100):
        client().log_batch(run_id, params=items[i:i + 100])


def log_metrics(metrics: Mapping[str, Any], step: Optional[int] = None, run_id: Optional[str] = None,
                prefix: str = "") -> dict[str, float]:
    """Log the numeric leaves of ``metrics`` (nested dicts flattened with ``/``) at ``step``.

    Returns the flat dict that was logged (empty when disabled or no run)."""
    if not enabled():
        return {}
    run_id = run_id or active_run_id()
    if not run_id:
        return {}
    import time

    from mlflow.entities import Metric

    flat = flatten_metrics(metrics, prefix)
    ts = int(time.time() * 1000)
    items = [Metric(k, v, ts, int(step or 0)) for k, v in flat.items()]
    for i in range(0, len(items), 500):
        client().log_batch(run_id, metrics=items[i:i + 500])
    return flat


def log_artifact(path: str | os.PathLike, artifact_path: Optional[str] = None, run_id: Optional[str] = None) -> None:
    if not enabled():
        return
    run_id = run_id or active_run_id()
    if not run_id or not Path(path).exists():
        return
    if Path(path).is_dir():
        client().log_artifacts(run_id, str(path), artifact_path)
    else:
        client().log_artifact(run_id, str(path), artifact_path)


def log_text(text: str, artifact_file: str, run_id: Optional[str] = None) -> None:
    if not enabled():
        return
    run_id = run_id or active_run_id()
    if run_id:
        client().log_text(run_id, text, artifact_file)


def set_tags(tags: Mapping[str, Any], run_id: Optional[str] = None) -> None:
    if not enabled():
        return
    run_id = run_id or active_run_id()
    for k, v in (tags or {}).items():
        if run_id:
            client().set_tag(run_id, k, str(mask(v, k)))


def active_run_id() -> Optional[str]:
    if "mlflow" not in sys.modules:
        return None
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def metric_history(run_id: Optional[str],
                   prefixes: tuple[str, ...] = ("round/",)) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` of the run's metrics whose key starts with one of ``prefixes``
    (``{}`` when disabled or no run)."""
    if not enabled() or not run_id:
        return {}
    c = client()
    keys = [k for k in c.get_run(run_id).data.metrics if k.startswith(prefixes)]
    return {k: sorted((int(m.step), float(m.value)) for m in c.get_metric_history(run_id, k)) for k in keys}


def run_tags(run_id: Optional[str]) -> dict[str, str]:
    """The tags of ``run_id`` (``{}`` when disabled or no run)."""
    if not enabled() or not run_id:
        return {}
    return dict(client().get_run(run_id).data.tags)


def read_artifact_text(run_id: Optional[str], path: str) -> Optional[str]:
    """The text of the run's artifact ``path``; None when missing (or tracking is off)."""
    if not enabled() or not run_id:
        return None
    import tempfile

    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="lf2-artifact-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                                        tracking_uri=client().tracking_uri)
        except Exception:  # noqa: BLE001 - missing artifact: MlflowException or an OSError from the store
            return None
        return Path(local).read_text()


@contextlib.contextmanager
def system_metrics(run_id: Optional[str], interval_s: Optional[float] = None) -> Iterator[None]:
    """Log MLflow system metrics (``system/*``: CPU, memory, disk, network; GPU when ``pynvml`` is
    installed) into ``run_id`` every ``interval_s`` seconds (default ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
    or 10) while the block runs; steps continue those of earlier stages of the run (``resume_logging``).
    No-op without a run or tracking."""
    if not enabled() or not run_id:
        yield
        return
    if interval_s is None:
        interval_s = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "") or 10.0)
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                       tracking_uri=client().tracking_uri)
        monitor.start()
    except Exception as e:  # noqa: BLE001 - monitoring must never fail a stage (e.g. psutil missing)
        log.warning("system metrics not logged: %s", e)
        yield
        return
    try:
        yield
    finally:
        try:
            monitor.finish()
        except Exception as e:  # noqa: BLE001
            log.warning("system metrics monitor did not stop cleanly: %s", e)


def log_model_metrics(run_id: str, model_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """``metrics`` (already designed: ``catalog.design``) logged into ``run_id`` AND linked to the logged
    model ``model_id``, so the model's page in MLflow shows them."""
    if not enabled() or not run_id or not model_id or not metrics:
        return
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), ts, int(step), model_id=model_id)
                                        for k, v in metrics.items()])
