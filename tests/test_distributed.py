"""Data parallelism under torchrun (``lf2core.distributed``), 2 processes on CPU (gloo) against one process:

- the rank slices of the sampled batches (indices AND augmented images) are the one-process batch;
- finetune: ``torchrun --nproc-per-node 2`` vs one process with ``finetune.bn_group`` = the per-rank batch:
  student and teacher equal within ``TOL`` after the round; the teacher (and the whole model) identical on
  both ranks (max abs diff == 0); killed mid-round and resumed under DDP == uninterrupted DDP, bit for bit;
- pretrain through ``lf2 pretrain`` started by torchrun vs one process (``distributed.per_image_seeds``,
  ``pretrain.bn_group`` = per-rank batch): weights within ``TOL``; only rank 0 prints and writes;
- extract through ``lf2 extract`` started by torchrun: the features equal the one-process features (rows in
  manifest order);
- a rank that never reaches a barrier: the other fails within ``distributed.timeout_s`` with one clear line.

This file is also the torchrun worker (``python tests/test_distributed.py <mode> <json>``).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_finetune import tiny  # noqa: F401  (fixture: the finetune tests' data, labels, source model)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py; the workers run with 1 thread too
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # max abs weight difference, 2 processes vs 1, after 6 Adam steps (measured: docs/distributed.md)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LF2_PROGRESS": "0", "LF2_TRACKING": "off",
            "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)


def _worker(mode: str, **kw: object) -> subprocess.CompletedProcess:
    return _torchrun(str(Path(__file__).resolve()), mode, json.dumps(kw))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from lf2core.checkpoint import load_checkpoint

    return load_checkpoint(str(path))["state_dict"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], floats_only: bool = True) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a
               if a[k].numel() and (a[k].is_floating_point() or not floats_only))


# ------------------------------------------------------------------------------------------- no processes
def test_rank_slices_are_the_one_process_batches(tiny):
    from lf2core.data.manifest import read_manifest, split
    from lf2core.data.samplers import IdentityBatchSampler, RankSlice
    from lf2core.data.transforms import train_transform
    from lf2core.distributed import Dist
    from lf2core.training import round_loaders

    _, data, _, labels = tiny
    samples = split(read_manifest(data), "target_train")
    tf = train_transform(32, 16, random_erasing=0.5)
    sets = [labels["global"], labels["upper"]]
    one = [list(dl) for dl in round_loaders(samples, sets, tf, 8, 2, 3, 1, 0, 1, start=1)]
    ranks = [[list(dl) for dl in round_loaders(samples, sets, tf, 8, 2, 3, 1, 0, 1, start=1, shard=(r, 2))]
             for r in range(2)]
    for k in range(2):
        for b, batch in enumerate(one[k]):
            for i in (0, 1, 3):  # images (augmented), labels, indices
                assert torch.equal(batch[i], torch.cat([ranks[0][k][b][i], ranks[1][k][b][i]]))
    def base():
        return IdentityBatchSampler(labels["global"], np.zeros(len(samples), int), 8, 2, 4, seed=5)

    assert [a + b for a, b in zip(RankSlice(base(), 0, 2), RankSlice(base(), 1, 2))] == list(base())
    with pytest.raises(Exception, match="does not split over 3"):
        list(RankSlice(base(), 0, 3))
    assert [Dist(r, 3).shard(10) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]


# ------------------------------------------------------------------------------------------- finetune
@pytest.mark.slow
def test_finetune_ddp_equals_one_process_and_resumes(tiny, tmp_path):
    from lf2core.stages.finetune import finetune

    tmp, data, cfg, _ = tiny
    ins = dict(data=str(data), labels=str(tmp / "labels"), model=str(tmp / "pre"))
    t0 = time.monotonic()
    r = _worker("finetune", out=str(tmp_path / "ddp"), dump=str(tmp_path), **ins)
    assert r.returncode == 0, r.stderr[-3000:]
    took = time.monotonic() - t0
    # the teacher (and everything else) identical on both ranks after the round
    per_rank = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    assert _max_diff(per_rank[0]["teacher"], per_rank[1]["teacher"], floats_only=False) == 0.0
    assert _max_diff(per_rank[0]["all"], per_rank[1]["all"], floats_only=False) == 0.0
    # one process, BN over groups of the per-rank batch (8 / 2), same global batches
    ref = copy.deepcopy(cfg)
    ref.finetune.bn_group = 4
    finetune(ref, ins["data"], ins["labels"], ins["model"], str(tmp_path / "one"), checkpoint_every=0)
    diffs = {n: _max_diff(_weights(tmp_path / "ddp" / n), _weights(tmp_path / "one" / n))
             for n in ("student.pt", "teacher.pt")}
    print(f"finetune 2 processes vs 1: max abs diff {diffs} ({took:.1f}s for torchrun)")
    assert max(diffs.values()) <= TOL, diffs
    # rank 0 killed at its 6th step (state saved after 5: checkpoint_every 2, 3 per epoch), resumed under DDP
    r = _worker("finetune", out=str(tmp_path / "res"), die_at=6, checkpoint_every=2, **ins)
    assert r.returncode != 0 and (tmp_path / "res.partial" / "state.pt").exists(), r.stderr[-2000:]
    assert not (tmp_path / "res").exists()
    r = _worker("finetune", out=str(tmp_path / "res"), checkpoint_every=2, count_steps=str(tmp_path), **ins)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "steps0.json").read_text()) == [5]  # only the step after the state
    for n in ("student.pt", "teacher.pt"):
        a, b = _weights(tmp_path / "ddp" / n), _weights(tmp_path / "res" / n)
        assert all(torch.equal(a[k], b[k]) for k in a), n


# ------------------------------------------------------------------------------------------- pretrain, extract
def _cli_sets(*extra: str) -> list[str]:
    from test_pretrain import TINY_OVERRIDES

    out: list[str] = []
    for o in [*TINY_OVERRIDES, *extra]:
        out += ["--set", o]
    return out


@pytest.mark.slow
def test_pretrain_and_extract_started_by_torchrun_equal_one_process(tiny, tmp_path):
    from lf2core.stages.extract import extract_features
    from lf2core.stages.pretrain import pretrain_source
    from test_pretrain import tiny_cfg

    _, data, _, _ = tiny
    r = _torchrun("-m", "lf2core.cli", "pretrain", "--data", str(data), "--out", str(tmp_path / "ddp"),
                  *_cli_sets())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"epochs"') == 1  # the metrics printed by rank 0 only
    ref = tiny_cfg("distributed.per_image_seeds=true", "pretrain.bn_group=4")
    pretrain_source(ref, str(data), str(tmp_path / "one"))
    diff = _max_diff(_weights(tmp_path / "ddp" / "model.pt"), _weights(tmp_path / "one" / "model.pt"))
    print(f"pretrain 2 processes vs 1: max abs diff {diff:.3g}")
    assert diff <= TOL
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3] and "source_mAP" in m["history"][1]
    # extraction sharded over the 2 ranks, gathered in manifest order
    r = _torchrun("-m", "lf2core.cli", "extract", "--data", str(data), "--model", str(tmp_path / "one"),
                  "--out", str(tmp_path / "f2"), *_cli_sets())
    assert r.returncode == 0, r.stderr[-3000:]
    extract_features(tiny_cfg(), str(data), str(tmp_path / "one"), str(tmp_path / "f1"))
    with np.load(tmp_path / "f1" / "features.npz") as a, np.load(tmp_path / "f2" / "features.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            assert a[k].shape == b[k].shape and np.allclose(a[k], b[k], atol=1e-6, rtol=0), k
        assert np.array_equal(a["pids"], b["pids"]) and np.array_equal(a["camids"], b["camids"])


# ------------------------------------------------------------------------------------------- hangs
def test_a_rank_that_never_arrives_fails_the_other_within_the_timeout(tmp_path):
    t0 = time.monotonic()
    r = _worker("barrier", dump=str(tmp_path), timeout_s=3)
    took = time.monotonic() - t0
    assert r.returncode != 0
    msg = (tmp_path / "rank0.err").read_text()
    assert msg.count("\n") == 0 and msg.startswith("lf2: error: test-stage: rank 0 of 2 waited more than 3 s"), msg
    assert "distributed.timeout_s" in msg and "'the test point'" in msg
    assert float((tmp_path / "rank0.seconds").read_text()) < 3 + 10, took


# ------------------------------------------------------------------------------------------- worker
def _work(mode: str, kw: dict) -> int:  # pragma: no cover  (runs under torchrun)
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if mode == "barrier":
        from lf2core.config import load_config
        from lf2core.distributed import setup
        from lf2core.errors import Lf2Error

        d = setup(load_config("demo", [f"distributed.timeout_s={kw['timeout_s']}"]), "test-stage")
        if rank == 1:
            time.sleep(60)  # never reaches the barrier (torchrun stops it when rank 0 fails)
            return 0
        t0 = time.monotonic()
        try:
            d.barrier("the test point")
        except Lf2Error as e:
            Path(kw["dump"], "rank0.seconds").write_text(f"{time.monotonic() - t0:.2f}")
            Path(kw["dump"], "rank0.err").write_text(f"lf2: error: {e}")
            return 2
        return 0
    from lf2core.stages import finetune as ft
    from lf2core.training import Finetuner
    from test_pretrain import tiny_cfg

    cfg = tiny_cfg("finetune.batch_size=8", "finetune.num_instances=2", "finetune.iters_per_epoch=3",
                   "finetune.epochs_per_round=2", "cluster.num_clusters=4")
    real_step, real_train = Finetuner.step, ft.train_round
    calls: list[int] = []

    def step(self, o, b, s, **k):
        calls.append(s)
        if rank == 0 and len(calls) == kw.get("die_at"):  # rank 1 then waits in a collective; torchrun stops it
            raise KeyboardInterrupt
        return real_step(self, o, b, s, **k)

    def train(cfg_, settings, rnd, finetuner, *a, **k):
        real_train(cfg_, settings, rnd, finetuner, *a, **k)
        if kw.get("dump"):
            mt = finetuner.mt
            torch.save({"teacher": mt.teacher.state_dict(), "all": mt.state_dict()},
                       Path(kw["dump"], f"rank{rank}.pt"))

    Finetuner.step = step
    ft.train_round = train
    ft.finetune(cfg, kw["data"], kw["labels"], kw["model"], kw["out"], checkpoint_every=kw.get("checkpoint_every", 0))
    if kw.get("count_steps"):
        Path(kw["count_steps"], f"steps{rank}.json").write_text(json.dumps(calls))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_work(sys.argv[1], json.loads(sys.argv[2])))
