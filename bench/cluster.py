"""Benchmark: sparse k-reciprocal Jaccard + DBSCAN (lf2core.cluster) vs the dense SpCL-style reference.

Every configuration runs in its own subprocess so that its peak RSS (``ru_maxrss`` of the whole process:
imports, features, everything) is its own.

    .venv/bin/python bench/cluster.py                       # the default set below (~20 min on 2 cores)
    .venv/bin/python bench/cluster.py --only pipe:12936:2048 dense:12936:2048 --repeat 3

Configurations ``KIND:N:D``: ``sparse`` = ``knn`` + ``jaccard_distance`` (full matrix: every pair sharing a
column of V) + DBSCAN of lf2core.cluster; ``pipe`` = ``pseudo_labels`` itself (features to labels; only
entries <= eps stored: identical labels, far less memory); ``dense`` = what SpCL / OpenUnReID do: a faiss
``IndexFlatIP`` exact search (SpCL's CPU path), the reference algorithm with dense N x N float32 matrices
and per-row Python loops (``dense_jaccard_reference`` in tests/test_cluster_jaccard.py, written from the
SpCL semantics), then sklearn DBSCAN(metric="precomputed") on the dense matrix.

Beside every kNN time the worker prints the machine's sgemm roofline, measured in the same process just
before the search: the GFLOP/s of a plain ``[4096, d] @ [d, 4096]`` float32 product (torch, the library
the kNN uses), best of 3; the kNN's effective rate is ``2 N^2 d / time``.

The driver asserts that the ``sparse`` / ``pipe`` labels equal the ``dense`` labels of the same N x d
(exit status 1 otherwise). ``--repeat R`` runs the whole list R times, interleaved (a configuration
``KIND:N:D:R`` sets its own count), and reports medians and the min-max spread.

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
DEFAULT = ["pipe:12936:2048:3", "dense:12936:2048:3", "sparse:12936:2048:3", "pipe:100000:256:1",
           "pipe:200000:256:1"]


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
        x[a:b] /= np.linalg.norm(x[a:b], axis=1, keepdims=True)
    return x, pid, cam


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sgemm_roofline(d: int, rows: int = 4096, reps: int = 3) -> float:
    """GFLOP/s of a plain ``[rows, d] @ [d, rows]`` float32 torch product, best of ``reps`` (one warm-up)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, d, generator=g)
    b = torch.randn(rows, d, generator=g)
    c = torch.empty(rows, rows)
    torch.mm(a, b.T, out=c)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b.T, out=c)
        best = min(best, time.perf_counter() - t)
    return 2.0 * rows * rows * d / best / 1e9


def worker(kind: str, n: int, d: int, per_id: float, labels_out: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: F401  the cluster stage has torch loaded; its import is counted in every peak RSS

    from lf2core.cluster import cluster_stats, dbscan_precomputed, knn, pseudo_labels
    from lf2core.cluster.jaccard import build_v, jaccard_from_v

    res: dict = {"kind": kind, "N": n, "d": d, "per_id": per_id, "rss_imports_mb": round(_rss_mb(), 1)}
    x, pid, cam = synth(n, d, per_id=per_id)
    res["rss_data_mb"] = round(_rss_mb(), 1)
    res["roofline_gflops"] = sgemm_roofline(d)
    flop = 2.0 * n * n * d
    if kind == "pipe":
        t = {}
        t0 = time.perf_counter()
        labels = pseudo_labels(x, "dbscan", k1=30, k2=6, eps=0.6, min_samples=4, timings=t)
        t4 = time.perf_counter()
        res.update(knn_s=t["knn_s"], v_s=t["v_s"], minsum_s=t["minsum_s"], dbscan_s=t["dbscan_s"],
                   v_nnz_per_row=t["v_nnz"] / n, dist_nnz_per_row=t["nnz"] / n, knn_backend=t["knn_backend"])
        res["after_knn_s"] = t4 - t0 - t["knn_s"]
    elif kind == "sparse":
        t0 = time.perf_counter()
        sims, rank = knn(x, 30, index_dtype=np.int32)
        t1 = time.perf_counter()
        v = build_v(x, rank, sims, 30, 6)
        t2 = time.perf_counter()
        dist = jaccard_from_v(v)
        t3 = time.perf_counter()
        labels = dbscan_precomputed(dist, 0.6, 4)
        t4 = time.perf_counter()
        res.update(knn_s=t1 - t0, v_s=t2 - t1, minsum_s=t3 - t2, dbscan_s=t4 - t3, v_nnz_per_row=v.nnz / n,
                   dist_nnz_per_row=dist.nnz / n, dist_mb=(dist.data.nbytes + dist.indices.nbytes
                                                           + dist.indptr.nbytes) / 2**20)
        res["after_knn_s"] = t4 - t1
    elif kind == "dense":
        spec = importlib.util.spec_from_file_location("ref", ROOT / "tests" / "test_cluster_jaccard.py")
        ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ref)  # type: ignore[union-attr]
        import faiss
        from sklearn.cluster import DBSCAN

        t0 = time.perf_counter()
        index = faiss.IndexFlatIP(d)  # SpCL's CPU search (compute_jaccard_distance, search_option=3)
        index.add(x)
        _, rank = index.search(x, 30)
        del index
        t1 = time.perf_counter()
        dist = ref.dense_jaccard_reference(x, 30, 6, initial_rank=rank, dtype=np.float32)
        t3 = time.perf_counter()
        labels = DBSCAN(eps=0.6, min_samples=4, metric="precomputed", n_jobs=-1).fit_predict(dist)
        t4 = time.perf_counter()
        res.update(knn_s=t1 - t0, jaccard_s=t3 - t1, dbscan_s=t4 - t3, after_knn_s=t4 - t1)
    else:
        raise SystemExit(f"unknown kind {kind}")
    res["total_s"] = t4 - t0
    res["knn_gflops"] = flop / res["knn_s"] / 1e9
    res["peak_rss_mb"] = round(_rss_mb(), 1)
    st = cluster_stats(labels, true_ids=pid, camids=cam)
    res.update({k: st[k] for k in ("num_clusters", "outlier_ratio", "nmi", "ari", "pairwise_precision",
                                   "pairwise_recall")})
    np.save(labels_out, labels)
    return res


def _med(vals: list) -> tuple[float, float, float]:
    return float(np.median(vals)), float(np.min(vals)), float(np.max(vals))


def _fmt(vals: list, digits: int = 2) -> str:
    m, lo, hi = _med(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=DEFAULT, help="configurations KIND:N:D[:REPEATS]")
    ap.add_argument("--repeat", type=int, default=1, help="run the whole list this many times, interleaved")
    ap.add_argument("--per-id", type=float, default=17.2, help="images per identity (Market-1501: 17.2)")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "N", "D"), help=argparse.SUPPRESS)
    ap.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, n, d = args.worker
        print("RESULT " + json.dumps(worker(kind, int(n), int(d), args.per_id, args.labels_out)), flush=True)
        return

    print(f"# {time.strftime('%Y-%m-%d %H:%M')} load average at start: {os.getloadavg()}, "
          f"cpus: {os.cpu_count()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="lf2-bench-cluster-"))
    runs: dict = {}
    specs = [(sp.split(":") + [str(args.repeat)])[:4] for sp in args.only]
    for rep in range(max(int(r) for *_, r in specs)):
        for kind, n, d, reps in specs:
            if rep >= int(reps):
                continue
            spec = f"{kind}:{n}:{d}"
            out = tmp / f"{kind}-{n}-{d}-{rep}.npy"
            cmd = [sys.executable, __file__, "--worker", kind, n, d, "--per-id", str(args.per_id),
                   "--labels-out", str(out)]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{spec}: FAILED (rc {p.returncode})\n{p.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(line[0][7:])
            r["labels"] = str(out)
            r["load1"] = os.getloadavg()[0]
            runs.setdefault((kind, int(n), int(d)), []).append(r)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} load average at end: {os.getloadavg()}")

    same = True
    for (kind, n, d), rs in runs.items():
        dn = runs.get(("dense", n, d))
        if kind == "dense" or not dn:
            continue
        for r in rs:  # every run's labels against every dense run's labels
            for q in dn:
                same &= bool(np.array_equal(np.load(r["labels"]), np.load(q["labels"])))
        tot, dtot = [r["total_s"] for r in rs], [q["total_s"] for q in dn]
        pairs = [q["total_s"] / r["total_s"] for r, q in zip(rs, dn)]  # the same repetition: same load
        print(f"\nN={n} x {d}: {kind} total {_fmt(tot)} s vs dense {_fmt(dtot)} s -> "
              f"{_fmt(pairs, 1)}x (per repetition); kNN {_fmt([r['knn_s'] for r in rs])} s vs faiss flat "
              f"{_fmt([q['knn_s'] for q in dn])} s; after kNN {_fmt([r['after_knn_s'] for r in rs])} s vs "
              f"{_fmt([q['after_knn_s'] for q in dn])} s; identical DBSCAN labels: {same}")
    print("\n| config | runs | kNN s | kNN GFLOP/s | sgemm roofline GFLOP/s | kNN / roofline | V s | min-sum s "
          "| DBSCAN s | after kNN s | total s | peak RSS MB | dist nnz/row | clusters | NMI |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (kind, n, d), rs in runs.items():
        g = lambda key: _fmt([r[key] for r in rs]) if key in rs[0] else "-"  # noqa: E731
        print(f"| {kind} {n}x{d} | {len(rs)} | {g('knn_s')} | {_fmt([r['knn_gflops'] for r in rs], 0)} | "
              f"{_fmt([r['roofline_gflops'] for r in rs], 0)} | "
              f"{_fmt([r['knn_gflops'] / r['roofline_gflops'] for r in rs])} | {g('v_s')} | "
              f"{_fmt([r.get('minsum_s', r.get('jaccard_s')) for r in rs])} | {g('dbscan_s')} | "
              f"{g('after_knn_s')} | {g('total_s')} | {_fmt([r['peak_rss_mb'] for r in rs], 0)} | "
              f"{rs[0].get('dist_nnz_per_row', float('nan')):.0f} | {rs[0]['num_clusters']} | {rs[0]['nmi']:.3f} |")
    if not same:
        print("\nFAILED: labels differ from the dense reference")
        sys.exit(1)


if __name__ == "__main__":
    main()
