"""What a run logs to MLflow, decided in ONE place for the pipeline and ``lf2 run-local``.

The pipeline's components (``components/_runtime``: start-run, every round stage, evaluate) and
``lf2core.stages.run_local`` call these functions; the keys, units and rounding are those of
``lf2core.tracking.catalog`` (docs/tracking.md):

- ``log_run_start``: lineage tags and dataset inputs, the pretraining curves (``epoch/*``) and the first
  point of the adaptation curve: ``round/target/*`` at step 0 = the source model on the target (the
  pretrain output's report);
- ``log_stage_output``: a round stage's output at step = round (``round/extract|cluster|finetune|time``);
  after a finetune, when ``curve_due``, the teacher is evaluated on the target test split
  (``evaluate_round``) and logged as ``round/target/*`` at step = rounds done -- REPORT ONLY, nothing
  reads it back to select anything;
- ``log_final``: the final teacher's evaluation as the curve's last point and as ``summary/*`` (what the
  runs table sorts by); returns the summary for the registered model;
- ``refresh_report``: the plots (``report/clustering.png``, ``report/target_curve.png``,
  ``report/run_summary.png``, ``report/ranklist.png``) and ``report/summary.md`` / ``summary.html``,
  rebuilt from the run's metric history after every clustering and evaluation.

Every function is a no-op without a run id (tracking off).
"""

from __future__ import annotations

import base64
import json
import logging
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from . import artifacts, storage, tracking
from .tracking import catalog, lineage

log = logging.getLogger(__name__)

EvaluateRound = Callable[[int, str], tuple[dict[str, Any], str]]  # (round, model) -> (metrics, eval dir)
REPORT_DIR = "report"


def curve_due(every_rounds: int, r: int, rounds: int) -> bool:
    """Evaluate the teacher after round ``r`` (0-based) for the curve: every ``every_rounds`` rounds,
    except after the last round (the evaluate stage measures that one); never when ``every_rounds`` <= 0."""
    return every_rounds > 0 and (r + 1) % every_rounds == 0 and r + 1 < rounds


def _log(metrics: Mapping[str, float], step: int, run_id: Optional[str]) -> dict[str, float]:
    return tracking.log_metrics(dict(metrics), step=step, run_id=run_id)


def _read_json(uri: str) -> Optional[dict]:
    return artifacts.read_json(uri) if storage.exists(uri) else None


def log_run_start(cfg: Any, run_id: Optional[str], data: str, source_model: str) -> None:
    """Lineage tags + dataset inputs of ``data`` (a prepare-data output), the pretraining history of
    ``source_model`` (``epoch/*``), the source-only point ``round/target/*`` at step 0 and
    ``summary/source_only_*`` / ``summary/source_*``."""
    if not run_id:
        return
    tags = lineage.lineage_tags(cfg, data, source_model)
    tags["lf2.source_model.digest"] = lineage.model_digest(source_model)
    manifest = _read_json(storage.join(data, artifacts.MANIFEST))
    if manifest is not None:
        lineage.log_datasets(run_id, manifest, cfg, data)
        for side in ("source", "target"):
            for split in ("train", "query", "gallery"):
                tags[f"lf2.data.{side}_{split}_images"] = str(len(manifest.get(side, {}).get(split, [])))
    tracking.set_tags(tags, run_id=run_id)
    pm = _read_json(storage.join(source_model, artifacts.METRICS))
    if pm is None:
        return
    for row in pm.get("history", []):
        _log(catalog.pretrain_epoch(row), int(row.get("epoch", 0)), run_id)
    final = pm.get("final", {})
    source_only = {k[len("target_"):]: v for k, v in final.items() if k.startswith("target_")}
    _log(catalog.target_round(source_only), 0, run_id)
    summary = {f"summary/source_only_{k}": v for k, v in source_only.items() if k in catalog.RETRIEVAL}
    summary.update({f"summary/source_{k}": final[k] for k in catalog.RETRIEVAL if k in final})
    _log(catalog.design(summary), 0, run_id)
    with tempfile.TemporaryDirectory(prefix="lf2-pretrain-") as tmp:
        (Path(tmp) / artifacts.METRICS).write_text(json.dumps(pm, indent=1, default=float) + "\n")
        tracking.log_artifact(Path(tmp) / artifacts.METRICS, "pretrain", run_id=run_id)


def log_stage_output(cfg: Any, name: str, out: str, round_index: int, run_id: Optional[str],
                     evaluate_round: Optional[EvaluateRound] = None) -> list[tuple[str, float]]:
    """Log round ``round_index``'s output ``out`` of stage ``name`` (extract-features, cluster, finetune;
    others are ignored) at step = round; after a finetune, when ``curve_due(cfg.eval.every_rounds, ...)``
    and ``evaluate_round`` is given, evaluate and log the curve point at step = round + 1. Returns the
    (key, value) rows logged."""
    from .stages.table import CLUSTER, EXTRACT, FINETUNE

    if not run_id or name not in (EXTRACT, CLUSTER, FINETUNE):
        return []
    if name == EXTRACT:
        meta = _read_json(storage.join(out, artifacts.FEATURES_META)) or {}
        return list(_log(catalog.extract_round(meta), round_index, run_id).items())
    if name == CLUSTER:
        stats = artifacts.read_cluster_stats(out)
        rows = list(_log(catalog.cluster_round(stats), round_index, run_id).items())
        tracking.log_text(json.dumps(stats, indent=1, sort_keys=True) + "\n",
                          f"round_{round_index:02d}/{artifacts.CLUSTER_STATS}", run_id=run_id)
        refresh_report(cfg, run_id, size_hist=_size_hist(stats))
        return rows
    rows = list(_log(catalog.finetune_round(artifacts.read_final_metrics(out)), round_index, run_id).items())
    if evaluate_round is not None and curve_due(cfg.eval.every_rounds, round_index, cfg.finetune.rounds):
        t0 = time.time()
        metrics, ev = evaluate_round(round_index, out)
        rows += list(log_curve_point(cfg, run_id, round_index + 1, metrics, ev, time.time() - t0).items())
    return rows


def _size_hist(stats: Mapping[str, Any]) -> dict[str, list]:
    return {s: v["size_hist"] for s, v in stats.items() if isinstance(v, Mapping) and v.get("size_hist")}


def log_curve_point(cfg: Any, run_id: Optional[str], step: int, metrics: Mapping[str, Any], eval_dir: str = "",
                    seconds: Optional[float] = None) -> dict[str, float]:
    """``round/target/*`` = ``metrics`` at ``step`` (rounds done), ``round/time/eval_s``, the rank list of
    ``eval_dir`` as ``report/ranklist.png``; rebuilds the report. Returns what was logged."""
    if not run_id or not metrics:  # unlabelled target: no evaluation, the clustering is the curve
        return {}
    logged = _log(catalog.target_round(metrics), step, run_id)
    if seconds is not None:
        logged.update(_log(catalog.design({"round/time/eval_s": seconds}), step, run_id))
    if eval_dir:
        png = storage.join(eval_dir, artifacts.RANKLIST)
        if storage.exists(png):
            tracking.log_artifact(storage.local_path(png), REPORT_DIR, run_id=run_id)
    refresh_report(cfg, run_id)
    return logged


def evaluate_in_temp(cfg: Any, run_id: str) -> EvaluateRound:
    """The pipeline's ``evaluate_round``: evaluate a finetune output on the data recorded in the run's
    tag ``lf2.data`` into a temporary directory (deleted after logging: the metrics and rank list live
    in MLflow). Unlabelled target (empty query/gallery): returns no metrics."""
    from .stages.evaluate import evaluate

    def run(r: int, model: str) -> tuple[dict[str, Any], str]:
        data = data_location(tracking.run_tags(run_id).get("lf2.data", ""))
        manifest = _read_json(storage.join(data, artifacts.MANIFEST)) or {}
        target = manifest.get("target", {})
        if not target.get("query") or not target.get("gallery"):
            return {}, ""
        with tempfile.TemporaryDirectory(prefix=f"lf2-curve-r{r:02d}-") as tmp:
            metrics = evaluate(cfg, data, model, str(Path(tmp) / "eval"))
            png = Path(tmp) / "eval" / artifacts.RANKLIST
            if png.is_file():
                tracking.log_artifact(png, REPORT_DIR, run_id=run_id)
        return metrics, ""

    return run


def data_location(tag: str) -> str:
    """The prepare-data output of an ``lf2.data`` tag (``<uri>/manifest.json``; ``file://`` -> path)."""
    uri = tag[:-len("/manifest.json")] if tag.endswith("/manifest.json") else tag
    if uri.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlsplit(uri).path)
    return uri


def log_final(cfg: Any, run_id: Optional[str], metrics: Mapping[str, Any], eval_dir: str = "",
              seconds: Optional[Mapping[str, float]] = None) -> dict[str, float]:
    """The final teacher's evaluation: the curve's last point (step = ``finetune.rounds``), ``eval/``
    artifacts (metrics.json, ranklist.png) and ``summary/*``: target retrieval, source-only and gain,
    the last round's global clustering, ``seconds`` per stage. Returns the summary metrics logged."""
    if not run_id:
        return {}
    step = int(cfg.finetune.rounds)
    log_curve_point(cfg, run_id, step, metrics, eval_dir)
    for name in (artifacts.METRICS, artifacts.RANKLIST):
        if eval_dir and storage.exists(storage.join(eval_dir, name)):
            tracking.log_artifact(storage.local_path(storage.join(eval_dir, name)), "eval", run_id=run_id)
    history = tracking.metric_history(run_id)
    summary: dict[str, float] = {f"summary/target_{k}": metrics[k] for k in catalog.RETRIEVAL if k in metrics}
    for k in ("mAP", "R1"):
        start = dict(history.get(f"round/target/{k}", [])).get(0)
        if start is not None and k in metrics:
            summary[f"summary/source_only_{k}"] = start
            summary[f"summary/gain_{k}"] = float(metrics[k]) - start
    for key in ("num_clusters", "nmi", "outlier_ratio"):
        pts = history.get(f"round/cluster/global/{key}")
        if pts:
            summary[f"summary/cluster_global_{key}"] = max(pts)[1]
    for stage, secs in (seconds or {}).items():
        summary[f"summary/time/{stage}_s"] = secs
    summary = catalog.design(summary)
    _log(summary, step, run_id)
    refresh_report(cfg, run_id)
    return summary


def _curve_rows(history: Mapping[str, Any]) -> list[str]:
    from .curves import series

    steps = sorted({s for k, v in history.items() if k.startswith(("round/target/", "round/cluster/global/"))
                    for s, _ in v})
    cols = [("target mAP", "round/target/mAP", 100), ("target R1", "round/target/R1", 100),
            ("global clusters", "round/cluster/global/num_clusters", 1), ("global NMI", "round/cluster/global/nmi", 1),
            ("outlier ratio", "round/cluster/global/outlier_ratio", 1)]
    vals = {key: dict(zip(*series(history, key))) for _, key, _ in cols}
    lines = ["| step (round) | " + " | ".join(c for c, _, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in steps:
        cells = [f"{vals[key][s] * mult:.4g}" if s in vals[key] else "" for _, key, mult in cols]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(cfg: Any, tags: Mapping[str, str], history: Mapping[str, Any]) -> str:
    """The run summary as Markdown: lineage, then one row per step (target curve in %, clustering of
    the round with that index)."""
    lines = [f"# lf2 run summary: {tags.get('mlflow.runName', '')}", "",
             f"- recipe `{cfg.recipe}`, {cfg.finetune.rounds} rounds, clustering `{cfg.cluster.method}`, "
             f"variant `{cfg.finetune.variant}`",
             f"- source: {tags.get('lf2.source.name', '')}; target: {tags.get('lf2.target.name', '')}",
             f"- lf2 {tags.get('lf2.version', '')}, commit `{tags.get('lf2.git_commit', '')}`, "
             f"image `{tags.get('lf2.image', '') or '-'}`", "",
             "Target retrieval after N rounds (step 0 = source model; target TEST split, report only, never used "
             "to select anything); clustering columns: the clustering made in round N.", ""]
    return "\n".join(lines + _curve_rows(history)) + "\n"


def refresh_report(cfg: Any, run_id: Optional[str], size_hist: Optional[Mapping[str, list]] = None) -> None:
    """Rebuild ``report/*`` from the run's metric history (see the module docstring)."""
    if not run_id:
        return
    from .curves import curve_figure, run_summary_figure, stats_per_round
    from .plots import cluster_stats_figure, save_png

    history = tracking.metric_history(run_id)
    tags = tracking.run_tags(run_id)
    stats = stats_per_round(history)
    if size_hist is None:
        last = _last_stats(run_id, stats)
        size_hist = _size_hist(last) if last else {}
    if stats and size_hist:  # the histogram panel of the clustering figure: the last round's sizes
        for s, h in size_hist.items():
            stats[-1].setdefault(s, {})["size_hist"] = h
    with tempfile.TemporaryDirectory(prefix="lf2-report-") as tmp:
        d = Path(tmp)
        name = tags.get("mlflow.runName", run_id)
        if stats:
            save_png(cluster_stats_figure(stats), str(d / "clustering.png"), dpi=80)
        if "round/target/mAP" in history:
            save_png(curve_figure({name: history}), str(d / "target_curve.png"), dpi=80)
        save_png(run_summary_figure(history, f"{name}: {cfg.recipe}, {cfg.cluster.method}", size_hist),
                 str(d / "run_summary.png"), dpi=80)
        md = summary_markdown(cfg, tags, history)
        (d / "summary.md").write_text(md)
        img = base64.b64encode((d / "run_summary.png").read_bytes()).decode()
        rows = "".join(f"<tr>{''.join(f'<td>{c.strip()}</td>' for c in ln.strip('|').split('|'))}</tr>"
                       for ln in md.splitlines() if ln.startswith("|") and not ln.startswith("|---"))
        (d / "summary.html").write_text(
            f"<html><body><h2>lf2 run summary: {name}</h2><img src='data:image/png;base64,{img}' width='100%'/>"
            f"<table border='1' cellpadding='4'>{rows}</table></body></html>\n")
        tracking.log_artifact(d, REPORT_DIR, run_id=run_id)


def _last_stats(run_id: str, stats: list[dict]) -> Optional[dict]:
    if not stats:
        return None
    text = tracking.read_artifact_text(run_id, f"round_{stats[-1]['round']:02d}/{artifacts.CLUSTER_STATS}")
    return json.loads(text) if text else None
