"""Per-round overhead of the pipeline's tasks: kfp.local with one task per stage (K=1) and with all rounds
in one task (K=rounds), against ``lf2 run-local`` (every stage in one process), on the same recipe.

    python bench/rounds_per_task.py [--work runs/bench-rpt] [-c demo] [-s key=value ...] [--threads 1]
        [--json runs/bench-rpt/rounds_per_task.json]

Each variant runs in its own subprocess (``OMP_NUM_THREADS=--threads``; 1 = the demo's deterministic
setting). Figures:

- ``rounds_s``: wall seconds of the rounds -- for the pipelines, the sum of the round tasks' durations
  (``extract-features``/``cluster``/``finetune`` or ``adapt-rounds``, from kfp.local's task start/finish
  log lines); for run-local, its own extract + cluster + finetune stage seconds;
- ``per_round_overhead_s``: (pipeline ``rounds_s`` - run-local ``rounds_s``) / rounds: process starts,
  imports, model loading and MLflow logging per round;
- the final target metrics of every variant (they must be equal: same stage functions, same order).

Every variant computes its own prepare-data and pretrain-source (``--no-cache``), which are not part of the
rounds figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ROUND_TASKS = ("extract-features", "cluster", "finetune", "adapt-rounds")
_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) - INFO - (Executing task|Task) '([a-z0-9-]+)'")


def task_seconds(log: str) -> dict[str, float]:
    """Seconds per kfp.local task (name as logged, e.g. ``finetune-2``) from its start and finish lines."""
    start: dict[str, float] = {}
    took: dict[str, float] = {}
    for raw in log.splitlines():
        m = _LINE.match(re.sub(r"\x1b\[[0-9;]*m", "", raw))
        if not m:
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
        if m[4] == "Executing task":
            start[m[5]] = t
        elif m[5] in start:
            took[m[5]] = (t - start.pop(m[5])) % 86400  # a run across midnight
    return took


def _run(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, str, str]:
    """(wall seconds, stdout, stdout + stderr) of ``cmd``; exits naming the log when it fails."""
    t0 = time.time()
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    took = time.time() - t0
    log.write_text(p.stdout + "\n" + p.stderr)
    if p.returncode != 0:
        sys.exit(f"bench/rounds_per_task.py: {' '.join(cmd[:5])} failed (exit {p.returncode}); log: {log}")
    return took, p.stdout, p.stdout + "\n" + p.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/bench-rpt")
    ap.add_argument("--config", "-c", default="demo")
    ap.add_argument("--set", "-s", action="append", default=[])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from lf2core.config import load_config

    rounds = load_config(args.config, args.set).finetune.rounds
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "LF2_MLFLOW_ARTIFACTS": str(work / "mlartifacts"),
           "LF2_CACHE_DIR": str(work / "cache"), "LF2_PROGRESS": "0"}
    sets = [a for s in args.set for a in ("--set", s)]
    load = os.getloadavg()
    results: dict[str, Any] = {}
    stamp = time.strftime("%H%M%S")
    for k in (rounds, 1):
        cmd = [sys.executable, "-m", "pipelines.cli", "pipeline", "run", "--out", str(work / "pipeline"), "-c", args.config,
               *sets, "--rounds-per-task", str(k), "--experiment", "bench-rpt", "--run-name", f"k{k}-{stamp}",
               "--no-cache"]
        took, stdout, log = _run(cmd, env, work / f"k{k}.log")
        res = json.loads(stdout[stdout.rindex("\n{\n"):])  # `lf2 pipeline run` ends with its result as JSON
        tasks = task_seconds(log)
        round_s = sum(v for name, v in tasks.items() if name.rsplit("-", 1)[0] in ROUND_TASKS or name in ROUND_TASKS)
        results[f"pipeline K={k}"] = {"total_s": took, "rounds_s": round_s, "tasks": tasks,
                                      "metrics": res.get("metrics", {})}
        print(f"pipeline K={k}: {took:.0f} s total, rounds {round_s:.0f} s", flush=True)
    out = work / f"run-local-{stamp}"
    cmd = [sys.executable, "-m", "lf2core.cli", "run-local", "--out", str(out), "-c", args.config, *sets]
    took, _, _ = _run(cmd, {**env, "LF2_TRACKING": "off"}, work / "run-local.log")
    summary = json.loads((out / "summary.json").read_text())
    sec = summary["seconds"]
    results["run-local"] = {"total_s": took, "rounds_s": sum(sec.get(k, 0.0) for k in ("extract", "cluster", "finetune")),
                            "stage_s": sec, "metrics": summary["metrics"]}
    print(f"run-local: {took:.0f} s total, rounds {results['run-local']['rounds_s']:.0f} s", flush=True)

    base = results["run-local"]["rounds_s"]
    print(f"\n{args.config}, {rounds} rounds, OMP_NUM_THREADS={args.threads}, load before {load[0]:.1f} "
          f"after {os.getloadavg()[0]:.1f}")
    print("| variant | total s | rounds s | per-round s | per-round overhead vs run-local s | mAP | R1 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        r["per_round_s"] = r["rounds_s"] / rounds
        r["per_round_overhead_s"] = (r["rounds_s"] - base) / rounds
        m = r["metrics"]
        print(f"| {name} | {r['total_s']:.0f} | {r['rounds_s']:.0f} | {r['per_round_s']:.1f} | "
              f"{r['per_round_overhead_s']:+.1f} | {100 * float(m.get('mAP', float('nan'))):.2f} | "
              f"{100 * float(m.get('R1', float('nan'))):.2f} |")
    same = len({json.dumps({k: round(float(v), 12) for k, v in r["metrics"].items() if k in ("mAP", "R1", "mINP")},
                           sort_keys=True) for r in results.values()}) == 1
    print(f"final metrics identical across variants: {same}")
    record = {"date": datetime.now().isoformat(timespec="seconds"), "host": platform.node(), "cpus": os.cpu_count(),
              "load_before": load, "load_after": os.getloadavg(), "recipe": args.config, "overrides": args.set,
              "rounds": rounds, "threads": args.threads, "identical_metrics": same, "results": results}
    path = Path(args.json) if args.json else work / "rounds_per_task.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
