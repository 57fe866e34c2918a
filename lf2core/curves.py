"""Figures of a run's rounds, built from its metric history (the keys of ``lf2core.tracking.catalog``).

A history is ``{metric key: [(step, value), ...]}`` (what MLflow stores; one process or many wrote it).

- ``stats_per_round(history)``: the ``round/cluster/<set>/<key>`` series as the per-round dicts
  ``lf2core.plots.cluster_stats_figure`` draws (clustering quality over all rounds so far);
- ``curve_figure({run label: history})``: the adaptation curves, target mAP and R1 over rounds (step 0 =
  the source model), one line per run -- the run's own curve and the side-by-side of ``lf2 compare``;
- ``run_summary_figure(history, title, size_hist)``: one picture of a run: curve, clusters and outliers,
  NMI/ARI and pair precision/recall of the global label set, cluster sizes of the last round.

matplotlib Agg figures, never pyplot's global state; ``save_png`` of ``lf2core.plots`` writes them.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .plots import METRIC_MARKERS, SET_COLORS, PlotError

History = Mapping[str, Sequence[tuple[int, float]]]
_CLUSTER_KEY = re.compile(r"round/cluster/(?P<set>[^/]+)/(?P<key>[^/]+)\Z")
CURVE_METRICS = ("mAP", "R1")
RUN_STYLES = ("-", "--", "-.", ":")
RUN_MARKERS = ("o", "s", "^", "D", "v", "P")


def stats_per_round(history: History) -> list[dict]:
    """``{"round": r, "<set>": {"<key>": value}}`` for every round with a ``round/cluster/*`` value,
    rounds in increasing order (``[]`` when the history has none)."""
    by_round: dict[int, dict] = {}
    for k, series in history.items():
        m = _CLUSTER_KEY.match(k)
        if not m:
            continue
        for step, value in series:
            by_round.setdefault(int(step), {"round": int(step)}).setdefault(m["set"], {})[m["key"]] = float(value)
    return [by_round[r] for r in sorted(by_round)]


def series(history: History, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, sorted by step (the last value logged at a step wins)."""
    pts = {int(s): float(v) for s, v in history.get(key, [])}
    steps = sorted(pts)
    return steps, [pts[s] for s in steps]


def _curve_axes(axes: Sequence, runs: Mapping[str, History], metrics: Sequence[str]) -> bool:
    drawn = False
    for ax, metric in zip(axes, metrics):
        for i, (label, hist) in enumerate(runs.items()):
            xs, ys = series(hist, f"round/target/{metric}")
            if xs:
                ax.plot(xs, [100 * y for y in ys], RUN_STYLES[i % len(RUN_STYLES)],
                        marker=RUN_MARKERS[i % len(RUN_MARKERS)], markersize=5, linewidth=1.6, label=label)
                drawn = True
        ax.set_title(f"target {metric} (%) after N rounds; 0 = source model", fontsize=10)
        ax.set_ylim(0, 101)
        ax.set_xlabel("rounds of adaptation")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no target evaluation\n(unlabelled target: see the clustering)", ha="center",
                    va="center", transform=ax.transAxes, color="gray")
    return drawn


def curve_figure(runs: Mapping[str, History], metrics: Sequence[str] = CURVE_METRICS) -> Figure:
    """One axis per metric of ``metrics`` (``round/target/<metric>`` in %), one line per run of ``runs``
    (``{label: history}``, distinct line style + marker per run). PlotError when ``runs`` is empty."""
    if not runs:
        raise PlotError("curve_figure: no runs")
    fig = Figure(figsize=(6 * len(metrics), 4.5))
    axes = [fig.add_subplot(1, len(metrics), i + 1) for i in range(len(metrics))]
    _curve_axes(axes, runs, metrics)
    fig.suptitle("Adaptation curve on the target test split (report only, never used for selection)", fontsize=11)
    fig.tight_layout()
    return fig


def run_summary_figure(history: History, title: str, size_hist: Optional[Mapping[str, list]] = None) -> Figure:
    """A run at a glance (2 x 2): the adaptation curve (mAP, R1), number of clusters and outlier ratio
    per label set, global-set NMI / ARI / pair precision / recall, and ``size_hist`` (``{set: [[size,
    count], ...]}`` of the last round) as a histogram."""
    fig = Figure(figsize=(13, 8.5))
    ax_curve, ax_count, ax_quality, ax_hist = (fig.add_subplot(2, 2, i + 1) for i in range(4))
    for i, metric in enumerate(("mAP", "R1", "mINP")):
        xs, ys = series(history, f"round/target/{metric}")
        if xs:
            ax_curve.plot(xs, [100 * y for y in ys], RUN_STYLES[i], marker=RUN_MARKERS[i], label=metric)
    ax_curve.set_title("target retrieval (%) after N rounds; 0 = source model", fontsize=10)
    ax_curve.set_ylim(0, 101)
    ax_curve.set_xlabel("rounds of adaptation")
    stats = stats_per_round(history)
    sets = [s for s in ("global", "upper", "lower") if any(s in d for d in stats)]
    twin = ax_count.twinx()
    for s in sets:
        xs, ys = series(history, f"round/cluster/{s}/num_clusters")
        ax_count.plot(xs, ys, "-", marker="o", color=SET_COLORS.get(s), label=f"{s} clusters")
        xs, ys = series(history, f"round/cluster/{s}/outlier_ratio")
        twin.plot(xs, ys, ":", marker="x", color=SET_COLORS.get(s), label=f"{s} outlier ratio")
    twin.set_ylim(-0.02, 1.02)
    twin.set_ylabel("outlier ratio (x, dotted)")
    ax_count.set_ylabel("clusters (o, solid)")
    ax_count.set_title("pseudo-label clusters per round", fontsize=10)
    ax_count.set_xlabel("round")
    for key, style in (("nmi", "-"), ("ari", "--"), ("pairwise_precision", "-."), ("pairwise_recall", ":")):
        xs, ys = series(history, f"round/cluster/global/{key}")
        if xs:
            ax_quality.plot(xs, ys, style, marker=METRIC_MARKERS[key], label=key)
    ax_quality.set_ylim(-0.02, 1.02)
    ax_quality.set_title("global pseudo labels vs true identities", fontsize=10)
    ax_quality.set_xlabel("round")
    width = 0.8 / max(1, len(size_hist or {}))
    for i, (s, hist) in enumerate((size_hist or {}).items()):
        h = np.asarray(hist, dtype=np.float64).reshape(-1, 2)
        if len(h):
            ax_hist.bar(h[:, 0] + (i - (len(size_hist) - 1) / 2) * width, h[:, 1], width=width,
                        color=SET_COLORS.get(s), label=s)
    ax_hist.set_title("cluster sizes, last round", fontsize=10)
    ax_hist.set_xlabel("cluster size (images)")
    ax_hist.set_ylabel("clusters")
    for ax in (ax_curve, ax_count, ax_quality, ax_hist):
        ax.grid(alpha=0.3)
        if ax is not ax_hist:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles = ax.get_legend_handles_labels()[0]
        if ax is ax_count:
            handles += twin.get_legend_handles_labels()[0]
        if handles:
            ax.legend(handles=handles, fontsize=7)
        else:
            ax.text(0.5, 0.5, "not available yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig
