"""``lf2 compare``: runs side by side (config differences, final metrics, best round, adaptation curves)
and the MLflow UI links of a run.

``compare_runs(refs, experiment)`` reads the runs through the tracking API; ``compare_text`` prints the
table; ``compare_main`` writes the curves PNG (``lf2core.curves.curve_figure``: one line per run).
"""

from __future__ import annotations

import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .runs import metric_history
from .store import TrackingError, client, enabled, mask, resolve_tracking_uri, use

FINAL_KEYS = ("summary/target_mAP", "summary/target_R1", "summary/target_mINP", "summary/source_only_mAP",
              "summary/gain_mAP", "summary/cluster_global_num_clusters", "summary/cluster_global_nmi")
IGNORED_PARAMS = ("tracking.",)  # where a run was logged, not what it computed
SORT_KEY = "summary/target_mAP"
UI_DEFAULT = "http://127.0.0.1:5000"  # `mlflow ui` for a local (sqlite) store
# MLflow 3's UI opens in its GenAI mode unless told otherwise (a per-browser setting); the links say so
TRAINING_VIEW = "workflowType=machine_learning"


@dataclass
class RunView:
    """One run as ``lf2 compare`` shows it: ``history`` = ``{metric key: [(step, value), ...]}`` of
    ``round/*``."""

    run_id: str
    name: str
    experiment_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id[:8]})"

    def best_round(self) -> Optional[tuple[int, float]]:
        """(step, value) of the highest ``round/target/mAP`` (ties: the earlier step); a report on the
        target TEST split, never used to select a model."""
        pts = self.history.get("round/target/mAP", [])
        return max(pts, key=lambda p: (p[1], -p[0])) if pts else None


def _run_view(run: Any) -> RunView:
    return RunView(run.info.run_id, run.info.run_name or run.info.run_id, run.info.experiment_id, run.info.status,
                   dict(run.data.params), dict(run.data.metrics), metric_history(run.info.run_id))


def compare_runs(refs: Sequence[str], experiment: Optional[str] = None, max_runs: int = 5,
                 tracking_uri: Optional[str] = None) -> list[RunView]:
    """The runs named by ``refs`` (run ids, or run names inside ``experiment``); with no ``refs``, the
    ``max_runs`` latest runs of ``experiment``. TrackingError naming what is missing."""
    if not enabled():
        raise TrackingError("lf2 compare: tracking is disabled (LF2_TRACKING=off)")
    if not refs and not experiment:  # before touching any store
        raise TrackingError("lf2 compare: give RUN_ID... or --experiment NAME")
    use(tracking_uri=tracking_uri)
    from .server import check_reachable

    check_reachable(tracking_uri=tracking_uri)
    from mlflow.exceptions import MlflowException

    c = client()
    exp_id = None
    if experiment:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            where = mask(resolve_tracking_uri(tracking_uri=tracking_uri))
            raise TrackingError(f"lf2 compare: no experiment {experiment!r} at {where}")
        exp_id = exp.experiment_id
    if not refs:
        runs = c.search_runs([exp_id], order_by=["attributes.start_time DESC"], max_results=max_runs)
        if not runs:
            raise TrackingError(f"lf2 compare: experiment {experiment!r} has no runs")
        return [_run_view(r) for r in runs]
    out = []
    for ref in refs:
        try:
            out.append(_run_view(c.get_run(ref)))
            continue
        except MlflowException:
            pass
        found = c.search_runs([exp_id], filter_string=f"attributes.run_name = '{ref}'", max_results=2) if exp_id else []
        if len(found) != 1:
            where = f" in experiment {experiment!r}" if experiment else " (a run name needs --experiment)"
            why = "several runs have that name" if len(found) > 1 else "no such run id or run name"
            raise TrackingError(f"lf2 compare: {ref}: {why}{where}")
        out.append(_run_view(found[0]))
    return out


def config_differences(runs: Sequence[RunView]) -> dict[str, list[str]]:
    """``{param: [value per run]}`` for the params whose values differ between ``runs`` (missing: "-")."""
    keys = sorted({k for r in runs for k in r.params if not k.startswith(IGNORED_PARAMS)})
    return {k: [r.params.get(k, "-") for r in runs] for k in keys if len({r.params.get(k, "-") for r in runs}) > 1}


def _fmt(key: str, v: Optional[float]) -> str:
    if v is None:
        return "-"
    if any(m in key for m in ("mAP", "R1", "mINP")) or key.endswith("nmi"):
        return f"{100 * v:.1f}%" if "nmi" not in key else f"{v:.3f}"
    return f"{v:g}"


def compare_text(runs: Sequence[RunView]) -> str:
    """The comparison table: one column per run; config differences, final metrics, best round."""
    rows: list[tuple[str, list[str]]] = [("run", [r.label for r in runs]), ("status", [r.status for r in runs])]
    diffs = config_differences(runs)
    rows.append(("-- config differences", [""] * len(runs) if diffs else ["(none)"] + [""] * (len(runs) - 1)))
    rows += [(k, v) for k, v in diffs.items()]
    rows.append(("-- final metrics", [""] * len(runs)))
    rows += [(k, [_fmt(k, r.metrics.get(k)) for r in runs]) for k in FINAL_KEYS]
    best = [r.best_round() for r in runs]
    rows.append(("best round by target mAP*", [f"{b[0]} ({100 * b[1]:.1f}%)" if b else "-" for b in best]))
    rows.append(("curve points (rounds)", [",".join(str(s) for s, _ in r.history.get("round/target/mAP", []))
                                           or "-" for r in runs]))
    width = max(len(k) for k, _ in rows)
    cols = [max(len(row[1][i]) for row in rows) for i in range(len(runs))]
    lines = [f"{k.ljust(width)}  " + "  ".join(v.ljust(cols[i]) for i, v in enumerate(vals)) for k, vals in rows]
    lines.append("* target TEST split, a report: never used to select a round or model")
    return "\n".join(lines) + "\n"


def ui_base(tracking_uri: Optional[str] = None) -> str:
    """The MLflow UI address of the store: the server itself, else ``mlflow ui``'s default address."""
    uri = resolve_tracking_uri(tracking_uri=tracking_uri)
    if uri.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(uri)
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/")
    return UI_DEFAULT


def run_links(run_id: str, model_name: str = "", version: str = "",
              tracking_uri: Optional[str] = None) -> dict[str, str]:
    """UI links: the run's page, its experiment's runs sorted by final target mAP (the training view),
    its charts, and the registered model version when given."""
    exp = client().get_run(run_id).info.experiment_id
    base = ui_base(tracking_uri)
    order = urllib.parse.quote(f"metrics.`{SORT_KEY}`")
    links = {"MLflow run": f"{base}/#/experiments/{exp}/runs/{run_id}?{TRAINING_VIEW}",
             "run charts": f"{base}/#/experiments/{exp}/runs/{run_id}/model-metrics?{TRAINING_VIEW}",
             "experiment runs (sorted by final target mAP)": f"{base}/#/experiments/{exp}/runs?{TRAINING_VIEW}"
                                                             f"&orderByKey={order}&orderByAsc=false"}
    if model_name and version:
        links["model version"] = f"{base}/#/models/{model_name}/versions/{version}"
    return links


def compare_link(runs: Sequence[RunView], tracking_uri: Optional[str] = None) -> str:
    import json

    ids = json.dumps([r.run_id for r in runs]).replace(" ", "")
    exps = json.dumps(sorted({r.experiment_id for r in runs})).replace(" ", "")
    return (f"{ui_base(tracking_uri)}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments="
            f"{urllib.parse.quote(exps)}&{TRAINING_VIEW}")


def compare_main(refs: Sequence[str], experiment: Optional[str] = None, png: str = "compare_curves.png",
                 tracking_uri: Optional[str] = None, max_runs: int = 5) -> int:
    """``lf2 compare``: print the table and the UI compare link, write ``png`` (unless empty)."""
    runs = compare_runs(refs, experiment, max_runs, tracking_uri)
    sys.stdout.write(compare_text(runs))
    if png:
        from ..curves import curve_figure
        from ..plots import save_png

        save_png(curve_figure({r.label: r.history for r in runs}), png, dpi=90)
        print(f"adaptation curves: {png}")
    print(f"MLflow compare view: {compare_link(runs, tracking_uri)}")
    return 0
