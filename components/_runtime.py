"""Helpers the KFP components call inside their container/subprocess (imported lazily there).

Kept out of the component bodies so each component stays a few typed lines; this module never imports
kfp (the artifacts are duck-typed: ``.path``, ``.uri``, ``.metadata``, ``.log_metric``).

Where a stage output lives:

- no object-store prefix: in the KFP artifact's own path (kfp.local: under the pipeline root; Kubeflow:
  the launcher uploads it to the pipeline root bucket);
- with ``object_prefix`` (``s3://bucket/prefix``): at ``<prefix>/<stage>/<key>`` where ``key`` hashes the
  stage inputs (config, input locations, round, MLflow run). The artifact then holds only a ``LOCATION``
  file and ``metadata["lf2_uri"]``; downstream components read from the URI.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

LOCATION_FILE = "LOCATION"
log = logging.getLogger("lf2.components")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


_config = None  # the config of this component (load_config), for the logging helpers called after the stage


def load_config(config_yaml: str):
    """The resolved config (YAML string produced by the ``resolve-config`` component)."""
    from lf2core import storage
    from lf2core.config import config_from_yaml

    from lf2core import tracking

    global _config
    cfg = _config = config_from_yaml(config_yaml)
    tracking.use(cfg)  # tracking.tracking_uri of the config, else $MLFLOW_TRACKING_URI, else ./mlflow.db
    if cfg.data.cache_dir:
        storage.set_cache_dir(cfg.data.cache_dir)
    return cfg


CODE_HEADER = "# lf2 code "


def code_fingerprint(roots: Optional[list[Path]] = None) -> str:
    """16 hex digits of SHA-256 over every ``.py`` file (relative path + bytes) of ``lf2core`` and ``components``.

    ``roots`` (for tests): the package directories to hash instead. Whatever the stages compute depends on
    this code, so it is part of the resolved config text (see ``resolve_config``)."""
    if roots is None:
        import lf2core

        roots = [Path(lf2core.__file__).resolve().parent, Path(__file__).resolve().parent]
    h = hashlib.sha256()
    for root in roots:
        root = Path(root)
        for p in sorted(root.rglob("*.py")):
            rel = p.relative_to(root)
            if "__pycache__" in rel.parts:
                continue
            h.update(f"{root.name}/{rel.as_posix()}".encode() + b"\0")
            h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def resolve_config(recipe: str, overrides_json: str, source_root: str, target_root: str, experiment: str,
                   compiled_rounds: int) -> str:
    """recipe + JSON list of ``key=value`` overrides + data URIs -> validated config as YAML.

    The text starts with a comment line ``# lf2 code <fingerprint> (lf2 <version>)`` (``code_fingerprint``):
    the config text is an input of every stage and part of their S3 output keys, so outputs computed by
    other code are never taken from the KFP cache (the task itself is never cached: its output must follow
    the recipe file and the code, not only the recipe's name)."""
    from lf2core import __version__
    from lf2core.config import ConfigError, load_config as _load

    try:
        overrides = json.loads(overrides_json or "[]")
    except json.JSONDecodeError as e:
        raise ConfigError(f"pipeline parameter 'overrides': not a JSON list of key=value strings ({e})") from None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError("pipeline parameter 'overrides': expected a JSON list of 'key=value' strings")
    if source_root:
        overrides.append(f"data.source.root={source_root}")
    if target_root:
        overrides.append(f"data.target.root={target_root}")
    if experiment:
        overrides.append(f"tracking.experiment={experiment}")
    cfg = _load(recipe, overrides)
    if compiled_rounds >= 0 and cfg.finetune.rounds != compiled_rounds:
        raise ConfigError(
            f"config key 'finetune.rounds': the pipeline was compiled for {compiled_rounds} rounds but the "
            f"config asks for {cfg.finetune.rounds}; recompile with `lf2 pipeline compile --rounds "
            f"{cfg.finetune.rounds}` (rounds are unrolled at compile time)"
        )
    from lf2core import tracking

    tracking.check_reachable(cfg)  # the first task: a dead MLflow fails here, before any training
    return f"{CODE_HEADER}{code_fingerprint()} (lf2 {__version__})\n" + cfg.to_yaml()


def input_location(artifact: Any) -> str:
    """Where an upstream stage output lives: its recorded URI, else the artifact's local path."""
    uri = (getattr(artifact, "metadata", None) or {}).get("lf2_uri")
    if uri:
        return str(uri)
    p = Path(artifact.path)
    if (p / LOCATION_FILE).is_file():
        return (p / LOCATION_FILE).read_text().strip()
    return str(p)


def record_output(artifact: Any, location: str, metrics: Optional[dict] = None) -> None:
    """Record ``location`` in the artifact (metadata + ``LOCATION`` file when remote) and small metrics."""
    md = artifact.metadata
    if location != artifact.path:
        p = Path(artifact.path)
        p.mkdir(parents=True, exist_ok=True)
        (p / LOCATION_FILE).write_text(location + "\n")
        md["lf2_uri"] = location
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            md[k] = float(v)


def log_kfp_metrics(out: Any, metrics: dict, keys: Optional[list[str]] = None) -> None:
    """Scalar metrics into a KFP ``Metrics`` artifact (shown in the run's UI).

    They are also written as JSON at the artifact's path: KFP's local cache treats an output whose file
    is missing as a cache miss, so a metadata-only artifact would defeat caching."""
    logged = {}
    for k, v in metrics.items():
        if keys is not None and k not in keys:
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out.log_metric(k, float(v))
            logged[k] = float(v)
    write_text(out, json.dumps(logged, indent=2, sort_keys=True) + "\n")


def local_file(location: str, name: str) -> Optional[Path]:
    """``location/name`` as a local file (downloaded when remote); None if missing."""
    from lf2core import storage
    from lf2core.errors import StorageError

    uri = storage.join(location, name)
    try:
        if not storage.exists(uri):
            return None
        return storage.local_path(uri)
    except StorageError:
        return None


def markdown_table(title: str, rows: list[tuple[str, Any]]) -> str:
    lines = [f"## {title}", "", "| metric | value |", "|---|---|"]
    for k, v in rows:
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


def write_text(artifact: Any, text: str) -> None:
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(text)


def png_html(title: str, png: Optional[Path], caption: str = "") -> str:
    if png is None or not png.is_file():
        return f"<html><body><h3>{title}</h3><p>no image</p></body></html>"
    b64 = base64.b64encode(png.read_bytes()).decode()
    return (f"<html><body><h3>{title}</h3><p>{caption}</p>"
            f"<img alt='{title}' src='data:image/png;base64,{b64}'/></body></html>")


def tracking_run(run_id: str) -> Optional[str]:
    return run_id or None


@contextlib.contextmanager
def failure_marks_run(run_id: str) -> Iterator[None]:
    """If the stage raises, mark the pipeline's MLflow run FAILED (a retry that succeeds logs on, and
    ``register`` closes the run FINISHED), then re-raise."""
    try:
        yield
    except BaseException:
        if run_id:
            from lf2core import tracking

            try:
                tracking.end_run(run_id, status="FAILED")
            except Exception as e:  # never hide the stage's own error
                log.warning("could not mark MLflow run %s FAILED: %s", run_id, e)
        raise


def env_summary() -> dict[str, Any]:
    """Non-secret facts about where a component ran (logged as MLflow tags by start-run)."""
    import platform

    return {"lf2.host": platform.node(), "lf2.image": os.environ.get("LF2_IMAGE", ""), "lf2.runner": "pipeline"}


def stage_location(default: str, object_prefix: str, name: str, config_yaml: str, uris: list[str] | tuple[str, ...],
                   round_index: Optional[int] = None, run_id: Optional[str] = None) -> str:
    """Where stage ``name`` writes: ``default`` (a KFP artifact path) without ``object_prefix``, else the
    deterministic ``<prefix>/<stage>/<key>`` keyed by the config, the input locations in table order,
    ``round_index`` and ``run_id`` when given (the same key whether the stage runs in its own task or in a
    several-rounds task)."""
    if not object_prefix:
        return default
    from lf2core import storage

    parts = [name, config_yaml, *uris] + ([round_index] if round_index is not None else []) \
        + ([run_id] if run_id is not None else [])
    key = hashlib.sha256(json.dumps([str(k) for k in parts]).encode()).hexdigest()[:16]
    return storage.join(object_prefix, name, key)


def run_stage(name: str, config_yaml: str, object_prefix: str, output: Any, inputs: dict[str, Any],
              run_id: Optional[str] = None, round_index: Optional[int] = None) -> tuple[Any, str, Any]:
    """Run stage ``name`` of ``lf2core.stages.table.STAGES`` inside its component: ``inputs`` are the KFP
    input artifacts by port name; the output goes to ``stage_location``; ``round_index`` is passed on when
    the stage takes it; a failure marks the pipeline's MLflow run FAILED. Returns (config, output
    location or "" for a stage without output, the stage's result)."""
    from lf2core.stages.table import stage

    st = stage(name)
    setup_logging()
    cfg = load_config(config_yaml)
    uris = [input_location(inputs[p.name]) for p in st.inputs]
    out = stage_location(output.path, object_prefix, st.name, config_yaml, uris, round_index, run_id) \
        if st.output is not None else ""
    params: dict[str, Any] = {}
    if any(p.name == "round_index" for p in st.params) and round_index is not None:
        params["round_index"] = round_index
    if any(p.name == "run_id" for p in st.params):
        params["run_id"] = tracking_run(run_id or "")
    from components.launch import run_stage_function  # in-process, torchrun or TrainJob (as compiled)
    from lf2core import tracking

    with failure_marks_run(run_id or ""), tracking.system_metrics(run_id or None):
        result = run_stage_function(st, cfg, config_yaml, uris, out, params)
    return cfg, out, result


def log_round_output(name: str, out: str, round_index: int, run_id: str) -> list[tuple[str, Any]]:
    """Log a round stage's output to the pipeline's MLflow run at step = round through
    ``lf2core.run_log.log_stage_output`` (the one logging point of the pipeline and run-local): after a
    finetune, the adaptation curve's point when ``eval.every_rounds`` says so (evaluated into a temporary
    directory). Uses the config of this component (``load_config``). Returns the (key, value) rows a
    summary table shows."""
    from lf2core import run_log

    rid = tracking_run(run_id)
    if not rid or _config is None:
        return []
    rows = run_log.log_stage_output(_config, name, out, round_index, rid, run_log.evaluate_in_temp(_config, rid))
    return [(k.rsplit("/", 2)[-2] + "/" + k.rsplit("/", 1)[-1] if k.count("/") > 2 else k, v) for k, v in rows]


def start_run(config_yaml: str, run_name: str, resume_run_id: str, data: Any, source_model: Any,
              pipeline_run: Optional[dict[str, str]] = None) -> str:
    """The start-run component: create (or resume) the pipeline's MLflow run with the config as params,
    lineage tags, dataset inputs, pretraining curves and the source-only curve point
    (``lf2core.run_log.log_run_start``); ``pipeline_run`` = ``{"name", "id"}`` of the KFP run (its job name
    and uuid, resolved by KFP) become the tags ``lf2.pipeline_run.name`` / ``.id`` (a resumed run gets the
    new KFP run's too). Returns the run id ("" when tracking is off)."""
    import time

    from lf2core import run_log, tracking

    setup_logging()
    cfg = load_config(config_yaml)
    if not tracking.enabled():
        return ""
    kfp_tags = {f"lf2.pipeline_run.{k}": v for k, v in (pipeline_run or {}).items() if v}
    if resume_run_id:
        tracking.configure(cfg)
        tracking.set_tags(kfp_tags, run_id=resume_run_id)
        return resume_run_id
    name = run_name or f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = tracking.create_run(cfg, name, env_summary()) or ""
    tracking.set_tags(kfp_tags, run_id=run_id or None)
    run_log.log_run_start(cfg, run_id, input_location(data), input_location(source_model))
    return run_id


def log_evaluation(cfg: Any, out: str, result: dict, run_id: str) -> None:
    """The evaluate component's MLflow part: the final teacher's metrics as the curve's last point and
    the ``summary/*`` metrics (``lf2core.run_log.log_final``)."""
    from lf2core import run_log

    run_log.log_final(cfg, tracking_run(run_id), result, out)


ROUNDS_INDEX = "rounds.json"


def run_rounds(config_yaml: str, object_prefix: str, run_id: str, first_round: int, num_rounds: int,
               data: Any, model: Any, rounds: Any, finetuned: Any) -> tuple[str, list[dict[str, Any]]]:
    """Rounds ``first_round .. first_round + num_rounds - 1`` (extract -> cluster -> finetune each) in this
    one process, through ``lf2core.stages.rounds.StageRunner``: each stage output where its own task would
    put it (``stage_location``; without ``object_prefix``, ``rounds/round_NN/<stage>`` and the last
    model in ``finetuned``), complete outputs skipped (a retried task resumes), every output logged to
    MLflow as the per-stage components do. Writes ``rounds/rounds.json`` (round -> stage -> location).
    Returns (the final model's location, the rounds' entries)."""
    from lf2core import kept_models
    from lf2core.stages.table import FINETUNE

    setup_logging()
    cfg = load_config(config_yaml)
    last = first_round + num_rounds - 1

    def place(name: str, r: int, inputs: tuple[str, ...]) -> str:
        default = finetuned.path if (name == FINETUNE and r == last) else \
            str(Path(rounds.path, f"round_{r:02d}", name))
        return stage_location(default, object_prefix, name, config_yaml, inputs, r, run_id)

    index: dict[str, dict[str, str]] = {}

    def after(name: str, r: int, out: str) -> None:
        index.setdefault(f"{r:02d}", {})[name] = out
        log_round_output(name, out, r, run_id)

    from components.launch import stage_runner  # the training stages as compiled (torchrun, TrainJob)
    from lf2core import tracking

    runner = stage_runner(cfg, config_yaml, after=after)
    location, entries = input_location(model), []
    with failure_marks_run(run_id or ""), kept_models.models_in_memory(), tracking.system_metrics(run_id or None):
        for r in range(first_round, last + 1):
            location, entry = runner.round(r, input_location(data), location, place)
            entries.append(entry)
    Path(rounds.path).mkdir(parents=True, exist_ok=True)
    (Path(rounds.path) / ROUNDS_INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    log.info("rounds %d..%d done in one task: %s", first_round, last,
             ", ".join(f"{k} {v:.1f}s" for k, v in sorted(runner.seconds.items())))
    return location, entries
