"""Benchmark: sparse k-reciprocal Jaccard + DBSCAN (lf2core.cluster) vs the dense reference algorithm.

Every configuration runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own.

    .venv/bin/python bench/cluster.py                       # the default set below (many minutes on 2 cores)
    .venv/bin/python bench/cluster.py --only sparse:12936:2048 dense:12936:2048

Configurations ``KIND:N:D``: ``sparse`` = knn + jaccard_distance (full matrix: every pair sharing a column
of V) + DBSCAN of lf2core.cluster; ``pipe`` = the same as ``pseudo_labels`` runs it (only entries <= eps
stored: identical labels, far less memory); ``dense`` = the
same faiss kNN, then the reference algorithm with dense N x N float32 matrices and per-row Python loops
(``dense_jaccard_reference`` in tests/test_cluster_jaccard.py, written from the SpCL semantics), then
sklearn DBSCAN(metric="precomputed") on the dense matrix -- what SpCL / OpenUnReID do.

Data: synthetic re-ID-like features (L2-normalised): ``N / per_id`` identities with random centres,
a per-camera offset (6 cameras) and Gaussian noise, rows shuffled (no index locality). k1=30, k2=6,
eps=0.6, min_samples=4.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ["sparse:12936:2048", "pipe:12936:2048", "dense:12936:2048", "pipe:10000:256", "pipe:30000:256",
           "pipe:100000:256"]


def synth(n: int, d: int, per_id: float = 17.2, cams: int = 6, noise: float = 1.0, cam_w: float = 0.35,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-ID-like features ``[n, d]`` float32 (unit rows), identities ``[n]``, cameras ``[n]``."""
    rng = np.random.default_rng(seed)
    ids = max(1, int(round(n / per_id)))
    pid = rng.integers(0, ids, size=n)
    cam = rng.integers(0, cams, size=n)
    centers = rng.standard_normal((ids, d), dtype=np.float32)
    cam_vec = rng.standard_normal((cams, d), dtype=np.float32)
    x = np.empty((n, d), dtype=np.float32)
    step = 4096  # in chunks: the generator's own peak memory stays ~ the features
    for a in range(0, n, step):
        b = min(n, a + step)
        x[a:b] = centers[pid[a:b]]
        x[a:b] += cam_w * cam_vec[cam[a:b]]
        x[a:b] += noise * rng.standard_normal((b - a, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, pid, cam


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(kind: str, n: int, d: int, per_id: float, labels_out: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from lf2core.cluster import cluster_stats, dbscan_precomputed, knn
    from lf2core.cluster.jaccard import build_v, jaccard_from_v

    x, pid, cam = synth(n, d, per_id=per_id)
    res: dict = {"kind": kind, "N": n, "d": d, "per_id": per_id, "rss_data_mb": round(_rss_mb(), 1)}
    t0 = time.perf_counter()
    sims, rank = knn(x, 30)
    t1 = time.perf_counter()
    res["knn_s"] = t1 - t0
    if kind in ("sparse", "pipe"):
        v = build_v(x, rank, sims, 30, 6)
        t2 = time.perf_counter()
        dist = jaccard_from_v(v, max_distance=0.6 if kind == "pipe" else None)
        t3 = time.perf_counter()
        labels = dbscan_precomputed(dist, 0.6, 4)
        t4 = time.perf_counter()
        res.update(v_s=t2 - t1, minsum_s=t3 - t2, dbscan_s=t4 - t3, v_nnz_per_row=v.nnz / n,
                   dist_nnz_per_row=dist.nnz / n, dist_mb=(dist.data.nbytes + dist.indices.nbytes
                                                           + dist.indptr.nbytes) / 2**20)
    elif kind == "dense":
        spec = importlib.util.spec_from_file_location("ref", ROOT / "tests" / "test_cluster_jaccard.py")
        ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ref)  # type: ignore[union-attr]
        from sklearn.cluster import DBSCAN

        dist = ref.dense_jaccard_reference(x, 30, 6, initial_rank=rank, dtype=np.float32)
        t3 = time.perf_counter()
        labels = DBSCAN(eps=0.6, min_samples=4, metric="precomputed", n_jobs=-1).fit_predict(dist)
        t4 = time.perf_counter()
        res.update(jaccard_s=t3 - t1, dbscan_s=t4 - t3)
    else:
        raise SystemExit(f"unknown kind {kind}")
    res["after_knn_s"] = t4 - t1
    res["total_s"] = t4 - t0
    res["peak_rss_mb"] = round(_rss_mb(), 1)
    st = cluster_stats(labels, true_ids=pid, camids=cam)
    res.update({k: st[k] for k in ("num_clusters", "outlier_ratio", "nmi", "ari", "pairwise_precision",
                                   "pairwise_recall")})
    np.save(labels_out, labels)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=DEFAULT, help="configurations KIND:N:D")
    ap.add_argument("--per-id", type=float, default=17.2, help="images per identity (Market-1501: 17.2)")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "N", "D"), help=argparse.SUPPRESS)
    ap.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, n, d = args.worker
        print("RESULT " + json.dumps(worker(kind, int(n), int(d), args.per_id, args.labels_out)), flush=True)
        return

    print(f"# load average at start: {os.getloadavg()}, cpus: {os.cpu_count()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="lf2-bench-cluster-"))
    results = []
    for spec in args.only:
        kind, n, d = spec.split(":")
        out = tmp / f"{kind}-{n}-{d}.npy"
        cmd = [sys.executable, __file__, "--worker", kind, n, d, "--per-id", str(args.per_id),
               "--labels-out", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{spec}: FAILED (rc {p.returncode})\n{p.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(line[0][7:])
        r["labels"] = str(out)
        results.append(r)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    print(f"# load average at end: {os.getloadavg()}")

    by = {(r["kind"], r["N"], r["d"]): r for r in results}
    for s, dn in ((by.get(("sparse", 12936, 2048)), by.get(("dense", 12936, 2048))),
                  (by.get(("pipe", 12936, 2048)), by.get(("dense", 12936, 2048)))):
        if not (s and dn):
            continue
        a, b = np.load(s["labels"]), np.load(dn["labels"])
        from sklearn.metrics import adjusted_rand_score

        print(f"\nN=12936 x 2048: {s['kind']} total {s['total_s']:.1f}s vs dense {dn['total_s']:.1f}s "
              f"-> {dn['total_s'] / s['total_s']:.1f}x; after-kNN {s['after_knn_s']:.2f}s = "
              f"{100 * s['after_knn_s'] / s['knn_s']:.0f}% of kNN {s['knn_s']:.2f}s (dense after-kNN "
              f"{dn['after_knn_s']:.1f}s); peak RSS {s['peak_rss_mb']:.0f} vs {dn['peak_rss_mb']:.0f} MB; "
              f"identical DBSCAN labels: {bool(np.array_equal(a, b))} (ARI {adjusted_rand_score(a, b):.6f})")
    print("\n| config | kNN s | V s | min-sum s | DBSCAN s | after kNN s | total s | after/kNN | peak RSS MB "
          "| dist nnz/row | clusters | NMI |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['kind']} {r['N']}x{r['d']} | {r['knn_s']:.2f} | {r.get('v_s', float('nan')):.2f} | "
              f"{r.get('minsum_s', r.get('jaccard_s', float('nan'))):.2f} | {r['dbscan_s']:.2f} | "
              f"{r['after_knn_s']:.2f} | {r['total_s']:.2f} | {100 * r['after_knn_s'] / r['knn_s']:.0f}% | "
              f"{r['peak_rss_mb']:.0f} | {r.get('dist_nnz_per_row', float('nan')):.0f} | {r['num_clusters']} | "
              f"{r['nmi']:.3f} |")


if __name__ == "__main__":
    main()
