"""Fault injection: ``lf2 run-local`` killed (SIGKILL) at a random moment, then run again, ends with the
same result, bit for bit, as an uninterrupted run (real subprocesses, tiny synthetic config)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# cluster.eps=auto: on these few ids the demo's eps 0.6 can put every image in one cluster
TINY = ["cluster.eps=auto", "data.synth.ids=8", "data.synth.test_ids=6", "data.synth.height=64", "data.synth.width=32",
        "data.height=32", "data.width=16", "pretrain.epochs=2", "pretrain.iters_per_epoch=3",
        "pretrain.batch_size=16", "pretrain.warmup_epochs=0", "pretrain.milestones=[]", "pretrain.eval_every=0",
        "cluster.num_clusters=4", "cluster.kmeans_init_size=40", "finetune.rounds=2", "finetune.iters_per_epoch=3",
        "finetune.batch_size=16", "eval.batch_size=64", "data.num_workers=0"]


def _cmd(out: Path) -> list[str]:
    args = [sys.executable, "-m", "lf2core.cli", "run-local", "--out", str(out)]
    for o in TINY:
        args += ["--set", o]
    return args


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LF2_TRACKING": "off"}


def _metrics(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


@pytest.mark.slow
def test_killed_at_a_random_point_then_rerun_gives_the_same_result(tmp_path: Path) -> None:
    t0 = time.monotonic()
    ref = subprocess.run(_cmd(tmp_path / "ref"), capture_output=True, text=True, env=_env(), timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    took = time.monotonic() - t0
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kills = [rng.uniform(0.1 * took, 0.9 * took) for _ in range(2)]  # two kills: one run is killed twice
    victim = tmp_path / "victim"
    for kill_at in kills:
        p = subprocess.Popen(_cmd(victim), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
        time.sleep(kill_at)
        p.send_signal(signal.SIGKILL)
        p.wait()
    again = subprocess.run(_cmd(victim), capture_output=True, text=True, env=_env(), timeout=600)
    assert again.returncode == 0, f"seed {seed}, killed at {kills} s of {took:.1f}s:\n{again.stderr[-2000:]}"
    assert _metrics(again.stdout) == _metrics(ref.stdout), f"seed {seed}, killed at {kills} s"
    leftovers = [q.name for q in victim.rglob("*") if q.name.endswith(".partial")]
    assert leftovers == [], f"seed {seed}: {leftovers}"
