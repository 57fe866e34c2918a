"""LF2 finetuning: ghost BN vs separate forwards, the fast step vs the plain released step (same math),
the loss vs hand-written formulas, labels/centroids, deterministic loaders, and the round stage with an
exact resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lf2core.checkpoint import load_checkpoint, save_checkpoint
from lf2core.data.manifest import read_manifest, split
from lf2core.errors import DataError
from lf2core.artifacts import read_model
from lf2core.cluster import class_centroids, training_labels
from lf2core.models import LF2Output, SourceModel, build_target_model
from lf2core.training import (
    Criteria,
    Finetuner,
    StepSettings,
    fast_step,
    ghost_batchnorm,
    global_step,
    lf2_loss,
    make_optimizer,
    reference_step,
    round_loaders,
)
from test_pretrain import make_tiny_data, tiny_cfg

ARCH = "resnet18_narrow"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


# ----------------------------------------------------------------------------------------- ghost BN
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_batchnorm_equals_separate_forwards(momentum):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 2, 5), nn.BatchNorm1d(5, momentum=momentum))
    ref = copy.deepcopy(net)
    xs = [torch.randn(n, 3, 6, 4) * (k + 1) + k for k, n in enumerate((4, 6, 5))]
    outs_ref = [ref(x) for x in xs]  # three separate train-mode forwards
    with ghost_batchnorm([net], [4, 6, 5]):
        out = net(torch.cat(xs))
    assert torch.allclose(out, torch.cat(outs_ref), atol=1e-5)
    for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    assert int(net[1].num_batches_tracked) == 3
    # the patch is gone after the block: a plain forward again
    assert "forward" not in vars(net[1])
    y = net(torch.cat(xs))
    assert torch.allclose(y, ref(torch.cat(xs)), atol=1e-5)


def test_ghost_batchnorm_leaves_other_sizes_and_eval_alone():
    bn = nn.BatchNorm1d(3)
    x = torch.randn(7, 3)
    with ghost_batchnorm([bn], [3, 3]):  # 7 rows != 6: a normal forward
        y = bn(x)
    assert torch.allclose(y, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps), atol=1e-5)
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    with ghost_batchnorm([bn], [3, 4]):
        z = bn(x)
    assert torch.allclose(z, (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps), atol=1e-5)


# ----------------------------------------------------------------------------------------- loss
def soft_triplet_bruteforce(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch-hard soft-margin triplet with explicit loops (anchor counts as its own positive)."""
    n = len(y)
    total = 0.0
    for i in range(n):
        d = [float(torch.sqrt(((f[i] - f[j]) ** 2).sum().clamp(min=1e-12))) for j in range(n)]
        dap = max(d[j] for j in range(n) if y[j] == y[i])
        dan = min(d[j] for j in range(n) if y[j] != y[i])
        total += float(np.log1p(np.exp(dap - dan)))
    return torch.tensor(total / n)


def ce_ls_bruteforce(logits: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    n = logits.shape[1]
    total = 0.0
    for i in range(len(y)):
        logp = logits[i] - torch.logsumexp(logits[i], 0)
        q = torch.full((n,), eps / n)
        q[y[i]] += 1 - eps
        total += float(-(q * logp).sum())
    return torch.tensor(total / len(y))


def test_lf2_loss_against_hand_formula():
    g = torch.Generator().manual_seed(0)
    b, c, n_cls = 8, 5, 4
    ys = [torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([1, 1, 1, 0, 0, 0, 2, 2]),
          torch.tensor([3, 3, 2, 2, 1, 1, 0, 0])]

    def out():
        return LF2Output(torch.zeros(b, c, 2, 1), torch.randn(b, c, generator=g),
                         [torch.randn(b, c, generator=g) for _ in range(2)], [torch.rand(b, c, generator=g)] * 2,
                         torch.randn(b, n_cls, generator=g))

    outs = [out() for _ in range(3)]
    fusion = [[torch.randn(b, c, generator=g) for _ in range(3)] for _ in range(3)]
    crit = Criteria(n_cls, 0.1)
    loss, terms = lf2_loss(outs, None, ys, crit, StepSettings(part_loss_weight=0.5))
    expect = (ce_ls_bruteforce(outs[0].logits, ys[0], 0.1) + soft_triplet_bruteforce(outs[0].global_feat, ys[0])
              + 0.5 * soft_triplet_bruteforce(outs[1].part_feats[0], ys[1])
              + 0.5 * soft_triplet_bruteforce(outs[2].part_feats[1], ys[2]))
    assert abs(float(loss) - float(expect)) < 1e-4
    acc = float((outs[0].logits.argmax(1) == ys[0]).float().mean())
    assert abs(float(terms["acc"]) - acc) < 1e-7
    lf, tf = lf2_loss(outs, fusion, ys, crit, StepSettings(part_loss_weight=0.5, fusion_loss_weight=0.3))
    fexp = (soft_triplet_bruteforce(fusion[0][0], ys[0]) + 0.5 * soft_triplet_bruteforce(fusion[1][1], ys[1])
            + 0.5 * soft_triplet_bruteforce(fusion[2][2], ys[2]))
    assert abs(float(lf) - float(expect + 0.3 * fexp)) < 1e-4
    lg, tg = lf2_loss(outs[:1], None, ys[:1], crit, StepSettings(variant="mt_global"))
    assert abs(float(lg) - float(ce_ls_bruteforce(outs[0].logits, ys[0], 0.1)
                                 + soft_triplet_bruteforce(outs[0].global_feat, ys[0]))) < 1e-4
    assert set(tg) == {"ce", "tri_global", "acc"}


# ----------------------------------------------------------------------------------------- same math
def _mean_teacher(dtype=torch.float32, num_classes=6):
    torch.manual_seed(0)
    src = SourceModel(ARCH, 10)
    src.train()(torch.randn(8, 3, 32, 16))  # non-trivial source BN statistics
    mt = build_target_model(tiny_cfg(), src.state_dict(), num_classes=num_classes)
    mt.reset_classifier(torch.randn(num_classes, mt.student.out_channels))
    return mt.to(dtype)


def _batches(dtype, n_batches=3, seed=1, width=8):
    g = torch.Generator().manual_seed(seed)
    ys = [torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([2, 3, 3, 4, 4, 2]), torch.tensor([5, 5, 5, 0, 0, 0])]
    return [(torch.randn(6, 3, 32, width, generator=g, dtype=dtype), ys[k]) for k in range(n_batches)]


def _run_both(settings, dtype, steps=2, first_step=0, width=8):
    a = _mean_teacher(dtype)
    b = copy.deepcopy(a)
    oa, ob = make_optimizer(a, 3.5e-4, 5e-4), make_optimizer(b, 3.5e-4, 5e-4)
    crit = Criteria(6, settings.label_smoothing)
    n = settings.num_batches(2)
    log = []
    for s in range(steps):
        batches = _batches(dtype, n, seed=s, width=width)
        ra = reference_step(a, oa, batches, first_step + s, crit, settings)
        rb = fast_step(b, ob, batches, first_step + s, crit, settings)
        grads = [(pa.grad, pb.grad) for pa, pb in zip(a.parameters(), b.parameters())]
        log.append((ra, rb, grads))
    return a, b, log


@pytest.mark.parametrize("settings", [StepSettings(), StepSettings(fusion_loss_weight=0.3)], ids=["paper", "fusion"])
def test_fast_step_same_math_float64(settings):
    """Exact arithmetic check: in float64 the two steps agree to rounding (1e-9) in every number, including
    the EMA teacher (global step 3: alpha 0.75) and every BN running statistic."""
    a, b, log = _run_both(settings, torch.float64, steps=1, first_step=3)
    for ra, rb, grads in log:
        assert abs(float(ra.loss) - float(rb.loss)) < 1e-9
        assert ra.alpha == rb.alpha
        for ga, gb in grads:
            assert (ga is None) == (gb is None)
            if ga is not None:
                assert torch.allclose(ga, gb, atol=1e-9, rtol=1e-7)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # parameters after Adam, EMA teacher, every BN running statistic and counter
        assert torch.allclose(sa[k].double(), sb[k].double(), atol=1e-9, rtol=1e-7), k


@pytest.mark.parametrize("settings", [StepSettings(fusion_loss_weight=0.3), StepSettings(variant="mt_global")],
                         ids=["fusion", "mt_global"])
def test_fast_step_same_math_float32(settings):
    """float32, ONE optimisation step (the brief): loss, gradients, Adam-updated parameters, EMA teacher
    and BN buffers agree to ~1e-5.

    Adam's first update is ~lr * g / |g|: where a gradient is zero in exact arithmetic (the expert Linear
    biases feed a train-mode BatchNorm, which cancels any constant shift; kernel taps that only ever see
    padding) both implementations hold float32 rounding noise and Adam turns it into a step of up to lr
    in either direction. Those elements (|g| below 1e-4 x the tensor's largest gradient) are only checked
    against that +-lr bound; every other element must agree to 1e-5.
    """
    lr = 3.5e-4
    a, b, log = _run_both(settings, torch.float32, steps=1, width=16)
    ra, rb, grads = log[0]
    assert abs(float(ra.loss) - float(rb.loss)) <= 1e-5 * abs(float(ra.loss))
    scale = max(float(ga.abs().max()) for ga, _ in grads if ga is not None)
    noisy: dict[str, torch.Tensor] = {}
    for (name, _), (ga, gb) in zip(a.named_parameters(), grads):
        assert (ga is None) == (gb is None)
        if ga is None:
            continue
        assert float((ga - gb).abs().max()) <= 1e-5 * max(1.0, float(ga.abs().max())), name
        noisy[name] = ga.abs() <= 1e-4 * ga.abs().max()
        if name.startswith("student.experts.") and name.endswith(".bias"):
            assert float(ga.abs().max()) < 1e-5 * scale  # exact gradient 0: all noise
            noisy[name][:] = True
    assert len(noisy) > 40
    noisy.update({"teacher." + k[len("student."):]: v for k, v in list(noisy.items()) if k.startswith("student.")})
    sa, sb = a.state_dict(), b.state_dict()
    compared = 0
    for k in sa:
        x, y = sa[k].double(), sb[k].double()
        m = noisy.get(k)
        if m is not None and bool(m.any()):
            assert float((x - y)[m].abs().max()) <= 2 * lr + 1e-6, k
            x, y = x[~m], y[~m]
        compared += x.numel()
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-5), (k, float((x - y).abs().max()))
    total = sum(v.numel() for v in sa.values())
    assert compared > 0.4 * total  # layer4 on a 2x1 map: 2/3 of each 3x3 kernel only sees padding


def test_step_semantics_paper_vs_fusion():
    """Paper recipe: attention and Fuse BN weights untouched, Fuse and teacher BN statistics move, teacher =
    EMA of parameters. With a fusion loss the attention learns."""
    for fw in (0.0, 0.3):
        settings = StepSettings(fusion_loss_weight=fw)
        mt = _mean_teacher()
        before = copy.deepcopy(mt)
        opt = make_optimizer(mt, 3.5e-4, 5e-4)
        step = 5
        fast_step(mt, opt, _batches(torch.float32), step, Criteria(6), settings)
        att = [n for n, _ in mt.student.named_parameters() if n.startswith("attentions.")]
        moved = {n: not torch.equal(p, dict(before.student.named_parameters())[n])
                 for n, p in mt.student.named_parameters()}
        assert all(moved[n] == (fw > 0) for n in att)
        assert torch.equal(mt.fuse.bns[1].weight, before.fuse.bns[1].weight) == (fw == 0)
        assert not torch.equal(mt.fuse.bns[1].running_mean, before.fuse.bns[1].running_mean)
        assert int(mt.fuse.bns[0].num_batches_tracked) == 3
        assert not torch.equal(mt.teacher.backbone.bn1.running_mean, before.teacher.backbone.bn1.running_mean)
        assert int(mt.teacher.global_bn.num_batches_tracked) == int(before.teacher.global_bn.num_batches_tracked) + 3
        alpha = min(1 - 1 / (step + 1), 0.999)
        for (n, t), t0, s in zip(mt.teacher.named_parameters(), before.teacher.parameters(), mt.student.parameters()):
            assert torch.allclose(t, alpha * t0 + (1 - alpha) * s, atol=1e-6), n


def test_global_step_counts_across_rounds():
    assert global_step(0, 0, 0, 1, 400) == 0
    assert global_step(2, 0, 5, 1, 400) == 805
    assert global_step(1, 1, 3, 2, 10) == (1 * 2 + 1) * 10 + 3


# ----------------------------------------------------------------------------------------- labels
def test_training_labels_policies_and_renumbering():
    raw = {"global": np.array([5, 5, -1, 2, 2, 9, -1]), "upper": np.array([0, 1, -1, 1, 0, -1, 0]),
           "lower": np.array([3, 3, 3, -1, 4, 4, 4])}
    sets, g = training_labels(raw, "drop")
    assert g == 3 and sets["global"].tolist() == [1, 1, -1, 0, 0, 2, -1]
    assert sets["upper"].tolist() == raw["upper"].tolist() and sets["lower"].tolist() == raw["lower"].tolist()
    sets, g = training_labels(raw, "singleton")
    assert g == 5 and sets["global"].tolist() == [1, 1, 3, 0, 0, 2, 4]
    assert (sets["upper"] >= 0).all() and len(set(sets["upper"][[2, 5]])) == 2
    sets, g = training_labels({"global": raw["global"]}, "drop")
    assert list(sets) == ["global"] and g == 3


def test_class_centroids_bruteforce():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(9, 4)).astype(np.float32)
    y = np.array([0, 1, 0, -1, 2, 1, 2, 2, -1])
    c = class_centroids(f, y, 3)
    for k in range(3):
        m = f[y == k].mean(0)
        assert np.allclose(c[k], m / np.linalg.norm(m), atol=1e-6)


# ----------------------------------------------------------------------------------------- stage
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    data = make_tiny_data(tmp)
    cfg = tiny_cfg("finetune.batch_size=8", "finetune.num_instances=2", "finetune.iters_per_epoch=3",
                   "finetune.epochs_per_round=2", "cluster.num_clusters=4")
    torch.manual_seed(3)
    src = SourceModel(ARCH, 6)
    src.train()(torch.randn(8, 3, 32, 16))
    save_checkpoint(str(tmp / "pre" / "model.pt"), src, "source", cfg)
    samples = split(read_manifest(data), "target_train")
    pids = np.array([s.pid for s in samples])
    _, ids = np.unique(pids, return_inverse=True)  # 6 ids
    labels = {"global": ids % 4, "upper": ids % 3, "lower": np.where(ids == 5, -1, ids // 2)}
    (tmp / "labels").mkdir()
    cents = np.random.default_rng(0).normal(size=(4, 256)).astype(np.float32)  # the classifier initialisation
    np.savez(tmp / "labels" / "labels.npz", centroids=cents, **{k: v.astype(np.int64) for k, v in labels.items()})
    return tmp, data, cfg, labels


def _state(path: Path) -> dict:
    return load_checkpoint(str(path))["state_dict"]


def test_round_loaders_deterministic_and_resumable(tiny):
    tmp, data, cfg, labels = tiny
    from lf2core.data.transforms import train_transform

    samples = split(read_manifest(data), "target_train")
    tf = train_transform(32, 16, random_erasing=0.5)
    sets = [labels["global"], labels["upper"], labels["lower"]]
    full = [list(dl) for dl in round_loaders(samples, sets, tf, 8, 2, 3, 1, 0, 0)]
    again = [list(dl) for dl in round_loaders(samples, sets, tf, 8, 2, 3, 1, 0, 0)]
    late = [list(dl) for dl in round_loaders(samples, sets, tf, 8, 2, 3, 1, 0, 0, start=2)]
    other = [list(dl) for dl in round_loaders(samples, sets, tf, 8, 2, 3, 1, 0, 1)]
    for k in range(3):
        assert len(full[k]) == 3 and len(late[k]) == 1
        for b1, b2 in zip(full[k], again[k]):
            assert torch.equal(b1[0], b2[0]) and torch.equal(b1[3], b2[3])
        assert torch.equal(full[k][2][0], late[k][0][0]) and torch.equal(full[k][2][1], late[k][0][1])
        # batches are identity balanced by their own label set; outliers (-1) never drawn
        y = full[k][0][1]
        assert (y >= 0).all() and all(int((y == v).sum()) == 2 for v in y.unique())
        assert torch.equal(y, torch.as_tensor(sets[k])[full[k][0][3]])
    assert not torch.equal(full[0][0][0], other[0][0][0])  # another epoch, other batches


def test_cluster_centroids_are_the_global_fusion_features_of_the_model(tiny, tmp_path):
    """The cluster stage's centroids (labels.npz) are the class means of the model's global FUSION
    features (re-extracted here with the round's model, as finetune did before the cluster stage wrote
    them), and finetune starts student and teacher from exactly them, renormalised."""
    from lf2core.data.loaders import test_loader
    from lf2core.data.transforms import test_transform
    from lf2core.features import extract
    from lf2core.stages.cluster import cluster
    from lf2core.stages.extract import extract_features
    from lf2core.stages.finetune import finetune

    tmp, data, cfg, labels = tiny
    extract_features(cfg, str(data), str(tmp / "pre"), str(tmp_path / "feats"))
    cluster(cfg, str(tmp_path / "feats"), str(tmp_path / "labels"))
    with np.load(tmp_path / "labels" / "labels.npz") as z:
        got, glob_labels = z["centroids"], z["global"]
    samples = split(read_manifest(data), "target_train")
    mt = read_model(cfg, str(tmp / "pre")).mean_teacher().eval()
    loader = test_loader(samples, test_transform(cfg.data.height, cfg.data.width), cfg.eval.batch_size, 0)
    glob = extract(lambda x: mt.fusion_features(x)[0], loader, "cpu", flip=True, amp=cfg.amp)["features"]
    g = int(glob_labels.max()) + 1
    assert got.shape == (g, mt.student.out_channels)
    assert torch.allclose(torch.as_tensor(got), torch.as_tensor(class_centroids(glob, glob_labels, g)), atol=1e-5)
    # given centroids are used as they are, renormalised
    zero = copy.deepcopy(cfg)
    zero.finetune.epochs_per_round = 0
    finetune(zero, str(data), str(tmp / "labels"), str(tmp / "pre"), str(tmp_path / "ft0"))
    with np.load(tmp / "labels" / "labels.npz") as z:
        given = z["centroids"]
    for name in ("student.pt", "teacher.pt"):
        w = _state(tmp_path / "ft0" / name)
        key = "student.classifier.weight" if name == "student.pt" else "classifier.weight"
        assert torch.allclose(w[key], F.normalize(torch.as_tensor(given), dim=1), atol=1e-6)


def test_finetune_round_outputs_and_exact_resume(tiny, tmp_path, monkeypatch):
    from lf2core.stages import finetune as ft

    tmp, data, cfg, labels = tiny
    pre, lab = str(tmp / "pre"), str(tmp / "labels")
    from lf2core.checkpoint import TrainingState

    saved, real_save = [], TrainingState.save
    monkeypatch.setattr(TrainingState, "save", lambda self, m, o, s, epoch, **extra: saved.append(
        (epoch, extra["iteration"])) or real_save(self, m, o, s, epoch, **extra))
    res = ft.finetune(cfg, str(data), lab, pre, str(tmp_path / "full"), round_index=1, checkpoint_every=2)
    monkeypatch.setattr(TrainingState, "save", real_save)
    assert res["global_step"] == 2 * 2 * 3 * 1 + 0 and res["num_classes"] == 4
    # the state after iteration 2 of each epoch (checkpoint_every) and after each epoch
    assert saved == [(0, 2), (1, 0), (1, 2), (2, 0)]
    out = tmp_path / "full"
    assert {p.name for p in out.iterdir()} >= {"student.pt", "teacher.pt", "metrics.json", "_COMPLETE"}
    t = load_checkpoint(str(out / "teacher.pt"))
    assert t["kind"] == "lf2" and t["variant"] == "lf2" and t["round"] == 1 and t["num_classes"] == 4
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)
    assert not (tmp_path / "full.partial").exists()
    # the next round's model loads back (student + teacher + Fuse)
    loaded = read_model(cfg, str(out))
    mt, kind = loaded.mean_teacher(), loaded.kind
    assert kind == "lf2" and mt.student.num_classes == 4

    # killed in epoch 2 after iteration 4 (mid-epoch state saved at iteration 2 of epoch 2), then resumed
    calls = {"n": 0}
    real_step = Finetuner.step

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(Finetuner, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(cfg, str(data), lab, pre, str(tmp_path / "resumed"), round_index=1, checkpoint_every=2)
    assert (tmp_path / "resumed.partial" / "state.pt").exists() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(Finetuner, "step", real_step)
    resumed_steps = []
    monkeypatch.setattr(Finetuner, "step", lambda self, o, b, s, **k: resumed_steps.append(s) or real_step(self, o, b, s, **k))
    ft.finetune(cfg, str(data), lab, pre, str(tmp_path / "resumed"), round_index=1, checkpoint_every=2)
    assert resumed_steps == [global_step(1, 1, 2, 2, 3)]  # only the last iteration was redone
    for name in ("student.pt", "teacher.pt"):
        a, b = _state(out / name), _state(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    h1 = json.loads((out / "metrics.json").read_text())["history"]
    h2 = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["history"]
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in h2], rel=1e-6)


def test_finetune_bad_labels_name_the_file(tiny, tmp_path):
    from lf2core.stages.finetune import finetune

    tmp, data, cfg, labels = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "labels.npz", **{k: v[:-1] for k, v in labels.items()})
    with pytest.raises(DataError, match=r"bad/labels.npz.*'global' has \d+ labels but the target train split"):
        finetune(cfg, str(data), str(bad), str(tmp / "pre"), str(tmp_path / "o"))
    np.savez(bad / "labels.npz", glob=labels["global"])
    with pytest.raises(DataError, match="missing label array 'global'"):
        finetune(cfg, str(data), str(bad), str(tmp / "pre"), str(tmp_path / "o"))
    np.savez(bad / "labels.npz", **{**labels, "global": np.zeros_like(labels["global"])})
    with pytest.raises(DataError, match="1 global cluster"):
        finetune(cfg, str(data), str(bad), str(tmp / "pre"), str(tmp_path / "o"))


def test_mt_global_variant_trains_global_only(tiny, tmp_path):
    from lf2core.stages.finetune import finetune

    tmp, data, cfg, labels = tiny
    cfg = copy.deepcopy(cfg)
    cfg.finetune.variant = "mt_global"
    cfg.finetune.epochs_per_round = 1
    res = finetune(cfg, str(data), str(tmp / "labels"), str(tmp / "pre"), str(tmp_path / "g"), checkpoint_every=0)
    assert "tri_part1" not in res and res["global_step"] == 3
    s0 = read_model(cfg, str(tmp / "pre")).mean_teacher().student.state_dict()
    s1 = _state(tmp_path / "g" / "student.pt")
    # the part experts get no gradient in mt_global (only BN statistics move)
    assert torch.equal(s0["experts.0.weight"], s1["student.experts.0.weight"])
    assert not torch.equal(s0["backbone.conv1.weight"], s1["student.backbone.conv1.weight"])
    assert load_checkpoint(str(tmp_path / "g" / "teacher.pt"))["variant"] == "mt_global"


def test_teacher_tail_skipping_keeps_the_round_result():
    """Skipping the teacher/Fuse forwards before the tail leaves the student and the EMA teacher bitwise
    unchanged and the teacher/Fuse BN statistics equal to float32 precision (BN momentum raised to 0.5 so
    the tail is short: (1 - 0.5)^30 = 2^-30 -> 30 forwards -> 10 iterations of 3 batches)."""
    from lf2core.training import teacher_tail

    full = _mean_teacher()
    assert teacher_tail(full, 3) == 66  # momentum 0.1: ceil(ceil(log(2^-30) / log(0.9)) / 3)
    for mod in (full.teacher, full.fuse):
        for m in mod.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.5
    skip, short = copy.deepcopy(full), copy.deepcopy(full)
    tail = teacher_tail(skip, 3)
    assert tail == 10
    n = 14
    crit, settings = Criteria(6), StepSettings()
    oa, ob, oc = (make_optimizer(m, 3.5e-4, 5e-4) for m in (full, skip, short))
    for i in range(n):
        batches = _batches(torch.float32, seed=100 + i)
        fast_step(full, oa, batches, i, crit, settings)
        fast_step(skip, ob, batches, i, crit, settings, teacher_pass=i >= n - tail)
        fast_step(short, oc, batches, i, crit, settings, teacher_pass=i >= n - 3)  # too short a tail
    sa, sb = full.state_dict(), skip.state_dict()
    for k in sa:
        if k.startswith("student.") or (k.startswith("teacher.") and "running" not in k) or "num_batches" in k:
            assert torch.equal(sa[k], sb[k]), k
        else:
            assert torch.allclose(sa[k], sb[k], rtol=1e-6, atol=1e-7), (k, float((sa[k] - sb[k]).abs().max()))
    # a tail shorter than teacher_tail is visible (so the comparison above can fail)
    sc = short.state_dict()
    assert not torch.allclose(sa["teacher.global_bn.running_var"], sc["teacher.global_bn.running_var"], rtol=1e-6, atol=1e-7)
