"""Camera proxy contrastive loss (``finetune.camera_proxy_weight``): proxy construction, the loss and its
gradient against a per-image Python loop, the memory update, fast == reference step, weight 0 == no term,
and a tiny finetune round that trains with it and resumes bit-identically."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from lf2core.checkpoint import load_checkpoint
from lf2core.data.manifest import read_manifest, split
from lf2core.training import Criteria, Finetuner, StepSettings, fast_step, make_optimizer, reference_step
from lf2core.training import camera_proxy as cp
from lf2core.training import finetuner as finetuner_module
from lf2core.training.camera_proxy import CameraProxyMemory, CameraProxySettings, camera_proxy_loss

from test_finetune import _batches, _mean_teacher, tiny  # noqa: F401  (tiny: the module fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


# ----------------------------------------------------------------------------------------- proxies
def test_proxy_table_and_centres_against_groupby():
    rng = np.random.default_rng(0)
    labels = np.array([2, 0, 0, -1, 1, 2, 0, 1, 2, 2, -1, 0])
    cams = np.array([1, 0, 2, 0, 1, 1, 0, 0, 3, 1, 2, 2])
    feats = rng.normal(size=(len(labels), 5))
    of_image, plabel, pcam = cp.proxy_table(labels, cams)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (y, c) in enumerate(zip(labels, cams)):
        if y >= 0:
            groups.setdefault((int(y), int(c)), []).append(i)
    keys = sorted(groups)  # (label, camera), label first
    assert list(zip(plabel.tolist(), pcam.tolist())) == keys
    assert of_image.tolist() == [keys.index((int(y), int(c))) if y >= 0 else -1 for y, c in zip(labels, cams)]
    cent = cp.proxy_centres(feats, of_image, len(keys))
    assert cent.dtype == np.float32 and cent.shape == (len(keys), 5)
    for p, k in enumerate(keys):
        m = feats[groups[k]].mean(axis=0)
        assert np.allclose(cent[p], m / np.linalg.norm(m), atol=1e-6)
    with pytest.raises(ValueError, match="without an image"):
        cp.proxy_centres(feats, of_image, len(keys) + 1)


# ----------------------------------------------------------------------------------------- loss
def _loss_loop(f, ids, proxies, plabel, pcam, t, k):
    """The module docstring's formulas, one image and one proxy at a time (float64 Python + autograd)."""
    intra_sum, inter_sum = 0.0, 0.0
    P = proxies.shape[0]
    for i in range(f.shape[0]):
        fi = f[i] / f[i].norm()
        s = [torch.dot(fi, proxies[p]) / t for p in range(P)]
        q = int(ids[i])
        cam_set = [p for p in range(P) if int(pcam[p]) == int(pcam[q])]
        intra_sum = intra_sum - (s[q] - torch.log(sum(torch.exp(s[p]) for p in cam_set)))
        pos = [p for p in range(P) if int(plabel[p]) == int(plabel[q])]
        others = sorted((p for p in range(P) if p not in pos), key=lambda p: -float(s[p]))[:k]
        denom = torch.log(sum(torch.exp(s[u]) for u in pos + others))
        inter_sum = inter_sum - sum(s[p] - denom for p in pos) / len(pos)
    n = f.shape[0]
    return intra_sum / n, inter_sum / n


def _case(seed=0, B=7, D=6):
    g = torch.Generator().manual_seed(seed)
    plabel = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4])  # 5 identities, 1..3 cameras each
    pcam = torch.tensor([0, 1, 2, 0, 2, 1, 0, 1, 2])
    proxies = torch.nn.functional.normalize(torch.randn(len(plabel), D, generator=g, dtype=torch.float64), dim=1)
    ids = torch.tensor([0, 2, 3, 4, 5, 6, 2])[:B]
    f = (3.0 * torch.randn(B, D, generator=g, dtype=torch.float64)).requires_grad_(True)
    return f, ids, proxies, plabel, pcam


@pytest.mark.parametrize("k", [0, 2, 50])
def test_loss_and_gradient_against_per_image_loop(k):
    f, ids, proxies, plabel, pcam = _case()
    intra, inter = camera_proxy_loss(f, ids, proxies, plabel, pcam, 0.07, k)
    (g,) = torch.autograd.grad(0.3 * intra + inter, f)
    f2 = f.detach().clone().requires_grad_(True)
    r_intra, r_inter = _loss_loop(f2, ids, proxies, plabel, pcam, 0.07, k)
    (rg,) = torch.autograd.grad(0.3 * r_intra + r_inter, f2)
    assert float(intra) == pytest.approx(float(r_intra), rel=1e-10)
    assert float(inter) == pytest.approx(float(r_inter), rel=1e-10)
    assert torch.allclose(g, rg, atol=1e-10, rtol=1e-8)
    assert float(intra) > 0 and float(inter) > 0 and float(g.abs().max()) > 1e-3


def test_loss_hand_computed_two_proxies():
    """One image, its identity seen by 2 cameras, one other identity, t = 1, k = 1: by hand."""
    proxies = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    plabel, pcam = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    f = torch.tensor([[2.0, 0.0]], dtype=torch.float64)  # normalised: (1, 0); scores 1, 0, -1
    intra, inter = camera_proxy_loss(f, torch.tensor([0]), proxies, plabel, pcam, 1.0, 1)
    z = math.e + 1 + math.exp(-1)
    assert float(intra) == pytest.approx(-(1 - math.log(math.e + math.exp(-1))))  # camera 0: proxies 0 and 2
    assert float(inter) == pytest.approx(-0.5 * ((1 - math.log(z)) + (0 - math.log(z))))


def test_memory_update_image_by_image():
    f, ids, proxies, plabel, pcam = _case(seed=1)
    of_image = torch.arange(len(plabel))
    mem = CameraProxyMemory(proxies.clone(), plabel, pcam, of_image, CameraProxySettings(weight=1.0, momentum=0.2))
    mem.update(f, ids)
    want = proxies.clone()
    for i, q in enumerate(ids.tolist()):  # proxy 2 twice: the second update starts from the first
        v = 0.2 * want[q] + 0.8 * f[i].detach() / f[i].detach().norm()
        want[q] = v / v.norm()
    assert torch.allclose(mem.proxies, want, atol=1e-12)
    untouched = [p for p in range(len(plabel)) if p not in ids.tolist()]
    assert torch.equal(mem.proxies[untouched], proxies[untouched])
    state = mem.state_dict()
    other = CameraProxyMemory(torch.zeros_like(proxies), plabel, pcam, of_image, mem.settings)
    other.load_state_dict(state)
    assert torch.equal(other.proxies, mem.proxies)
    wrong = CameraProxyMemory(torch.zeros_like(proxies), plabel.flip(0), pcam, of_image, mem.settings)
    with pytest.raises(ValueError, match="other labels"):
        wrong.load_state_dict(state)


# ----------------------------------------------------------------------------------------- steps
def _memory(mt, dtype, weight):
    """Proxies for the labels of ``test_finetune._batches`` (global batch labels 0,0,1,1,2,2; 6 images with
    cameras 0,1,0,1,1,1 -> proxies (0,0) (0,1) (1,0) (1,1) (2,1)), random unit rows."""
    labels, cams = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 0, 1, 1, 1])
    feats = np.random.default_rng(5).normal(size=(6, mt.student.out_channels))
    s = CameraProxySettings(weight=weight, temperature=0.1, momentum=0.2, negatives=2, intra_weight=0.5)
    return CameraProxyMemory.build(labels, cams, feats, s).to("cpu", dtype)


@pytest.mark.parametrize("variant", ["lf2", "mt_global"])
def test_fast_step_same_math_with_camera_proxies_float64(variant):
    """The equivalence of tests/test_finetune.py with the camera proxy term: two steps, float64, same
    loss, gradients, parameters and memory to rounding."""
    settings = StepSettings(variant=variant)
    a = _mean_teacher(torch.float64)
    b = copy.deepcopy(a)
    ma = _memory(a, torch.float64, 0.7)
    mb = copy.deepcopy(ma)
    oa, ob = make_optimizer(a, 3.5e-4, 5e-4), make_optimizer(b, 3.5e-4, 5e-4)
    crit = Criteria(6, settings.label_smoothing)
    index = torch.arange(6)
    for s in range(2):
        batches = _batches(torch.float64, settings.num_batches(2), seed=s)
        ra = reference_step(a, oa, batches, 3 + s, crit, settings, cam_proxy=(ma, ma.ids(index)))
        rb = fast_step(b, ob, batches, 3 + s, crit, settings, cam_proxy=(mb, mb.ids(index)))
        assert abs(float(ra.loss) - float(rb.loss)) < 1e-9
        for key in ("cam_proxy_intra", "cam_proxy_inter"):
            assert float(ra.terms[key]) > 0 and abs(float(ra.terms[key]) - float(rb.terms[key])) < 1e-9
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert (pa.grad is None) == (pb.grad is None)
            if pa.grad is not None:
                assert torch.allclose(pa.grad, pb.grad, atol=1e-9, rtol=1e-7)
    assert torch.allclose(ma.proxies, mb.proxies, atol=1e-12)
    assert not torch.allclose(ma.proxies, _memory(a, torch.float64, 0.7).proxies)  # the memory moved
    for k, v in a.state_dict().items():
        assert torch.allclose(v.double(), b.state_dict()[k].double(), atol=1e-9, rtol=1e-7), k


def test_weight_zero_is_the_plain_step_bit_for_bit():
    """A memory with weight 0 adds 0 x (loss) : parameters identical to the step without the term."""
    settings = StepSettings()
    a = _mean_teacher(torch.float32)
    b = copy.deepcopy(a)
    mb = _memory(b, torch.float32, 0.0)
    oa, ob = make_optimizer(a, 3.5e-4, 5e-4), make_optimizer(b, 3.5e-4, 5e-4)
    crit = Criteria(6, settings.label_smoothing)
    batches = _batches(torch.float32, 3, seed=0)
    ra = fast_step(a, oa, batches, 0, crit, settings)
    rb = fast_step(b, ob, batches, 0, crit, settings, cam_proxy=(mb, mb.ids(torch.arange(6))))
    assert torch.equal(ra.loss, rb.loss)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


# ----------------------------------------------------------------------------------------- stage
def _weights(path):
    return load_checkpoint(str(path))["state_dict"]


def test_default_config_builds_no_memory(tiny, tmp_path, monkeypatch):  # noqa: F811
    from lf2core.stages import finetune as ft

    tmp, data, cfg, _ = tiny
    assert cfg.finetune.camera_proxy_weight == 0.0
    monkeypatch.setattr(finetuner_module, "teacher_global_features",
                        lambda *a, **k: pytest.fail("extracted with weight 0"))
    one = copy.deepcopy(cfg)
    one.finetune.epochs_per_round = 1
    res = ft.finetune(one, str(data), str(tmp / "labels"), str(tmp / "pre"), str(tmp_path / "o"), checkpoint_every=0)
    assert not any(k.startswith("cam_proxy") for k in res)



def test_resume_key_unchanged_while_off(tiny):  # noqa: F811
    """With the term off, the resume fingerprint is the one of a config without the camera_proxy_* keys
    (states written before they existed still resume); any change of them while on changes it."""
    from lf2core import artifacts
    from lf2core.artifacts import read_labels
    from lf2core.checkpoint import fingerprint
    from lf2core.stages.finetune import _key

    tmp, data, cfg, _ = tiny
    pl = read_labels(str(tmp / "labels"), len(split(read_manifest(data), "target_train")))
    pre = str(tmp / "pre")
    d = cfg.to_dict()
    old = {k: d[k] for k in ("seed", "model", "finetune")}
    old["finetune"] = {k: v for k, v in old["finetune"].items() if not k.startswith("camera_proxy")}
    old.update({"cluster.outliers": d["cluster"]["outliers"], "data": {"height": 32, "width": 16}, "round": 0})
    blobs = [pl.raw] + [b for n, h in artifacts.model_digests(pre) for b in (n.encode(), bytes.fromhex(h))]
    assert _key(cfg, pl, pre, 0) == fingerprint(old, blobs)
    on = copy.deepcopy(cfg)
    on.finetune.camera_proxy_weight = 0.5
    other = copy.deepcopy(on)
    other.finetune.camera_proxy_negatives = 10
    assert len({_key(cfg, pl, pre, 0), _key(on, pl, pre, 0), _key(other, pl, pre, 0)}) == 3

def test_finetune_round_with_camera_proxies_trains_and_resumes_exactly(tiny, tmp_path, monkeypatch):  # noqa: F811
    """A tiny round (2 epochs x 3 iterations, proxies from the 4 global labels x the tiny set's cameras)
    logs the two terms; killed after 4 steps and resumed, it ends bit-identical (weights and memory)."""
    from lf2core.checkpoint import TrainingState
    from lf2core.stages import finetune as ft

    tmp, data, cfg, labels = tiny
    cfg = copy.deepcopy(cfg)
    cfg.finetune.camera_proxy_weight = 0.5
    pre, lab = str(tmp / "pre"), str(tmp / "labels")
    samples = split(read_manifest(data), "target_train")
    cams = np.array([s.camid for s in samples])
    assert len({(y, c) for y, c in zip(labels["global"], cams)}) > len(set(labels["global"]))  # > 1 camera per id
    memories = []
    real_save = TrainingState.save
    monkeypatch.setattr(TrainingState, "save", lambda self, *a, **k: memories.append(
        (k["iteration"], a[3], k["camera_proxy"]["proxies"].clone())) or real_save(self, *a, **k))
    res = ft.finetune(cfg, str(data), lab, pre, str(tmp_path / "full"), checkpoint_every=2)
    assert res["cam_proxy_intra"] > 0 and res["cam_proxy_inter"] > 0
    hist = json.loads((tmp_path / "full" / "metrics.json").read_text())["history"]
    assert all(np.isfinite(h["cam_proxy_inter"]) for h in hist)
    final_memory = memories[-1][2]
    assert not torch.equal(memories[0][2], final_memory)  # updated every step

    calls = {"n": 0}
    real_step = Finetuner.step

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2, iteration 3; the state of iteration 2 is saved
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    memories.clear()
    monkeypatch.setattr(Finetuner, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(cfg, str(data), lab, pre, str(tmp_path / "resumed"), checkpoint_every=2)
    monkeypatch.setattr(Finetuner, "step", real_step)
    monkeypatch.setattr(finetuner_module, "teacher_global_features", lambda *a, **k: pytest.fail("resume re-extracted"))
    ft.finetune(cfg, str(data), lab, pre, str(tmp_path / "resumed"), checkpoint_every=2)
    assert torch.equal(memories[-1][2], final_memory)
    for name in ("student.pt", "teacher.pt"):
        a, b = _weights(tmp_path / "full" / name), _weights(tmp_path / "resumed" / name)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


# ----------------------------------------------------------------------------------------- data parallel
def _proxy_steps(d, steps: int) -> tuple[dict, torch.Tensor]:
    """``steps`` fast steps with the camera proxy term (float64): under an active ``d`` this rank's half of
    every batch, else the whole batches with BN over groups of 3 (= the per-rank batch). Returns (state
    dict, memory)."""
    mt = _mean_teacher(torch.float64)
    mem = _memory(mt, torch.float64, 0.7)
    opt = make_optimizer(mt, 3.5e-4, 5e-4)
    parallel = d is not None and d.active
    for s in range(steps):
        batches, index = _batches(torch.float64, 3, seed=s), torch.arange(6)
        if parallel:
            rows = slice(3 * d.rank, 3 * d.rank + 3)
            batches, index = [(x[rows], y[rows]) for x, y in batches], index[rows]
        fast_step(mt, opt, batches, s, Criteria(6, 0.1), StepSettings(bn_group=0 if parallel else 3),
                  dist=d if parallel else None, cam_proxy=(mem, mem.ids(index)))
    return mt.state_dict(), mem.proxies


def test_camera_proxies_ddp_equal_one_process_float64(tmp_path):
    """torchrun, 2 CPU processes (gloo): the loss and memory update read the gathered global batch, so both
    ranks hold the same memory and weights, equal to one process with bn_group = the per-rank batch."""
    from test_distributed import _torchrun

    r = _torchrun(__file__, str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    assert torch.equal(ranks[0][1], ranks[1][1])
    for k, v in ranks[0][0].items():
        assert torch.equal(v, ranks[1][0][k]), k
    ref_state, ref_mem = _proxy_steps(None, 3)
    assert float((ranks[0][1] - ref_mem).abs().max()) <= 1e-12
    for k, v in ref_state.items():
        assert torch.allclose(ranks[0][0][k].double(), v.double(), atol=1e-9, rtol=1e-7), k



def test_finetune_stage_with_camera_proxies_under_torchrun(tiny, tmp_path):  # noqa: F811
    """The stage under torchrun (2 CPU processes): proxies from the rank shards' teacher features (rank 0's
    sent to all), the same first-step loss as one process with bn_group = the per-rank batch, identical
    weights on both ranks."""
    from lf2core.config import load_config
    from lf2core.stages.finetune import finetune
    from test_distributed import FT_TWO_STEPS, _worker
    from test_pretrain import TINY_OVERRIDES

    tmp, data, _, _ = tiny
    sets = [*FT_TWO_STEPS, "finetune.camera_proxy_weight=0.5"]
    ins = dict(data=str(data), labels=str(tmp / "labels"), model=str(tmp / "pre"))
    r = _worker("finetune", out=str(tmp_path / "ddp2"), sets=sets, dump=str(tmp_path), **ins)
    assert r.returncode == 0, r.stderr[-3000:]
    finetune(load_config("demo", [*TINY_OVERRIDES, *sets, "finetune.bn_group=3"]), ins["data"], ins["labels"],
             ins["model"], str(tmp_path / "one2"), checkpoint_every=0)
    h2, h1 = (json.loads((tmp_path / o / "metrics.json").read_text())["history"] for o in ("ddp2", "one2"))
    for key in ("loss", "cam_proxy_intra", "cam_proxy_inter"):
        assert h2[0][key] == pytest.approx(h1[0][key], rel=1e-6), key
    per_rank = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    for k, v in per_rank[0]["all"].items():
        assert torch.equal(v, per_rank[1]["all"][k]), k


if __name__ == "__main__":  # pragma: no cover  (torchrun worker of the test above)
    import os
    import sys
    from pathlib import Path

    from lf2core.config import load_config
    from lf2core.distributed import setup

    torch.set_num_threads(1)
    dist = setup(load_config("demo", ["device=cpu"]), "test-camera-proxy")
    torch.save(_proxy_steps(dist, 3), Path(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
