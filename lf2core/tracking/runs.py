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
    run = client().create_run(exp_id, tags=all_tags)
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
