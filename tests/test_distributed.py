"""Data parallelism under torchrun (``lf2core.distributed``), 2 processes on CPU (gloo) against one process:

- the rank slices of the sampled batches (indices AND augmented images) are the one-process batch;
- the finetune and pretrain steps in float64, 3 steps, 2 processes vs one process with ``bn_group`` = the
  per-rank batch: weights, buffers and gradients within 1e-9, and the same bits on both ranks;
- the stages in float32 (their real loaders, models and losses): first-step loss within 1e-6 relative,
  second within 1e-3 (Adam turns float32 rounding noise into lr-sized steps: one process with 1 vs 2 torch
  threads diverges as much, docs/distributed.md); the teacher identical on both ranks; finetune killed
  mid-round and resumed under DDP == uninterrupted DDP, bit for bit; ``lf2 pretrain`` and ``lf2 extract``
  started by torchrun: only rank 0 prints and writes, features equal the one-process features; pretraining
  killed and rerun under torchrun resumes to the same weights;
- a rank that never reaches a barrier: the other fails within ``distributed.timeout_s`` with one clear line.

This file is also the torchrun worker (``python tests/test_distributed.py <mode> <json>``).
"""

from __future__ import annotations

import dataclasses
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


def _close_fraction(a_path: Path, b_path: Path, atol: float = 1e-5) -> float:
    """Fraction of the trained (non-buffer) weight elements of two checkpoints that agree within ``atol``."""
    a, b = _weights(a_path), _weights(b_path)
    d = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a
                   if a[k].is_floating_point() and "running_" not in k])
    return float((d <= atol).double().mean())


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


# ------------------------------------------------------------------------------------------- the steps, float64
def _finetune_steps(d, steps: int, sync: bool = False) -> tuple[dict, dict]:
    """``steps`` fast steps from the same weights and batches (float64); with an active ``d`` this rank's
    slices and no bn_group, else the whole batches with BN over groups of 3 (= the per-rank batch), or
    with ``sync`` (``distributed.sync_bn``) over the whole batch.
    Returns (state dict, gradients of the last step)."""
    from test_finetune import _batches, _mean_teacher
    from lf2core.training import Criteria, StepSettings, fast_step, make_optimizer

    mt = _mean_teacher(torch.float64)
    opt = make_optimizer(mt, 3.5e-4, 5e-4)
    parallel = d is not None and d.active
    if parallel:
        d = dataclasses.replace(d, sync_bn=sync)
    for s in range(steps):
        batches = _batches(torch.float64, 3, seed=s)
        if parallel:
            batches = [(x[3 * d.rank:3 * d.rank + 3], y[3 * d.rank:3 * d.rank + 3]) for x, y in batches]
        fast_step(mt, opt, batches, s, Criteria(6, 0.1), StepSettings(bn_group=0 if parallel or sync else 3),
                  dist=d if parallel else None)
    return mt.state_dict(), {n: p.grad.clone() for n, p in mt.named_parameters() if p.grad is not None}


def _pretrain_steps(d, steps: int, sync: bool = False) -> tuple[dict, dict]:
    """``Pretrainer.step`` (source batch + adapt_target_bn batch) ``steps`` times in float64; per-rank
    slices under an active ``d``, else the whole batch with pretrain.bn_group 3 (0 with ``sync``)."""
    from lf2core.distributed import Dist
    from lf2core.runtime import DevicePolicy
    from lf2core.training.pretrainer import Pretrainer, SourceData
    from test_pretrain import tiny_cfg

    parallel = d is not None and d.active
    cfg = tiny_cfg("pretrain.bn_group=0" if parallel or sync else "pretrain.bn_group=3")
    pt = Pretrainer(cfg, SourceData([], np.arange(4), [], ([], []), ([], [])), DevicePolicy("cpu", False),
                    dataclasses.replace(d, sync_bn=sync) if parallel else Dist())
    pt.model.double()
    g = torch.Generator().manual_seed(7)
    y = torch.tensor([0, 0, 1, 1, 3, 3])
    lo, hi = (3 * d.rank, 3 * d.rank + 3) if parallel else (0, 6)
    for _ in range(steps):
        x, xt = (torch.randn(6, 3, 32, 16, generator=g, dtype=torch.float64) for _ in range(2))
        pt.step(x[lo:hi], y[lo:hi], iter([(xt[lo:hi],)]))
    return pt.model.state_dict(), {n: q.grad.clone() for n, q in pt.model.named_parameters() if q.grad is not None}


STEP_RUNS = [("finetune", _finetune_steps, False), ("pretrain", _pretrain_steps, False),
             ("finetune", _finetune_steps, True), ("pretrain", _pretrain_steps, True)]


def test_steps_ddp_equal_one_process_float64(tmp_path):
    """The data-parallel steps (rank slices, per-rank BN, gathered loss, summed gradients, Fuse BN over all
    ranks, EMA, rank 0's buffers) against one process with bn_group = per-rank batch, in float64 where
    float32 rounding noise (amplified by Adam, see ``test_finetune_...``) cannot hide a wrong term: the
    gradients of the last step, the weights and every buffer."""
    r = _worker("steps", dump=str(tmp_path), steps=3)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, run, sync in STEP_RUNS:
        ranks = [torch.load(tmp_path / f"{name}{'-sync' * sync}{k}.pt") for k in range(2)]
        for part in (0, 1):  # weights + buffers, gradients: the same bits on both ranks
            assert _max_diff(ranks[0][part], ranks[1][part], floats_only=False) == 0.0, name
        ref_state, ref_grad = run(None, 3, sync)
        dw, dg = _max_diff(ranks[0][0], ref_state), _max_diff(ranks[0][1], ref_grad)
        print(f"{name} step float64{' sync_bn' * sync}, 3 steps, 2 processes vs 1: max abs diff weights+buffers "
              f"{dw:.3g}, gradients {dg:.3g}")
        assert dw <= 1e-9 and dg <= 1e-9, name
        ints = [k for k, v in ref_state.items() if not v.is_floating_point()]
        assert ints and all(torch.equal(ranks[0][0][k], ref_state[k]) for k in ints)  # BN counters


# ------------------------------------------------------------------------------------------- finetune stage
# 2 epochs of 1 step: the epoch losses are the step losses; P=3 ids x K=2 (every label set has >= 3 ids)
FT_TWO_STEPS = ["finetune.batch_size=6", "finetune.num_instances=2", "finetune.iters_per_epoch=1",
                "finetune.epochs_per_round=2", "cluster.num_clusters=4"]


def _epoch_losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "metrics.json").read_text())["history"]]


@pytest.mark.slow
def test_finetune_stage_ddp_vs_one_process_and_resume(tiny, tmp_path):
    from lf2core.config import load_config
    from lf2core.stages.finetune import finetune
    from test_pretrain import TINY_OVERRIDES

    tmp, data, _, _ = tiny
    ins = dict(data=str(data), labels=str(tmp / "labels"), model=str(tmp / "pre"))
    # 2 steps: 2 processes vs 1 process with BN over groups of the per-rank batch (6 / 2), same global batches
    r = _worker("finetune", out=str(tmp_path / "ddp2"), sets=FT_TWO_STEPS, dump=str(tmp_path), **ins)
    assert r.returncode == 0, r.stderr[-3000:]
    finetune(load_config("demo", [*TINY_OVERRIDES, *FT_TWO_STEPS, "finetune.bn_group=3"]), ins["data"],
             ins["labels"], ins["model"], str(tmp_path / "one2"), checkpoint_every=0)
    (l0, l1), (r0, r1) = _epoch_losses(tmp_path / "ddp2"), _epoch_losses(tmp_path / "one2")
    close = _close_fraction(tmp_path / "ddp2" / "student.pt", tmp_path / "one2" / "student.pt")
    print(f"finetune stage float32, 2 processes vs 1: step-1 loss {l0!r} vs {r0!r}, step-2 loss {l1!r} vs "
          f"{r1!r}, student weights after 2 steps within 1e-5: {close:.4f}")
    assert l0 == pytest.approx(r0, rel=1e-6)  # same data, same model, same loss
    assert l1 == pytest.approx(r1, rel=1e-4)  # after one Adam step on float32 noise
    assert close >= 0.99
    # the teacher (and everything else: student, Fuse, BN buffers) identical on both ranks
    per_rank = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    assert _max_diff(per_rank[0]["teacher"], per_rank[1]["teacher"], floats_only=False) == 0.0
    assert _max_diff(per_rank[0]["all"], per_rank[1]["all"], floats_only=False) == 0.0
    # rank 0 killed at its 2nd step (state saved after epoch 1), rerun under DDP: resumes with step 1 only
    r = _worker("finetune", out=str(tmp_path / "res"), sets=FT_TWO_STEPS, die_at=2, **ins)
    assert r.returncode != 0 and (tmp_path / "res.partial" / "state.pt").exists(), r.stderr[-2000:]
    assert not (tmp_path / "res").exists()
    r = _worker("finetune", out=str(tmp_path / "res"), sets=FT_TWO_STEPS, count_steps=str(tmp_path), **ins)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads((tmp_path / f"steps{k}.json").read_text()) for k in range(2)] == [[1], [1]]
    for n in ("student.pt", "teacher.pt"):
        a, b = _weights(tmp_path / "ddp2" / n), _weights(tmp_path / "res" / n)
        assert all(torch.equal(a[k], b[k]) for k in a), n
    assert _epoch_losses(tmp_path / "ddp2") == _epoch_losses(tmp_path / "res")
    assert not (tmp_path / "res.partial").exists()


# ------------------------------------------------------------------------------------------- pretrain, extract
def _cli_sets(*extra: str) -> list[str]:
    from test_pretrain import TINY_OVERRIDES

    out: list[str] = []
    for o in [*TINY_OVERRIDES, *extra]:
        out += ["--set", o]
    return out


@pytest.mark.slow
def test_pretrain_and_extract_started_by_torchrun(tiny, tmp_path):
    from lf2core.stages.extract import extract_features
    from lf2core.stages.pretrain import pretrain_source
    from test_pretrain import tiny_cfg

    _, data, _, _ = tiny
    two = ["pretrain.epochs=2", "pretrain.iters_per_epoch=1", "pretrain.warmup_epochs=0", "pretrain.eval_every=1"]
    r = _torchrun("-m", "lf2core.cli", "pretrain", "--data", str(data), "--out", str(tmp_path / "ddp"),
                  *_cli_sets(*two))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"epochs"') == 1  # the metrics printed by rank 0 only
    pretrain_source(tiny_cfg(*two, "distributed.per_image_seeds=true", "pretrain.bn_group=4"), str(data),
                    str(tmp_path / "one"))
    (l0, l1), (r0, r1) = _epoch_losses(tmp_path / "ddp"), _epoch_losses(tmp_path / "one")
    close = _close_fraction(tmp_path / "ddp" / "model.pt", tmp_path / "one" / "model.pt")
    print(f"pretrain stage float32, 2 processes vs 1: step-1 loss {l0!r} vs {r0!r}, step-2 loss {l1!r} vs "
          f"{r1!r}, weights after 2 steps within 1e-5: {close:.4f}")
    assert l0 == pytest.approx(r0, rel=1e-6) and l1 == pytest.approx(r1, rel=1e-4) and close >= 0.99
    hist = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["history"]
    assert all("source_mAP" in h for h in hist)  # rank 0 evaluated every epoch while rank 1 waited
    # rank 0 killed at the start of epoch 2 (state of epoch 1 saved), rerun under torchrun: same weights
    r = _worker("pretrain", out=str(tmp_path / "res"), sets=two, die_epoch=1, data=str(data))
    assert r.returncode != 0 and (tmp_path / "res.partial" / "state.pt").exists(), r.stderr[-2000:]
    r = _torchrun("-m", "lf2core.cli", "pretrain", "--data", str(data), "--out", str(tmp_path / "res"),
                  *_cli_sets(*two))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "after epoch 1" in r.stderr
    a, b = _weights(tmp_path / "ddp" / "model.pt"), _weights(tmp_path / "res" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # extraction sharded over the 2 ranks, gathered in manifest order
    r = _torchrun("-m", "lf2core.cli", "extract", "--data", str(data), "--model", str(tmp_path / "one"),
                  "--out", str(tmp_path / "f2"), *_cli_sets())
    assert r.returncode == 0, r.stderr[-3000:]
    extract_features(tiny_cfg(), str(data), str(tmp_path / "one"), str(tmp_path / "f1"))
    with np.load(tmp_path / "f1" / "features.npz") as a, np.load(tmp_path / "f2" / "features.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in a.files if a[k].dtype == np.float32)
        print(f"extract 2 processes vs 1: max abs feature diff {diff:.3g}")
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
    waited = float((tmp_path / "rank0.seconds").read_text())
    print(f"barrier with distributed.timeout_s=3: rank 0 failed after {waited:.2f} s ({took:.1f} s with torchrun)")
    assert 3 <= waited < 3 + 10, took


def test_a_rank_that_dies_fails_the_other_with_one_line(tmp_path):
    """Two ranks started by hand (torchrun would stop the survivor itself, a multi-node job may not)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    args = [sys.executable, str(Path(__file__).resolve()), "peer", json.dumps({"dump": str(tmp_path)})]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(k), "LOCAL_RANK": str(k)}, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for k in range(2)]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [3, 2]
    msg = (tmp_path / "rank1.err").read_text()
    assert msg.count("\n") == 0 and msg.startswith("lf2: error: peer-test: rank 1 of 2: a collective failed "
                                                     "during 'training'"), msg


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
    if mode == "peer":  # rank 0 dies before the first collective of "training"
        from lf2core.config import load_config
        from lf2core.distributed import setup
        from lf2core.errors import Lf2Error

        d = setup(load_config("demo", ["distributed.timeout_s=60"]), "peer-test")
        if rank == 0:
            os._exit(3)
        try:
            with d.guard("training"):
                d.all_gather_cat(torch.ones(3))
        except Lf2Error as e:
            Path(kw["dump"], "rank1.err").write_text(f"lf2: error: {e}")
            return 2
        return 0
    if mode == "pretrain":
        from lf2core.stages.pretrain import pretrain_source
        from lf2core.training.pretrainer import Pretrainer
        from test_pretrain import tiny_cfg

        real_epoch = Pretrainer.epoch

        def epoch(self, e):
            if rank == 0 and e == kw["die_epoch"]:
                raise KeyboardInterrupt
            return real_epoch(self, e)

        Pretrainer.epoch = epoch
        pretrain_source(tiny_cfg(*kw["sets"]), kw["data"], kw["out"])
        return 0
    if mode == "steps":
        from lf2core.config import load_config
        from lf2core.distributed import setup

        d = setup(load_config("demo", ["device=cpu"]), "test-steps")
        for name, run, sync in STEP_RUNS:
            torch.save(run(d, kw["steps"], sync), Path(kw["dump"], f"{name}{'-sync' * sync}{rank}.pt"))
        return 0
    from lf2core.stages import finetune as ft
    from lf2core.training import Finetuner
    from test_pretrain import tiny_cfg

    cfg = tiny_cfg(*kw["sets"])
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
