"""Benchmark: lf2core.evaluation.evaluate_rank on a random Market-1501-sized problem.

Problem (defaults = Market-1501 test split): 3,368 queries, 15,913 gallery entries, 751 identities,
6 cameras, 2,793 distractors (pid 0) in the gallery, float32 distances (Gaussian, true matches closer
so that mAP is ~0.6). Compared with:

- ``loop``: a per-query numpy loop in the style of torchreid's ``eval_market1501`` (one stable argsort
  per query, boolean masks, cumsum) -- the common implementation; run on all queries (or on
  ``--loop-queries`` of them and extrapolated);
- ``python``: the plain-Python reference of tests/test_evaluation.py (sorted() per query) on
  ``--python-queries`` queries, extrapolated to all queries.

Agreement: max |difference| of mAP, mINP and the CMC curve between evaluate_rank and the loop on the
same queries (exact same protocol and tie rule), and against the plain-Python reference on its subset.
Peak memory: the highest RSS above the pre-call RSS, sampled every 5 ms from /proc/self/statm while
evaluate_rank runs (the [Q, G] float32 input itself, 214 MB, is not counted).

    .venv/bin/python bench/evaluate.py
    .venv/bin/python bench/evaluate.py --distance-dim 2048   # also time pairwise_distance on features
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
import torch

from lf2core.evaluation import evaluate_features, evaluate_rank, pairwise_distance

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """Context manager sampling the process RSS; ``.peak_above`` = max RSS - RSS at entry (bytes)."""

    def __enter__(self) -> "PeakRss":
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        self.peak_above = self.peak - self.base


def make_problem(nq: int, ng: int, ids: int, cams: int, distractors: int, seed: int):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, ids + 1, nq)
    g_pids = np.concatenate([rng.integers(1, ids + 1, ng - distractors), np.zeros(distractors, np.int64)])
    rng.shuffle(g_pids)
    q_camids = rng.integers(0, cams, nq)
    g_camids = rng.integers(0, cams, ng)
    # non-matches ~ N(1, 0.1), true matches ~ N(0.65, 0.12): mAP ~ 0.6, like a mid-quality model
    distmat = (1.0 + 0.1 * rng.standard_normal((nq, ng), dtype=np.float32)).astype(np.float32)
    for s in range(0, nq, 512):
        m = q_pids[s : s + 512, None] == g_pids[None, :]
        distmat[s : s + 512][m] = 0.65 + 0.12 * rng.standard_normal(int(m.sum()), dtype=np.float32)
    return distmat, q_pids, g_pids, q_camids, g_camids


def loop_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Per-query numpy loop (torchreid eval_market1501 style; stable sort = same tie rule)."""
    aps, inps, cmcs = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        gp, gc = g_pids[order], g_camids[order]
        keep = ~((gp == q_pids[i]) & (gc == q_camids[i]))
        raw = (gp[keep] == q_pids[i]).astype(np.int64)
        if not raw.any():
            continue
        cmc = raw.cumsum()
        pos = np.nonzero(raw)[0]
        inps.append(cmc[pos[-1]] / (pos[-1] + 1.0))
        c = (cmc >= 1).astype(np.float64)
        if len(c) < max_rank:
            c = np.concatenate([c, np.ones(max_rank - len(c))])
        cmcs.append(c[:max_rank])
        aps.append(((cmc / np.arange(1, len(cmc) + 1)) * raw).sum() / raw.sum())
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "cmc": np.mean(cmcs, axis=0)}


def python_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_evaluation import brute_force

    return brute_force(distmat.tolist(), q_pids.tolist(), g_pids.tolist(), q_camids.tolist(),
                       g_camids.tolist(), max_rank)


def diff(a, b) -> float:
    return max(abs(a["mAP"] - b["mAP"]), abs(a["mINP"] - b["mINP"]), float(np.max(np.abs(a["cmc"] - b["cmc"]))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=3368)
    ap.add_argument("--gallery", type=int, default=15913)
    ap.add_argument("--ids", type=int, default=751)
    ap.add_argument("--cams", type=int, default=6)
    ap.add_argument("--distractors", type=int, default=2793)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="evaluate_rank runs (best and median reported)")
    ap.add_argument("--loop-queries", type=int, default=0, help="queries for the numpy loop (0 = all)")
    ap.add_argument("--python-queries", type=int, default=100)
    ap.add_argument("--distance-dim", type=int, default=0, help="also time pairwise_distance at this dim")
    ap.add_argument("--rerank-dim", type=int, default=0,
                    help="also time plain vs re-ranked evaluate_features on clustered features of this dim")
    args = ap.parse_args()

    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load avg {os.getloadavg()}")
    t0 = time.perf_counter()
    prob = make_problem(args.queries, args.gallery, args.ids, args.cams, args.distractors, args.seed)
    distmat, q_pids, g_pids, q_camids, g_camids = prob
    print(f"problem {distmat.shape} float32 built in {time.perf_counter() - t0:.1f}s")

    times, res = [], None
    for _ in range(args.repeats):
        with PeakRss() as mem:
            t = time.perf_counter()
            res = evaluate_rank(*prob)
            times.append(time.perf_counter() - t)
    print(f"evaluate_rank: best {min(times):.2f}s median {float(np.median(times)):.2f}s "
          f"(runs {', '.join(f'{x:.2f}' for x in times)}); peak RSS above input {mem.peak_above / 2**20:.0f} MiB")
    print(f"  mAP {res['mAP']:.4f} R1 {res['cmc'][0]:.4f} R10 {res['cmc'][9]:.4f} mINP {res['mINP']:.4f} "
          f"valid queries {res['num_valid_queries']}")

    nl = args.loop_queries or args.queries
    t = time.perf_counter()
    ref = loop_eval(distmat[:nl], q_pids[:nl], g_pids, q_camids[:nl], g_camids)
    t_loop = (time.perf_counter() - t) * args.queries / nl
    sub = evaluate_rank(distmat[:nl], q_pids[:nl], g_pids, q_camids[:nl], g_camids)
    note = "" if nl == args.queries else f" (extrapolated from {nl} queries)"
    print(f"numpy per-query loop: {t_loop:.2f}s{note}; max |diff| (mAP, mINP, CMC) {diff(sub, ref):.2e}")

    npy = args.python_queries
    if npy > 0:
        t = time.perf_counter()
        pref = python_eval(distmat[:npy], q_pids[:npy], g_pids, q_camids[:npy], g_camids)
        t_py = (time.perf_counter() - t) * args.queries / npy
        sub = evaluate_rank(distmat[:npy], q_pids[:npy], g_pids, q_camids[:npy], g_camids)
        print(f"plain-Python loop: {t_py:.1f}s (extrapolated from {npy} queries); "
              f"max |diff| {diff(sub, {**pref, 'cmc': pref['cmc']}):.2e}")

    if args.distance_dim > 0:
        del distmat, prob
        rng = np.random.default_rng(1)
        q = rng.standard_normal((args.queries, args.distance_dim), dtype=np.float32)
        g = rng.standard_normal((args.gallery, args.distance_dim), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        t = time.perf_counter()
        d = pairwise_distance(q, g)
        print(f"pairwise_distance {q.shape} x {g.shape}: {time.perf_counter() - t:.2f}s "
              f"(max |d - (2 - 2 q.g)| on 100 rows {np.abs(d[:100] - (2 - 2 * q[:100] @ g.T)).max():.1e})")
    if args.rerank_dim > 0:
        rng = np.random.default_rng(2)
        centres = rng.standard_normal((args.ids + 1, args.rerank_dim), dtype=np.float32)
        noise = 2.0  # per-image noise vs unit-variance identity centres: plain mAP ~ 0.5
        qf = centres[q_pids] + noise * rng.standard_normal((args.queries, args.rerank_dim), dtype=np.float32)
        gf = centres[g_pids] + noise * rng.standard_normal((args.gallery, args.rerank_dim), dtype=np.float32)
        nd = int((g_pids == 0).sum())  # distractors: no identity centre, same norm statistics
        gf[g_pids == 0] = np.sqrt(1 + noise**2) * rng.standard_normal((nd, args.rerank_dim), dtype=np.float32)
        qf /= np.linalg.norm(qf, axis=1, keepdims=True)
        gf /= np.linalg.norm(gf, axis=1, keepdims=True)
        for rr in (False, True):
            with PeakRss() as mem:
                t = time.perf_counter()
                out = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, rerank=rr)
                dt = time.perf_counter() - t
            print(f"evaluate_features(rerank={rr}) dim {args.rerank_dim}: {dt:.1f}s, peak RSS above start "
                  f"{mem.peak_above / 2**20:.0f} MiB; mAP {out['mAP']:.4f} R1 {out['R1']:.4f} "
                  f"mINP {out['mINP']:.4f}")
            del out
    print(f"load avg at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
