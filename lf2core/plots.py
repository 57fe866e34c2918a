"""Diagnostic figures written as PNG files (matplotlib, Agg canvas; never touches pyplot's global state).

- ``ranklist_png``: query images followed by their top-k gallery images under the evaluation protocol
  (same-identity-same-camera gallery entries excluded, ties broken by gallery index), green border for a
  true match, red otherwise.
- ``cluster_stats_png``: clustering statistics per round (number of clusters, outlier ratio, NMI / ARI,
  pairwise precision / recall when present) for each label set, and the cluster-size histogram of the
  last round.

Both write atomically (``lf2core.storage.write_bytes``) and return the output path.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import storage
from .errors import DataError, Lf2Error
from .evaluation import ArrayLike, valid_topk

THUMB_W, THUMB_H = 64, 128  # re-ID crops are 1:2
HIT_COLOR, MISS_COLOR, QUERY_COLOR = "#1a9e3a", "#d62728", "#1f4fb4"
LABEL_SETS = ("global", "upper", "lower")
SET_COLORS = {"global": "#1f77b4", "upper": "#ff7f0e", "lower": "#2ca02c"}
METRIC_MARKERS = {"nmi": "o", "ari": "s", "pairwise_precision": "^", "pairwise_recall": "v",
                  "num_clusters": "o", "outlier_ratio": "o"}


class PlotError(Lf2Error, ValueError):
    """Inputs to a plot are inconsistent or empty."""


def save_png(fig: Figure, out_path: str, dpi: int) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=dpi)
    storage.write_bytes(str(out_path), buf.getvalue())
    return str(out_path)


def _thumbnail(path: str) -> np.ndarray:
    """RGB uint8 [THUMB_H, THUMB_W, 3] of the image at ``path`` (local path or s3:// URI)."""
    from PIL import Image

    try:
        local = storage.local_path(path) if storage.is_remote(path) else path
        with Image.open(local) as im:
            im = im.convert("RGB").resize((THUMB_W, THUMB_H), Image.BICUBIC)
            return np.asarray(im)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image for the rank list ({exc})") from exc


def _frame(ax: Any, color: str, width: float = 4.0) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


class RankCell(NamedTuple):
    """One image of a rank-list row: its path (local or s3://), the title above it, the frame colour and
    width, the title colour (None: default)."""

    path: str
    title: str
    frame: str
    width: float
    title_color: Optional[str] = None


def draw_rank_rows(fig: Figure, queries: Sequence[RankCell], topk: int,
                   cell: Callable[[int, int], Optional[RankCell]], fontsize: float) -> None:
    """Row ``r`` of ``fig``: ``queries[r]`` then ``cell(r, k)`` for ``k < topk`` (None: a blank cell); the
    grid is ``len(queries)`` x ``topk + 1``. Shared by the evaluation rank list and ``lf2 search``."""
    rows, cols = len(queries), topk + 1
    for r, q in enumerate(queries):
        for k, c in enumerate([q] + [cell(r, j) for j in range(topk)]):
            ax = fig.add_subplot(rows, cols, r * cols + 1 + k)
            if c is None:
                ax.axis("off")
                continue
            ax.imshow(_thumbnail(c.path))
            _frame(ax, c.frame, c.width)
            if c.title_color is None:
                ax.set_title(c.title, fontsize=fontsize)
            else:
                ax.set_title(c.title, fontsize=fontsize, color=c.title_color)


def select_queries(
    q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray, g_camids: np.ndarray, num: int, seed: int
) -> np.ndarray:
    """Up to ``num`` random query indices (seeded) among queries with a valid match in the gallery."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for i in rng.permutation(len(q_pids)):
        if np.any((g_pids == q_pids[i]) & (g_camids != q_camids[i])):
            chosen.append(int(i))
            if len(chosen) == num:
                break
    return np.asarray(chosen, dtype=np.int64)


def ranklist_figure(
    query_paths: Sequence[str],
    gallery_paths: Sequence[str],
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    num_queries: int = 8,
    topk: int = 10,
    seed: int = 0,
) -> Figure:
    """The rank-list figure of ``ranklist_png`` (arguments alike, without ``out_path``).

    Axes are added row by row: for each drawn query, its image then ``topk`` gallery cells (a cell with
    no kept gallery entry is blank); the frame colour of a gallery cell says hit / miss.
    """
    qp, gp = np.asarray(q_pids).reshape(-1), np.asarray(g_pids).reshape(-1)
    qc, gc = np.asarray(q_camids).reshape(-1), np.asarray(g_camids).reshape(-1)
    if len(query_paths) != len(qp) or len(gallery_paths) != len(gp):
        raise PlotError(
            f"ranklist: {len(query_paths)} query / {len(gallery_paths)} gallery paths but "
            f"{len(qp)} / {len(gp)} ids"
        )
    if num_queries < 1 or topk < 1:
        raise PlotError(f"ranklist: num_queries and topk must be >= 1, got {num_queries}, {topk}")
    if not hasattr(distmat, "shape"):
        distmat = np.asarray(distmat)
    if tuple(distmat.shape) != (len(qp), len(gp)):
        raise PlotError(f"ranklist: distmat has shape {tuple(distmat.shape)}, expected ({len(qp)}, {len(gp)})")
    sel = select_queries(qp, gp, qc, gc, num_queries, seed)  # [n <= num_queries]
    if len(sel) == 0:
        raise PlotError("ranklist: no query has a valid match in the gallery")
    dm = distmat[sel]  # [n, G] (numpy or torch)
    idx, hits = valid_topk(dm, qp[sel], gp, qc[sel], gc, topk=topk)
    rows, cols = len(sel), topk + 1
    fig_h = 2.05 * rows + 0.95
    fig = Figure(figsize=(max(6.0, 0.95 * cols + 0.3), fig_h))
    fig.suptitle(
        f"Top-{topk} rank list\ngreen = same identity, red = different; "
        "same identity + same camera excluded",
        fontsize=9,
        y=1 - 0.12 / fig_h,
        va="top",
    )
    def cell(r: int, k: int) -> Optional[RankCell]:
        gi = int(idx[r, k])
        if gi < 0:
            return None
        color = HIT_COLOR if hits[r, k] else MISS_COLOR
        return RankCell(str(gallery_paths[gi]), f"{k + 1}\nid {gp[gi]} c{gc[gi]}", color, 4.0, color)

    draw_rank_rows(fig, [RankCell(str(query_paths[qi]), f"query\nid {qp[qi]} c{qc[qi]}", QUERY_COLOR, 3.0,
                                  QUERY_COLOR) for qi in sel], topk, cell, fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.9 / fig_h,
                        wspace=0.08, hspace=0.45)
    return fig


def ranklist_png(
    out_path: str,
    query_paths: Sequence[str],
    gallery_paths: Sequence[str],
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    num_queries: int = 8,
    topk: int = 10,
    seed: int = 0,
) -> str:
    """Grid of ``num_queries`` random queries (with a valid match), each followed by its top-``topk``.

    Args:
        out_path: PNG destination (local path or s3:// URI; written atomically).
        query_paths: [Q] image paths; gallery_paths: [G] image paths.
        distmat: [Q, G] distances; q_pids, q_camids: [Q]; g_pids, g_camids: [G].
        num_queries, topk: grid size; seed: which queries are drawn.

    Returns:
        ``out_path``.
    """
    fig = ranklist_figure(query_paths, gallery_paths, distmat, q_pids, g_pids, q_camids, g_camids,
                          num_queries=num_queries, topk=topk, seed=seed)
    return save_png(fig, out_path, dpi=100)


def _label_sets(stats: list[dict]) -> list[str]:
    names = [s for s in LABEL_SETS if any(isinstance(d.get(s), dict) for d in stats)]
    for d in stats:
        for k, v in d.items():
            if isinstance(v, dict) and k not in names:
                names.append(k)
    return names


def _series(stats: list[dict], rounds: list[float], name: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for x, d in zip(rounds, stats):
        v = d.get(name, {}).get(key) if isinstance(d.get(name), dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(x)
            ys.append(float(v))
    return xs, ys


def cluster_stats_figure(stats_per_round: list[dict]) -> Figure:
    """The figure of ``cluster_stats_png``: axes 0-3 are the per-round panels (clusters, outlier ratio,
    NMI/ARI, pairwise precision/recall; one line per label set and metric present), axis 4 the histogram.

    Args:
        stats_per_round: one dict per round, ``{"round": r, "global": {...}, "upper": {...}, "lower": {...}}``
            with per-label-set keys ``num_clusters``, ``outlier_ratio``, ``nmi``, ``ari``,
            ``pairwise_precision``, ``pairwise_recall``, ``size_hist`` (``[[size, count], ...]``), as
            produced by ``lf2core.cluster.cluster_stats``. Missing keys / label sets are skipped.
    """
    if not isinstance(stats_per_round, (list, tuple)) or not stats_per_round:
        raise PlotError("cluster_stats: expected a non-empty list of per-round stats dicts")
    if not all(isinstance(d, dict) for d in stats_per_round):
        raise PlotError("cluster_stats: every per-round entry must be a dict")
    stats = list(stats_per_round)
    rounds = [float(d.get("round", i)) for i, d in enumerate(stats)]
    sets = _label_sets(stats)
    if not sets:
        raise PlotError("cluster_stats: no label set (e.g. 'global') in the stats")
    colors = {s: SET_COLORS.get(s, f"C{3 + i}") for i, s in enumerate(sets)}

    fig = Figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(2, 3)
    panels = [
        (fig.add_subplot(grid[0, 0]), "Number of clusters", [("num_clusters", "-")]),
        (fig.add_subplot(grid[0, 1]), "Outlier ratio", [("outlier_ratio", "-")]),
        (fig.add_subplot(grid[0, 2]), "NMI (o, solid) / ARI (s, dashed) vs true ids",
         [("nmi", "-"), ("ari", "--")]),
        (fig.add_subplot(grid[1, 0]), "Pair precision (^, solid) / recall (v, dotted)",
         [("pairwise_precision", "-"), ("pairwise_recall", ":")]),
    ]
    lo, hi = min(rounds), max(rounds)
    for ax, title, keys in panels:
        drawn = False
        for s in sets:
            for key, style in keys:
                xs, ys = _series(stats, rounds, s, key)
                if xs:
                    ax.plot(xs, ys, style, marker=METRIC_MARKERS.get(key, "o"), markersize=5, linewidth=1.6,
                            color=colors[s], label=f"{s} {key}")
                    drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_xlim(lo - 0.5, hi + 0.5)  # whole rounds, also for a single point
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
            if all(k in ("outlier_ratio", "nmi", "ari", "pairwise_precision", "pairwise_recall") for k, _ in keys):
                ax.set_ylim(-0.02, 1.02)
        else:
            ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes, color="gray")

    ax = fig.add_subplot(grid[1, 1:])
    last = stats[-1]
    width = 0.8 / len(sets)
    drawn = False
    for i, s in enumerate(sets):
        hist = last.get(s, {}).get("size_hist") if isinstance(last.get(s), dict) else None
        if not hist:
            continue
        h = np.asarray(hist, dtype=np.float64).reshape(-1, 2)
        ax.bar(h[:, 0] + (i - (len(sets) - 1) / 2) * width, h[:, 1], width=width, color=colors[s], label=s)
        drawn = True
    ax.set_title(f"Cluster sizes, round {last.get('round', len(stats) - 1)}", fontsize=10)
    ax.set_xlabel("cluster size (images)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("number of clusters")
    ax.grid(alpha=0.3, axis="y")
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes, color="gray")
    span = f"round {lo:g}" if lo == hi else f"rounds {lo:g}-{hi:g}"
    fig.suptitle(f"Pseudo-label clustering, {span} (colour = label set, marker/line = metric)", fontsize=12)
    fig.tight_layout()
    return fig


def cluster_stats_png(out_path: str, stats_per_round: list[dict]) -> str:
    """Clustering statistics across rounds (see ``cluster_stats_figure``) written to ``out_path``.

    Args:
        out_path: PNG destination (local path or s3:// URI; written atomically).
        stats_per_round: one dict per round, ``{"round": r, "global": {...}, "upper": {...}, ...}``.

    Returns:
        ``out_path``.
    """
    return save_png(cluster_stats_figure(stats_per_round), out_path, dpi=90)
