"""How the DBSCAN pseudo labels depend on k1 and eps, measured against the true identities.

    python bench/cluster_sensitivity.py FEATURES.npz [FEATURES.npz ...] [--set global] [--k1 15 20 25 30]
        [--eps 0.4 0.5 0.6 0.7] [--k2 6] [--min-samples 4] [--kmeans 200]

``FEATURES.npz``: an extract-features output (``features.npz`` with the feature sets, ``pids``, ``camids``),
e.g. ``runs/uda_synthetic/seed1/lf2_dbscan/round_00/features/features.npz`` (the pretrained model's
features of the target train split). Needs the true ids (all ``pids >= 0``): a diagnostic for a labelled
benchmark, never a way to choose the settings of an unlabelled target. Prints one markdown table per file:
clusters, outliers, NMI, ARI, pairwise precision / recall / F1 (pairs of images in one cluster that share
an identity / pairs sharing an identity that land in one cluster), plus the two label-free ``cluster.eps=auto``
rules (the mean of the smallest share of the pairwise Jaccard distances: MMT's fixed 0.16 %, and lf2's
default share from the data's k-reciprocal neighbour count) and, with ``--kmeans K``, k-means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from lf2core.cluster import jaccard_distance  # noqa: E402
from lf2core.cluster.jaccard import normalize_rows  # noqa: E402
from lf2core.cluster import knn  # noqa: E402
from lf2core.cluster.labels import (  # noqa: E402
    AUTO_EPS_RHO, cluster_stats, dbscan_precomputed, kmeans_labels, reciprocal_share, rho_eps,
)


def row(name: str, labels: np.ndarray, pids: np.ndarray, camids: np.ndarray) -> str:
    s = cluster_stats(labels, pids, camids)
    p, r = s["pairwise_precision"], s["pairwise_recall"]
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return (f"| {name} | {s['num_clusters']} | {100 * s['outlier_ratio']:.0f}% | {s['nmi']:.3f} | {s['ari']:.3f} | "
            f"{p:.3f} | {r:.3f} | {f:.3f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("features", nargs="+")
    ap.add_argument("--set", default="global", help="feature set in the file (default: global)")
    ap.add_argument("--k1", type=int, nargs="+", default=[15, 20, 25, 30])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--k2", type=int, default=6)
    ap.add_argument("--min-samples", type=int, default=4)
    ap.add_argument("--kmeans", type=int, default=0, help="also k-means with this K (0: no)")
    args = ap.parse_args()
    for path in args.features:
        with np.load(path) as z:
            x, pids, camids = z[args.set], z["pids"].astype(np.int64), z["camids"].astype(np.int64)
        if (pids < 0).any():
            raise SystemExit(f"{path}: needs the true identity of every image (some pids < 0)")
        per_id = len(pids) / len(np.unique(pids))
        print(f"\n{path} [{args.set}]: {len(pids)} images, {len(np.unique(pids))} ids ({per_id:.1f} images per id)\n")
        print("| setting | clusters | outliers | NMI | ARI | pair precision | pair recall | pair F1 |")
        print("|---|---|---|---|---|---|---|---|")
        for k1 in args.k1:
            dist = jaccard_distance(x, k1=k1, k2=args.k2)
            share = reciprocal_share(knn(normalize_rows(x), k1)[1], k1)
            rules = {"eps=auto, MMT's fixed share": rho_eps(dist, AUTO_EPS_RHO),
                     f"eps=auto, reciprocal share ({share * (len(x) - 1):.1f} pairs/image)": rho_eps(dist, share)}
            for name, eps in [*((f"k1 {k1}, eps {e:.2f}", e) for e in args.eps),
                              *((f"k1 {k1}, {rule}: eps {e:.3f}", e) for rule, e in rules.items())]:
                print(row(name, dbscan_precomputed(dist, eps=eps, min_samples=args.min_samples), pids, camids))
        if args.kmeans:
            print(row(f"k-means K {args.kmeans}", kmeans_labels(normalize_rows(x), args.kmeans, seed=0), pids, camids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
