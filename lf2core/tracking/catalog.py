"""The metric design: every MLflow metric key lf2 logs, its unit of ``step``, its rounding and meaning.

Keys are namespaced by the unit of their step (docs/tracking.md lists them all):

- ``epoch/...``   step = pretraining epoch (1..E);
- ``round/...``   step = adaptation round: ``round/target/*`` at step ``r`` is the target retrieval
  quality AFTER ``r`` rounds (step 0 = the source model on the target); ``round/cluster/*``,
  ``round/finetune/*``, ``round/extract/*`` and ``round/time/*`` at step ``r`` describe round ``r``
  (0-based: the clustering of round 0 is made with the source model);
- ``summary/...`` one value per run (step = the number of rounds run), what the runs table sorts by.

No counters (round index, global step, epoch) are logged as metrics: they are the step. Values are rounded
(``rounded``) so the UI does not show 16 digits. This module does not import mlflow.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, NamedTuple, Optional

from ..cluster.labels import REPORTED_STATS

RETRIEVAL = ("mAP", "R1", "R5", "R10", "mINP")  # fractions in [0, 1] on the target query/gallery split
LABEL_SETS_DOC = ("global: the whole-body feature f0; upper / lower: the upper-body and lower-body part "
                  "features (part1..partK for K != 2 parts)")


class Key(NamedTuple):
    """One catalogue entry: ``pattern`` (regex over the metric key), step unit, digits kept, meaning."""

    pattern: str
    unit: str
    digits: int
    description: str


_SET = r"(global|upper|lower|part\d+)"
CATALOGUE: tuple[Key, ...] = (
    # ---------------------------------------------------------------- per epoch (pretraining)
    Key(r"epoch/pretrain/loss_ce", "epoch", 4, "source identity cross-entropy (label-smoothed), epoch mean"),
    Key(r"epoch/pretrain/loss_tri", "epoch", 4, "source batch-hard triplet loss, epoch mean"),
    Key(r"epoch/pretrain/loss", "epoch", 4, "total pretraining loss (ce + triplet), epoch mean"),
    Key(r"epoch/pretrain/acc", "epoch", 4, "source identity classification accuracy (fraction), epoch mean"),
    Key(r"epoch/pretrain/lr", "epoch", 4, "learning rate at the end of the epoch"),
    Key(r"epoch/pretrain/source_(mAP|R1|R5|R10|mINP)", "epoch", 4,
        "SOURCE query/gallery retrieval (fraction), on evaluation epochs only (pretrain.eval_every)"),
    Key(r"epoch/pretrain/[A-Za-z0-9_]+", "epoch", 4, "other pretraining term, epoch mean"),
    Key(r"epoch/time/pretrain_s", "epoch", 4, "wall-clock seconds of the pretraining epoch"),
    Key(r"epoch/time/pretrain_[a-z_]+_s", "epoch", 4, "seconds per iteration of the pretraining epoch (part)"),
    # ---------------------------------------------------------------- per round
    Key(r"round/target/(mAP|R1|R5|R10|mINP)", "round", 4,
        "THE ADAPTATION CURVE: target query/gallery retrieval (fraction) of the teacher after `step` rounds "
        "(step 0: the source model); every eval.every_rounds rounds and after the last; report only, "
        "never used to select anything"),
    Key(rf"round/cluster/{_SET}/num_clusters", "round", 0, "pseudo-label clusters of the label set (count)"),
    Key(rf"round/cluster/{_SET}/outlier_ratio", "round", 4,
        "fraction of target train images left unclustered (-1) in the label set"),
    Key(rf"round/cluster/{_SET}/nmi", "round", 4,
        "NMI of the pseudo labels vs the true target train identities (diagnostic; needs labels)"),
    Key(rf"round/cluster/{_SET}/ari", "round", 4, "adjusted Rand index of pseudo labels vs true identities"),
    Key(rf"round/cluster/{_SET}/pairwise_precision", "round", 4,
        "of the image pairs put in one cluster, the fraction of the same identity"),
    Key(rf"round/cluster/{_SET}/pairwise_recall", "round", 4,
        "of the same-identity image pairs, the fraction put in one cluster"),
    Key(rf"round/cluster/{_SET}/nmi_camera", "round", 4,
        "NMI of the pseudo labels vs CAMERA ids: high = clusters follow cameras, not people (bad)"),
    Key(rf"round/cluster/{_SET}/eps", "round", 4,
        "DBSCAN eps used for the label set (the configured value, or the one chosen with cluster.eps=auto)"),
    Key(rf"round/cluster/{_SET}/eps_pairs_per_image", "round", 4,
        "eps=auto: the share of pairs whose mean distance became eps, as pairs per image (share x (N - 1))"),
    Key(rf"round/cluster/{_SET}/k1", "round", 0,
        "k1 of the Jaccard distance used for the label set (the configured value, or the one chosen with "
        "cluster.k1=auto)"),
    Key(r"round/finetune/loss", "round", 4, "total finetune loss, mean over the round's last epoch"),
    Key(r"round/finetune/ema_alpha", "round", 4,
        "mean-teacher EMA momentum actually used, mean over the round's last epoch: min(1 - 1/(t+1), "
        "finetune.ema_alpha) with t the global step, so it ramps up towards the configured value"),
    Key(r"round/finetune/acc", "round", 4, "student pseudo-label classification accuracy (fraction)"),
    Key(r"round/finetune/cam_proxy_(intra|inter)", "round", 4,
        "camera proxy loss term (finetune.camera_proxy_weight > 0), unweighted, last-epoch mean"),
    Key(r"round/finetune/[A-Za-z0-9_]+", "round", 4,
        "a finetune loss term (ce_* cross-entropy, tri_* triplet, per label set), last-epoch mean"),
    Key(r"round/extract/images_per_s", "round", 4, "feature extraction throughput of the round (images/s)"),
    Key(r"round/time/(extract|finetune|eval)_s", "round", 4, "wall-clock seconds of the round's stage"),
    Key(r"round/time/finetune_(data|step)_s", "round", 4,
        "seconds per iteration waiting for data / computing the step (finetune, last epoch)"),
    # ---------------------------------------------------------------- summary
    Key(r"summary/target_(mAP|R1|R5|R10|mINP)", "summary", 4,
        "target retrieval (fraction) of the final teacher: the figure the runs are compared by"),
    Key(r"summary/source_only_(mAP|R1|R5|R10|mINP)", "summary", 4,
        "target retrieval of the source model before adaptation (step 0 of the curve)"),
    Key(r"summary/gain_(mAP|R1)", "summary", 4, "final minus source-only target retrieval (fraction points)"),
    Key(r"summary/source_(mAP|R1|R5|R10|mINP)", "summary", 4, "SOURCE retrieval of the pretrained model"),
    Key(rf"summary/cluster_{_SET}_(num_clusters|nmi|outlier_ratio)", "summary", 4, "last round's clustering"),
    Key(r"summary/time/(prepare|pretrain|extract|cluster|finetune|evaluate)_s", "summary", 4,
        "total wall-clock seconds spent in the stage over the run (this process)"),
)
_COMPILED = [(re.compile(k.pattern + r"\Z"), k) for k in CATALOGUE]


def describe(key: str) -> Optional[Key]:
    """The catalogue entry of metric ``key`` (first matching pattern), None for an unknown key."""
    for rx, k in _COMPILED:
        if rx.match(key):
            return k
    return None


def rounded(value: float, digits: int = 4) -> float:
    """``value`` kept to ``digits`` significant digits (0: an integer count)."""
    if digits <= 0:
        return float(round(value))
    if value == 0 or not math.isfinite(value):
        return float(value)
    return float(f"{value:.{digits}g}")


def design(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flat ``{key: value}`` -> the values to log: every key must be in the catalogue (ValueError naming
    the unknown keys otherwise: a new metric needs a description first), non-finite values dropped, each
    value rounded to its entry's digits."""
    out, unknown = {}, []
    for k, v in metrics.items():
        entry = describe(k)
        if entry is None:
            unknown.append(k)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            continue
        out[k] = rounded(float(v), entry.digits)
    if unknown:
        raise ValueError(f"metric keys missing from lf2core.tracking.catalog: {', '.join(sorted(unknown))}")
    return out


# counters are the step, not metrics; these names are never logged
COUNTERS = frozenset({"epoch", "round", "global_step", "num_classes", "epochs", "num_source_ids", "selected_epoch"})


def pretrain_epoch(row: Mapping[str, Any]) -> dict[str, float]:
    """One pretraining history row ``{"epoch", "loss_ce", "acc", "lr", "mAP"?, "epoch_seconds", ...}`` ->
    ``epoch/pretrain/*`` and ``epoch/time/*`` keys (source retrieval as ``source_<metric>``)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k in COUNTERS or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k == "epoch_seconds":
            out["epoch/time/pretrain_s"] = v
        elif k.endswith("_seconds"):
            out[f"epoch/time/pretrain_{k[:-len('_seconds')]}_s"] = v
        elif k in RETRIEVAL:
            out[f"epoch/pretrain/source_{k}"] = v
        else:
            out[f"epoch/pretrain/{k}"] = v
    return design(out)


def finetune_round(final: Mapping[str, Any]) -> dict[str, float]:
    """A finetune output's ``final`` metrics -> ``round/finetune/*`` and ``round/time/*`` keys."""
    out: dict[str, float] = {}
    for k, v in final.items():
        if k in COUNTERS or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k == "round_seconds":
            out["round/time/finetune_s"] = v
        elif k in ("data_seconds", "step_seconds"):
            out[f"round/time/finetune_{k.split('_')[0]}_s"] = v
        elif k.endswith("_seconds"):
            continue  # epoch_seconds: the round time above says it
        elif k == "alpha":
            out["round/finetune/ema_alpha"] = v
        else:
            out[f"round/finetune/{k}"] = v
    return design(out)


CLUSTER_KEYS = REPORTED_STATS


def cluster_round(stats: Mapping[str, Any]) -> dict[str, float]:
    """A cluster output's ``stats.json`` ``{label set: {...}}`` -> ``round/cluster/<set>/<key>``."""
    out = {f"round/cluster/{s}/{k}": v[k] for s, v in stats.items() if isinstance(v, Mapping)
           for k in CLUSTER_KEYS if k in v}
    return design(out)


def extract_round(meta: Mapping[str, Any]) -> dict[str, float]:
    """An extract-features ``meta.json`` -> ``round/extract/images_per_s`` and ``round/time/extract_s``."""
    out = {}
    if "images_per_s" in meta:
        out["round/extract/images_per_s"] = meta["images_per_s"]
    if "seconds" in meta:
        out["round/time/extract_s"] = meta["seconds"]
    return design(out)


def target_round(metrics: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation ``{"mAP", "R1", ...}`` -> the curve keys ``round/target/<metric>``."""
    return design({f"round/target/{k}": metrics[k] for k in RETRIEVAL if k in metrics})


def catalogue_markdown() -> str:
    """The catalogue as a Markdown table (docs/tracking.md embeds it; a test keeps them equal)."""
    lines = ["| key (regex) | step | digits | meaning |", "|---|---|---|---|"]
    for k in CATALOGUE:
        pattern = k.pattern.replace("|", "\\|")  # a bare | would split the table's columns
        lines.append(f"| `{pattern}` | {k.unit} | {k.digits or 'integer'} | {k.description.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
