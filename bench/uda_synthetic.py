"""Synthetic a -> b domain adaptation benchmark: source-only, mt_global, LF2 (k-means / DBSCAN, camera
options), LF2 on true labels, oracle.

    python bench/uda_synthetic.py --out docs/results.md --json runs/uda.json [--work runs/uda] [--seeds 1 2 3]
        [--set finetune.rounds=8 ...] [--skip lf2_camera_proxy ...] [--fusion] [--long] [--jobs 2] [--threads 1]

Every method uses the demo recipe (configs/demo.yaml, plus the ``--set`` overrides, the same for all, e.g.
``--set data.synth.version=1.1`` for the earlier generator) and the same stage functions as the pipeline:

- ``source_only``: the pretrain output (source a, ids a) evaluated on target b;
- ``mt_global``: ``run_local`` with ``finetune.variant=mt_global`` (one mean teacher, global features and
  global pseudo labels only; MMT-style baseline) with the SAME clustering as ``lf2_dbscan``;
- ``lf2_dbscan``: LF2 with label-free DBSCAN (``cluster.eps=auto``); ``lf2_dbscan_eps06``: the paper's fixed
  eps 0.6; ``lf2_kmeans``: k-means with K = the true number of target identities (200: NOT label-free, the
  paper's setting);
- camera options on top of ``lf2_dbscan``: ``lf2_camera_norm`` (``cluster.camera_norm=center``) and
  ``lf2_camera_proxy`` (``finetune.camera_proxy_weight``: inter-camera proxy contrastive loss); combined:
  ``lf2_camera_norm_eps06`` (centring with the paper's eps 0.6), ``lf2_camera_norm_proxy`` (centring and the
  proxy loss), ``lf2_camera_norm_k1auto`` (centring, eps and k1 chosen from the data), and
  ``mt_global_camera_norm_eps06`` (the global-only mean teacher with ``lf2_camera_norm_eps06``'s clustering);
- ``lf2_camera_norm_eps06_24r`` (``--long``): ``lf2_camera_norm_eps06`` at 24 rounds, four times the
  fine-tuning budget (its per-round curve gives the 12-round figure too: a round depends only on the rounds
  before it);
- ``lf2_true_labels``: LF2 fine-tuned on the TRUE target train ids (``cluster.method=ground_truth``): the
  ceiling of the fine-tuning recipe at this budget with perfect pseudo labels (not a UDA result);
- ``lf2_kmeans_fusion`` (``--fusion``): LF2 with ``finetune.fusion_loss_weight=0.5`` (trained attention);
- ``oracle``: the same network and pretraining recipe trained on target b's train split with its TRUE ids.

All evaluations are on the target test split (query/gallery); the per-round evaluations are reporting
only (curves), nothing is selected with them. Writes the markdown report (``--out``), the JSON
(``--json``: ``{method: {"mAP", "R1"}}`` as fractions, averaged over seeds, plus ``details``), and one plot
next to the report (``<report stem>_uda.png``: ``docs/results_uda.png``). The tasks of all seeds (prepare, pretrain, oracle pretrain,
each fine-tuning run, evaluations) run ``--jobs`` at a time in worker processes, each once its inputs
exist (one intra-op thread per task is fastest on a small shared CPU). Work directories are kept under
``--work`` (resumable: finished stages are skipped when the command is re-run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lf2core import artifacts, storage  # noqa: E402
from lf2core.config import load_config  # noqa: E402

log = logging.getLogger("bench.uda")


#: every method starts from the paper's clustering settings (k-means; eps 0.6 when DBSCAN; no camera
#: normalisation), not from the demo's defaults, so a change of the demo recipe does not change what a method is
BASE = ["cluster.method=kmeans", "cluster.eps=0.6", "cluster.camera_norm=none"]
LABEL_FREE = ["cluster.method=dbscan", "cluster.eps=auto"]
RUNS = {  # name -> config overrides on top of the demo recipe + BASE (and --set)
    "mt_global": ["finetune.variant=mt_global", *LABEL_FREE],
    "lf2_kmeans": ["cluster.method=kmeans"],
    "lf2_dbscan": LABEL_FREE,
    "lf2_dbscan_eps06": ["cluster.method=dbscan", "cluster.eps=0.6"],
    "lf2_camera_norm": [*LABEL_FREE, "cluster.camera_norm=center"],
    "lf2_camera_proxy": [*LABEL_FREE, "finetune.camera_proxy_weight=0.5"],
    "lf2_camera_norm_eps06": ["cluster.method=dbscan", "cluster.eps=0.6", "cluster.camera_norm=center"],
    "lf2_camera_norm_proxy": [*LABEL_FREE, "cluster.camera_norm=center", "finetune.camera_proxy_weight=0.5"],
    "lf2_camera_norm_k1auto": [*LABEL_FREE, "cluster.camera_norm=center", "cluster.k1=auto"],
    # the global-only mean teacher with the best label-free labels: do the part branches help there?
    "mt_global_camera_norm_eps06": ["finetune.variant=mt_global", "cluster.method=dbscan", "cluster.eps=0.6",
                                    "cluster.camera_norm=center"],
    # the same recipe at four times the fine-tuning budget (--long): how far the curve still goes
    "lf2_camera_norm_eps06_24r": ["cluster.method=dbscan", "cluster.eps=0.6", "cluster.camera_norm=center",
                                  "finetune.rounds=24"],
    "lf2_true_labels": ["cluster.method=ground_truth"],
    "lf2_kmeans_fusion": ["cluster.method=kmeans", "finetune.fusion_loss_weight=0.5"],
}
OPTIONAL = {"lf2_kmeans_fusion": "fusion", "lf2_camera_norm_eps06_24r": "long"}  # run -> the flag that adds it
NOT_UDA = {"lf2_true_labels": "ceiling: true target ids"}


def seed_tasks(extras: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """The work of one seed as ``{task: [tasks it needs]}`` (each task is one process-sized unit)."""
    tasks = {"prepare": [], "pretrain": ["prepare"], "source_only_eval": ["pretrain"],
             "oracle_pretrain": ["prepare"], "oracle_eval": ["oracle_pretrain"]}
    for name in RUNS:
        if name not in skip and OPTIONAL.get(name, "") in ("", *extras):
            tasks[name] = ["pretrain"]
    return tasks


# within a seed, longest first when several are ready (quiet 2-core machine, 1 thread: pretrain 4-5.5 min,
# a 6-round fine-tuning run 3.5-6.5 min; see docs/benchmarks.md); seeds in order, so a run cut short
# leaves whole seeds
PRIORITY = ("pretrain", "oracle_pretrain", "lf2_camera_norm_eps06_24r", "lf2_kmeans_fusion",
            "lf2_camera_norm_proxy", "lf2_camera_proxy", "lf2_camera_norm_eps06", "lf2_camera_norm_k1auto",
            "mt_global_camera_norm_eps06", "lf2_kmeans", "lf2_dbscan", "lf2_dbscan_eps06", "lf2_camera_norm",
            "lf2_true_labels", "mt_global")


def run_task(seed: int, task: str, work: str, overrides: list[str], threads: int) -> tuple[Any, float]:
    """Run one task of one seed (skipped when its output is complete); returns (result, seconds)."""
    from lf2core.stages.evaluate import evaluate
    from lf2core.stages.prepare import prepare_data
    from lf2core.stages.pretrain import pretrain_source
    from lf2core.stages.run_local import run_local, target_as_source_manifest

    torch.set_num_threads(threads)
    t0 = time.time()
    base = [f"seed={seed}", *BASE, *overrides]
    cfg = load_config("demo", base)
    w = Path(work) / f"seed{seed}"
    data = str(w / "data")
    out: Any = None
    if task == "prepare":
        if not storage.is_complete(data):
            prepare_data(cfg, data)
        version = artifacts.read_json(storage.join(data, artifacts.DATA_STATS)).get("synthetic_generator_version")
        if version != cfg.data.synth.version:
            raise SystemExit(f"{data}: data from synthetic generator {version}, this run asks for "
                             f"{cfg.data.synth.version}: use a fresh --work directory")
        out = version
    elif task in ("pretrain", "oracle_pretrain"):
        src = data
        if task == "oracle_pretrain":
            src = str(w / "oracle_data")
            target_as_source_manifest(data, src)
        if not storage.is_complete(str(w / task)):
            pretrain_source(cfg, src, str(w / task))
    elif task in ("source_only_eval", "oracle_eval"):
        model = str(w / ("pretrain" if task == "source_only_eval" else "oracle_pretrain"))
        if not storage.is_complete(str(w / task)):
            evaluate(cfg, data, model, str(w / task))
        out = {"metrics": artifacts.read_metrics(str(w / task))}
    else:
        c = load_config("demo", [*base, *RUNS[task]])
        summary = run_local(c, str(w / task), data=data, source_model=str(w / "pretrain"), eval_every=1)
        out = {"metrics": summary["metrics"], "rounds": summary["rounds"], "seconds": summary["seconds"]}
    seconds = time.time() - t0
    log.info("seed %d %s done in %.0fs", seed, task, seconds)
    return out, seconds


def _worker_init() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("LF2_PROGRESS", "0")


def run_all(seeds: list[int], work: Path, overrides: list[str], extras: tuple[str, ...], jobs: int,
            threads: int, skip: tuple[str, ...] = ()) -> dict[int, dict[str, Any]]:
    """Every task of every seed on ``jobs`` worker processes, each task once its inputs are done."""
    import concurrent.futures as cf
    import multiprocessing as mp

    graph = {(s, t): [(s, d) for d in deps] for s in seeds for t, deps in seed_tasks(extras, skip).items()}
    rank = {t: i for i, t in enumerate(PRIORITY)}
    done: set[tuple[int, str]] = set()
    per_seed: dict[int, dict[str, Any]] = {s: {"_seconds": {}} for s in seeds}
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        running: dict[cf.Future, tuple[int, str]] = {}
        while len(done) < len(graph):
            ready = [k for k in graph if k not in done and k not in running.values()
                     and all(d in done for d in graph[k])]
            for s, t in sorted(ready, key=lambda k: (k[0], rank.get(k[1], len(rank))))[: jobs - len(running)]:
                running[pool.submit(run_task, s, t, str(work), overrides, threads)] = (s, t)
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                s, t = running.pop(fut)
                try:
                    out, seconds = fut.result()
                except Exception as e:  # stop the benchmark: no new tasks, one clear line
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise SystemExit(f"seed {s} task {t} failed: {type(e).__name__}: {e}") from e
                done.add((s, t))
                per_seed[s]["_seconds"][t] = seconds
                if t == "prepare":
                    per_seed[s]["_generator_version"] = out
                elif out is not None:
                    per_seed[s][t.replace("_eval", "")] = out
    return per_seed


def _eps(c: dict[str, Any]) -> str:
    eps = c.get("eps")
    return "" if eps is None else f"{eps:.3f}"


LABEL_STATS = (("num_clusters", "clusters", "{:.0f}"), ("k1", "k1", "{:.0f}"), ("eps", "eps", "{:.3f}"),
               ("outlier_ratio", "outliers", "{:.0%}"),
               ("pairwise_precision", "pair precision", "{:.2f}"), ("pairwise_recall", "pair recall", "{:.2f}"),
               ("nmi", "NMI", "{:.3f}"))


def label_quality(per_seed: dict[int, dict], methods: list[str]) -> list[str]:
    """Markdown lines: the global pseudo labels of the first and the last round of every fine-tuning method,
    mean over seeds (min-max in brackets), and the final mAP per seed."""
    lines = ["## Pseudo labels, all seeds (global label set; mean over seeds, [min-max])", "",
             "| method | round | " + " | ".join(h for _, h, _ in LABEL_STATS) + " | final mAP per seed |",
             "|---|---|" + "---|" * len(LABEL_STATS) + "---|"]
    for m in methods:
        if m not in RUNS or m == "lf2_true_labels":
            continue
        seeds = sorted(per_seed)
        finals = " / ".join(f"{100 * per_seed[s][m]['metrics']['mAP']:.1f}" for s in seeds)
        last = len(per_seed[seeds[0]][m]["rounds"]) - 1
        for k, r in ((0, 1), (last, last + 1)):
            cells = []
            for key, _, fmt in LABEL_STATS:
                vals = [per_seed[s][m]["rounds"][k]["cluster"].get("global", {}).get(key) for s in seeds]
                vals = [float(v) for v in vals if isinstance(v, (int, float))]
                cells.append("" if not vals else fmt.format(np.mean(vals)) + (
                    f" [{fmt.format(min(vals))}-{fmt.format(max(vals))}]" if len(vals) > 1 else ""))
            lines.append(f"| {m if k == 0 else ''} | {r} | " + " | ".join(cells) + f" | {finals if k == 0 else ''} |")
    return [*lines, ""]


def gap_closed(m: float, src: float, orc: float) -> float:
    return (m - src) / (orc - src) if orc != src else float("nan")


def plot(per_seed: dict[int, dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = {"mt_global": "#9467bd", "lf2_kmeans": "#1f77b4", "lf2_dbscan": "#2ca02c", "lf2_dbscan_eps06": "#bcbd22",
              "lf2_camera_norm": "#17becf", "lf2_camera_proxy": "#d62728", "lf2_kmeans_fusion": "#ff7f0e",
              "lf2_camera_norm_eps06": "#8c564b", "lf2_camera_norm_proxy": "#e377c2",
              "lf2_camera_norm_k1auto": "#000080", "lf2_camera_norm_eps06_24r": "#2f4f4f",
              "mt_global_camera_norm_eps06": "#c5b0d5", "lf2_true_labels": "#7f7f7f"}
    seed = sorted(per_seed)[0]
    res = per_seed[seed]
    for name, col in colors.items():
        if name not in res:
            continue
        rounds = res[name]["rounds"]
        xs = [r["round"] + 1 for r in rounds if "eval" in r]
        ys = [100 * r["eval"]["mAP"] for r in rounds if "eval" in r]
        ax1.plot([0, *xs], [100 * res["source_only"]["metrics"]["mAP"], *ys], "o-", color=col, label=name)
        for s, ls in (("global", "-"), ("upper", "--"), ("lower", ":")):
            nmi = [r["cluster"].get(s, {}).get("nmi") for r in rounds]
            if any(v is not None for v in nmi):
                ax2.plot([r["round"] + 1 for r in rounds], nmi, ls, color=col,
                         label=f"{name} {s}" if s == "global" or name == "lf2_dbscan" else None)
    for name, style in (("source_only", "k--"), ("oracle", "r--")):
        ax1.axhline(100 * res[name]["metrics"]["mAP"], color=style[0], ls="--", label=name)
    ax1.set_xlabel("round")
    ax1.set_ylabel("target test mAP (%)")
    ax1.set_title(f"teacher mAP after each round (seed {seed}; report only)")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("round (clustering at its start)")
    ax2.set_ylabel("NMI(pseudo labels, true ids)")
    ax2.set_title("pseudo-label quality per label set")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


def report(per_seed: dict[int, dict], args: argparse.Namespace, wall: float, png: Path) -> tuple[str, dict]:
    # source-only first, then the adaptation methods, then the references (true-label ceiling, oracle)
    order = ("source_only", *(r for r in RUNS if r not in NOT_UDA), *NOT_UDA, "oracle")
    methods = [m for m in order if all(m in r for r in per_seed.values())]
    agg: dict[str, dict[str, float]] = {}
    for m in methods:
        vals = [per_seed[s][m]["metrics"] for s in per_seed]
        agg[m] = {k: float(np.mean([v[k] for v in vals])) for k in ("mAP", "R1", "R5", "R10", "mINP")}
        agg[m]["mAP_std"] = float(np.std([v["mAP"] for v in vals]))
        agg[m]["R1_std"] = float(np.std([v["R1"] for v in vals]))
    src, orc = agg["source_only"]["mAP"], agg["oracle"]["mAP"]
    versions = sorted({str(per_seed[s].get("_generator_version")) for s in per_seed})

    cfg = load_config("demo", [*BASE, *args.set])
    lines = [
        "# Results: synthetic a -> b (demo recipe)",
        "",
        f"Produced by `python bench/uda_synthetic.py {' '.join(sys.argv[1:])}` in {wall / 60:.1f} min on "
        f"{platform.machine()} ({os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
        f"intra-op thread(s) per task, {args.jobs} task(s) at once); synthetic generator {', '.join(versions)} (read from the generated data); seeds {sorted(per_seed)}.",
        "",
        f"Recipe: `configs/demo.yaml` + `{' '.join([*BASE, *args.set])}` -> {cfg.model.arch} at "
        f"{cfg.data.height}x{cfg.data.width}; pretrain {cfg.pretrain.epochs} epochs x {cfg.pretrain.iters_per_epoch} "
        f"iters; {cfg.finetune.rounds} rounds x {cfg.finetune.epochs_per_round} epoch x "
        f"{cfg.finetune.iters_per_epoch} iters (batch {cfg.finetune.batch_size}); k-means K = "
        f"{cfg.cluster.num_clusters}; DBSCAN k1 {cfg.cluster.k1}, min_samples {cfg.cluster.min_samples}, outliers "
        f"{cfg.cluster.outliers}. Per method: "
        + "; ".join(f"`{m}`: `{' '.join(RUNS[m])}`" for m in methods if m in RUNS) + ".",
        "All numbers are on the TARGET test split (query/gallery) of the final teacher (source-only / oracle: the "
        "pretrained model). No model or round is selected with the test split; the per-round numbers below "
        "are reporting only.",
        "",
        "| method | mAP (%) | Rank-1 (%) | Rank-5 (%) | mINP (%) | gap closed |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        a = agg[m]
        std = f" ± {100 * a['mAP_std']:.1f}" if len(per_seed) > 1 else ""
        gc = "" if m in ("source_only", "oracle") else f"{100 * gap_closed(a['mAP'], src, orc):.0f}%"
        label = f"{m} ({NOT_UDA[m]})" if m in NOT_UDA else m
        std += f" | {100 * a['R1']:.1f} ± {100 * a['R1_std']:.1f}" if len(per_seed) > 1 else f" | {100 * a['R1']:.1f}"
        lines.append(f"| {label} | {100 * a['mAP']:.1f}{std} | {100 * a['R5']:.1f} | "
                     f"{100 * a['mINP']:.1f} | {gc} |")
    lines += ["", "Gap closed = (mAP - source-only mAP) / (oracle mAP - source-only mAP).", "",
              f"![mAP and pseudo-label NMI per round]({png.name})", "", *label_quality(per_seed, methods),
              "## Per round (first seed)", ""]
    s0 = per_seed[sorted(per_seed)[0]]
    for m in (*RUNS,):
        if m not in s0:
            continue
        lines += [f"### {m}", "",
                  "| round | set | clusters | k1 | eps | outliers | NMI | ARI | pair precision | pair recall | "
                  "NMI vs camera | teacher mAP after round |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s0[m]["rounds"]:
            sets = ["global"] if m.startswith("mt_global") else ["global", "upper", "lower"]
            for k, sname in enumerate(sets):
                c = r["cluster"].get(sname, {})
                ev = f"{100 * r['eval']['mAP']:.1f}" if "eval" in r and k == 0 else ""
                lines.append(
                    f"| {r['round'] + 1 if k == 0 else ''} | {sname} | {c.get('num_clusters', '')} | "
                    f"{c.get('k1', '')} | "
                    f"{_eps(c)} | "
                    f"{100 * c.get('outlier_ratio', 0):.0f}% | {c.get('nmi', float('nan')):.3f} | "
                    f"{c.get('ari', float('nan')):.3f} | {c.get('pairwise_precision', float('nan')):.3f} | "
                    f"{c.get('pairwise_recall', float('nan')):.3f} | {c.get('nmi_camera', float('nan')):.3f} | {ev} |")
        lines.append("")
    lines += ["## Time per task (seconds; a task whose output was already complete in --work shows ~0)", "",
              "```", *(f"seed {s}: " + json.dumps({k: round(v) for k, v in per_seed[s]["_seconds"].items()})
                       + f" -> {sum(per_seed[s]['_seconds'].values()) / 60:.0f} task-minutes"
                       for s in sorted(per_seed)), "```", ""]
    out = {m: {"mAP": agg[m]["mAP"], "R1": agg[m]["R1"]} for m in methods}
    out["details"] = {"per_seed": {str(s): {m: per_seed[s][m]["metrics"] for m in methods} for s in per_seed},
                      "gap_closed": {m: gap_closed(agg[m]["mAP"], src, orc) for m in methods},
                      "wall_seconds": wall, "overrides": args.set, "generator_version": versions,
                      "seeds": sorted(per_seed), "runs": {m: RUNS[m] for m in methods if m in RUNS}}
    return "\n".join(lines), out


README_START, README_END = "<!-- uda-results:start -->", "<!-- uda-results:end -->"
LABELS = {
    "source_only": "source-only", "oracle": "oracle (target labels)", "mt_global": "mean teacher, global only "
    "(MMT-style), same DBSCAN", "lf2_kmeans": "LF² + k-means (K = true number of ids)",
    "lf2_dbscan": "LF² + DBSCAN, eps=auto", "lf2_dbscan_eps06": "LF² + DBSCAN, eps 0.6 (paper)",
    "lf2_camera_norm": "LF² + DBSCAN auto + camera_norm", "lf2_camera_proxy": "LF² + DBSCAN auto + camera proxy loss",
    "lf2_camera_norm_eps06": "LF² + DBSCAN eps 0.6 + camera_norm",
    "lf2_camera_norm_proxy": "LF² + DBSCAN auto + camera_norm + camera proxy loss",
    "lf2_camera_norm_k1auto": "LF² + DBSCAN auto, k1=auto + camera_norm",
    "lf2_camera_norm_eps06_24r": "LF² + DBSCAN eps 0.6 + camera_norm, 24 rounds (4x budget)",
    "mt_global_camera_norm_eps06": "mean teacher, global only, same DBSCAN eps 0.6 + camera_norm",
    "lf2_true_labels": "LF² on the true target ids (ceiling, not UDA)", "lf2_kmeans_fusion": "LF² + k-means + fusion loss",
}


def readme_table(js: dict[str, Any]) -> str:
    """The README's results block from the benchmark JSON (mean ± std over seeds, share of the gap closed)."""
    d = js["details"]
    per_seed = d["per_seed"]
    lines = [f"Synthetic generator {', '.join(d['generator_version'])}, seeds {', '.join(map(str, d['seeds']))} "
             f"(`bench/uda_synthetic.py`, written from its JSON by `--readme`): mean ± std over seeds of the final "
             "teacher on the target test split, no model selection on target data.", "",
             "| method | mAP (%) | Rank-1 (%) | gap closed |", "|---|---|---|---|"]
    for m in js:
        if m == "details":
            continue
        maps = [100 * per_seed[s][m]["mAP"] for s in per_seed]
        r1s = [100 * per_seed[s][m]["R1"] for s in per_seed]
        gc = "" if m in ("source_only", "oracle") else f"{100 * d['gap_closed'][m]:.0f}%"
        lines.append(f"| {LABELS.get(m, m)} | {np.mean(maps):.1f} ± {np.std(maps):.1f} | "
                     f"{np.mean(r1s):.1f} ± {np.std(r1s):.1f} | {gc} |")
    return "\n".join(lines)


def update_readme(path: Path, js: dict[str, Any]) -> None:
    """Replace the block between the README's uda-results markers with ``readme_table(js)``."""
    text = path.read_text()
    if text.count(README_START) != 1 or text.count(README_END) != 1:
        raise SystemExit(f"{path}: needs exactly one {README_START} ... {README_END} block")
    head, rest = text.split(README_START)
    _, tail = rest.split(README_END)
    path.write_text(f"{head}{README_START}\n{readme_table(js)}\n{README_END}{tail}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--json", default=None)
    p.add_argument("--work", default="runs/uda_synthetic")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--set", "-s", action="append", default=[], help="config override for every method")
    p.add_argument("--fusion", action="store_true", help="also LF2 with a fusion loss (trained attention)")
    p.add_argument("--long", action="store_true",
                   help="also the best recipe at 24 rounds (lf2_camera_norm_eps06_24r: ~32 more task-minutes a seed)")
    p.add_argument("--skip", nargs="+", default=[], choices=sorted(RUNS), help="leave these methods out")
    p.add_argument("--readme", default=None, help="also rewrite this README's results block from the JSON")
    p.add_argument("--readme-only", action="store_true",
                   help="run nothing: rewrite --readme's results block from the existing --json")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per task (1 is fastest on a shared CPU; default 1)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="tasks run at once, each in its own process (default: min(2, CPUs)); the tasks of all "
                        "seeds are scheduled together, each once its inputs are done")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LF2_PROGRESS", "0")
    if args.readme_only:
        if not (args.readme and args.json):
            raise SystemExit("--readme-only needs --readme and --json")
        update_readme(Path(args.readme), json.loads(Path(args.json).read_text()))
        return 0
    t0 = time.time()
    extras = tuple(flag for flag in ("fusion", "long") if getattr(args, flag))
    per_seed = run_all(args.seeds, Path(args.work), args.set, extras, args.jobs, args.threads,
                       tuple(args.skip))
    wall = time.time() - t0
    out_md = Path(args.out)
    png = out_md.with_name(f"{out_md.stem}_uda.png")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    plot(per_seed, png)
    text, js = report(per_seed, args, wall, png)
    out_md.write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(js, indent=2) + "\n")
    if args.readme:
        update_readme(Path(args.readme), js)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
