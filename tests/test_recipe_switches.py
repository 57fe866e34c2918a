"""The switches between lf2's behaviour and the released code's (issue 19; docs/method.md, section 9):
the recipes, BN groups (nn.DataParallel), TF32, k-means centres as classifier initialisation, the source
checkpoint choice, the released sampler through the fine-tuning step and round, and resuming a training
state saved with more CUDA devices than present. Sampler and erasing details: test_samplers.py,
test_transforms.py."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from lf2core import checkpoint
from lf2core.artifacts import read_labels
from lf2core.config import ConfigError, load_config
from lf2core.data.samplers import ReleasedBatchSampler
from lf2core.runtime import TORCH_TF32, DevicePolicy, apply_tf32
from lf2core.training import Criteria, StepSettings, fast_step, ghost_batchnorm, make_optimizer, reference_step
from lf2core.training.pretrainer import Pretrainer, SourceData
from lf2core.training.step import bn_groups
from test_finetune import _mean_teacher, tiny  # noqa: F401  (module fixture)
from test_pretrain import make_tiny_data, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

RELEASED = {"amp": False, "tf32": "never", "pretrain.sampler": "released", "pretrain.bn_group": 32,
            "pretrain.source_checkpoint": "best_source", "pretrain.eval_every": 5, "cluster.kmeans_n_init": 3,
            "cluster.classifier_init": "centres", "finetune.sampler": "released", "finetune.bn_group": 32,
            "finetune.erasing": "released", "finetune.random_erasing": 0.5}
LF2 = {"amp": True, "tf32": "default", "pretrain.sampler": "balanced", "pretrain.bn_group": 0,
       "pretrain.source_checkpoint": "final", "cluster.kmeans_n_init": 1, "cluster.classifier_init": "class_means",
       "finetune.sampler": "balanced", "finetune.bn_group": 0, "finetune.erasing": "torchvision"}


# ----------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", ["paper_duke2market", "paper_market2duke"])
def test_paper_recipes_select_the_released_behaviour(recipe):
    flat = load_config(recipe).flat()
    assert {k: flat[k] for k in RELEASED} == RELEASED


def test_lf2_recipes_keep_lf2_behaviour():
    for cfg in (load_config("demo"), load_config(None)):  # the demo recipe and the defaults
        flat = cfg.flat()
        assert {k: flat[k] for k in LF2} == LF2


def test_switch_values_are_checked():
    with pytest.raises(ConfigError, match="finetune.bn_group"):
        load_config("demo", ["finetune.bn_group=1"])
    with pytest.raises(ConfigError, match="pretrain.bn_group"):
        load_config("demo", ["pretrain.bn_group=-2"])
    with pytest.raises(ConfigError, match="cluster.classifier_init"):
        load_config("demo", ["cluster.classifier_init=centres", "cluster.method=dbscan"])
    for key, bad in (("finetune.sampler", "random"), ("pretrain.sampler", "pk"), ("finetune.erasing", "uniform"),
                     ("tf32", "maybe"), ("tf32", "off"), ("pretrain.source_checkpoint", "best_target")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("demo", [f"{key}={bad}"])


# ----------------------------------------------------------------------------------------- BN groups
def test_bn_group_by_hand():
    """One channel, rows 1, 3, 10, 20, groups of 2 (two replicas): each half normalised by its own
    statistics -> (-1, 1, -1, 1) (up to eps); running statistics from the FIRST half only, once:
    mean 0.9 * 0 + 0.1 * 2 = 0.2, var 0.9 * 1 + 0.1 * 2 (unbiased variance of 1, 3) = 1.1."""
    bn = nn.BatchNorm1d(1, eps=1e-9)
    x = torch.tensor([[1.0], [3.0], [10.0], [20.0]])
    with bn_groups([bn], 4, 2):
        y = bn(x)
    assert torch.allclose(y.flatten(), torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-6)
    assert torch.allclose(bn.running_mean, torch.tensor([0.2])) and torch.allclose(bn.running_var, torch.tensor([1.1]))
    assert int(bn.num_batches_tracked) == 1 and "forward" not in vars(bn)
    # group 0 or >= the batch: the plain BatchNorm over all 4 rows
    for g in (0, 4, 8):
        a, b = nn.BatchNorm1d(1), nn.BatchNorm1d(1)
        with bn_groups([a], 4, g):
            ya = a(x)
        assert torch.equal(ya, b(x)) and torch.equal(a.running_var, b.running_var)


def test_bn_group_with_sub_batches():
    """Two sub-batches of 4 (the fine-tuning step's concatenated batches), groups of 2: outputs per group,
    running statistics moved twice, from rows 0..1 then rows 4..5."""
    torch.manual_seed(0)
    bn, ref = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    x = torch.randn(8, 3) * 3 + 1
    with ghost_batchnorm([bn], [4, 4], group=2):
        y = bn(x)
    want = torch.cat([nn.functional.batch_norm(x[i:i + 2], None, None, training=True) for i in range(0, 8, 2)])
    assert torch.allclose(y, want, atol=1e-6)
    ref(x[0:2]), ref(x[4:6])
    assert torch.allclose(bn.running_mean, ref.running_mean) and torch.allclose(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 2


def _released_label_batches(dtype):
    """Three batches of 6 with labels from ReleasedBatchSampler (one-image identities, split groups)."""
    labels = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5, 5])
    cams = np.array([0, 1, 1, 0, 0, 1, 0, 0, 1, 2, 0, 1])
    s = ReleasedBatchSampler(labels, cams, batch_size=6, num_instances=3, num_batches=3, seed=5)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(6, 3, 32, 8, generator=g, dtype=dtype), torch.as_tensor(labels[b])) for b in s]
    assert any(len(set(y.tolist())) * 3 != 6 or min(np.bincount(y.numpy())[y.unique().numpy()]) != 3
               for _, y in batches)  # not all P x K aligned
    return batches


@pytest.mark.parametrize("bn_group", [0, 3])
def test_fast_step_same_math_with_released_batches_and_bn_groups(bn_group):
    """The fast step assumes nothing about P x K alignment: with batches of the released sampler and
    BN groups of 3 (student and teacher only; the Fuse over the whole batch, as nn.DataParallel wrapped
    only those) it equals the plain reference step in float64 (loss, every parameter and buffer)."""
    settings = StepSettings(bn_group=bn_group)
    a = _mean_teacher(torch.float64)
    b = copy.deepcopy(a)
    oa, ob = make_optimizer(a, 3.5e-4, 5e-4), make_optimizer(b, 3.5e-4, 5e-4)
    crit = Criteria(6, settings.label_smoothing)
    batches = _released_label_batches(torch.float64)
    ra = reference_step(a, oa, batches, 3, crit, settings)
    rb = fast_step(b, ob, batches, 3, crit, settings)
    assert abs(float(ra.loss) - float(rb.loss)) < 1e-9
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.allclose(sa[k].double(), sb[k].double(), atol=1e-9, rtol=1e-7), k
    # the teacher's BN counted one update per batch, the groups did not add any
    assert int(b.teacher.global_bn.num_batches_tracked) == int(_mean_teacher().teacher.global_bn.num_batches_tracked) + 3
    if bn_group:  # and the groups change the numbers
        c = copy.deepcopy(_mean_teacher(torch.float64))
        rc = fast_step(c, make_optimizer(c, 3.5e-4, 5e-4), batches, 3, crit, StepSettings())
        assert abs(float(rc.loss) - float(rb.loss)) > 1e-6


def test_pretrain_step_uses_bn_groups():
    """The source step with pretrain.bn_group = 4 on a batch of 8: the first BN's running mean moves by
    the mean of the first 4 rows of its input only."""
    cfg = tiny_cfg("pretrain.bn_group=4", "pretrain.adapt_target_bn=false")
    data = SourceData([], np.arange(4), [], ([], []), ([], []))
    tr = Pretrainer(cfg, data, DevicePolicy("cpu", amp=False))
    bn = next(m for m in tr.model.modules() if isinstance(m, nn.BatchNorm2d))  # the stem's BN
    seen = []
    bn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    rm0, mom = bn.running_mean.clone(), bn.momentum
    torch.manual_seed(0)
    tr.step(torch.randn(8, 3, 32, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), None)
    first = seen[0][:4].mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, (1 - mom) * rm0 + mom * first, atol=1e-6)
    assert not torch.allclose(bn.running_mean, (1 - mom) * rm0 + mom * seen[0].mean(dim=(0, 2, 3)), atol=1e-4)
    assert int(bn.num_batches_tracked) == 1


# ----------------------------------------------------------------------------------------- TF32
def test_tf32_switch_sets_and_restores_the_flags():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert apply_tf32("never") == {"matmul": False, "cudnn": False}
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert apply_tf32("allow") == {"matmul": True, "cudnn": True}
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_tf32("default")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (
            TORCH_TF32["matmul"], TORCH_TF32["cudnn"])
        with pytest.raises(ValueError):
            apply_tf32("half")
        # a CPU policy leaves the process-wide flags alone
        apply_tf32("allow")
        DevicePolicy.from_config(load_config("paper_duke2market", ["device=cpu"]))
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------------------- k-means centres
def _two_blobs(tmp_path):
    """Global features in two tight blobs around directions (1, 0, 0) and (0, 1, 0); parts random."""
    rng = np.random.default_rng(0)
    pids = np.repeat([0, 1], 20)
    dirs = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    glob = dirs[pids] + rng.normal(0, 0.05, (40, 3))
    arrays = {"global": glob, "upper": rng.normal(size=(40, 3)), "lower": rng.normal(size=(40, 3))}
    arrays = {k: (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32) for k, v in arrays.items()}
    (tmp_path / "feat").mkdir()
    np.savez(tmp_path / "feat" / "features.npz", pids=pids.astype(np.int64), camids=np.zeros(40, np.int64), **arrays)
    return arrays, pids


def test_classifier_init_centres(tmp_path):
    """K = 2 on two blobs: the centroids are the L2-normalised k-means centres (= the blob directions, to
    the noise), row k matches the images labelled k; the same centres a direct k-means fit gives."""
    from lf2core.cluster.labels import kmeans_labels
    from lf2core.stages.cluster import cluster

    arrays, pids = _two_blobs(tmp_path)
    over = ["cluster.method=kmeans", "cluster.num_clusters=2", "cluster.kmeans_init_size=40",
            "cluster.kmeans_batch_size=20", "cluster.kmeans_n_init=3"]
    cluster(load_config(None, over + ["cluster.classifier_init=centres"]), str(tmp_path / "feat"), str(tmp_path / "c"))
    cluster(load_config(None, over), str(tmp_path / "feat"), str(tmp_path / "m"))
    with np.load(tmp_path / "c" / "labels.npz") as z:
        cent, glob = z["centroids"], z["global"]
    assert cent.shape == (2, 3) and np.allclose(np.linalg.norm(cent, axis=1), 1, atol=1e-6)
    for k in (0, 1):
        d = np.array([1.0, 0, 0]) if pids[glob == k][0] == 0 else np.array([0, 1.0, 0])
        assert cent[k] @ d > 0.99
    lab, centres = kmeans_labels(arrays["global"], 2, seed=1, batch_size=20, n_init=3, init_size=40,
                                 return_centres=True)
    assert np.array_equal(lab, glob)
    assert np.allclose(cent, centres / np.linalg.norm(centres, axis=1, keepdims=True), atol=1e-6)
    with np.load(tmp_path / "m" / "labels.npz") as z:  # class means: other numbers, same labels here
        assert np.array_equal(z["global"], glob) and not np.allclose(z["centroids"], cent, atol=1e-7)


def test_centres_keep_empty_clusters(tmp_path, monkeypatch):
    """k-means cluster 1 of K = 3 left empty: centres keeps its row and the labels as numbered (G = 3);
    class_means drops it and renumbers (G = 2). labels.npz with more centroid rows than the largest label
    + 1 is read back (the trailing rows are empty clusters)."""
    import lf2core.stages.cluster as stage

    arrays, pids = _two_blobs(tmp_path)
    fixed = np.where(pids == 0, 0, 2).astype(np.int64)
    centres = np.array([[2.0, 0, 0], [0, 0, 3.0], [0, 4.0, 0]], np.float32)

    def fake(x, method, **kw):
        return (fixed.copy(), centres.copy()) if kw.get("return_centres") else fixed.copy()

    monkeypatch.setattr(stage, "pseudo_labels", fake)
    over = ["cluster.method=kmeans", "cluster.num_clusters=3"]
    stage.cluster(load_config(None, over + ["cluster.classifier_init=centres"]), str(tmp_path / "feat"),
                  str(tmp_path / "c"))
    stage.cluster(load_config(None, over), str(tmp_path / "feat"), str(tmp_path / "m"))
    c = read_labels(str(tmp_path / "c"), 40)
    assert c.num_classes == 3 and np.array_equal(c.sets["global"], fixed)
    assert np.allclose(c.centroids, [[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    m = read_labels(str(tmp_path / "m"), 40)
    assert m.num_classes == 2 and np.array_equal(m.sets["global"], np.where(pids == 0, 0, 1))
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in c.sets.items()}, centroids=c.centroids[:2])
    from lf2core.errors import DataError
    with pytest.raises(DataError, match="centroids"):
        read_labels(str(tmp_path / "bad.npz"), 40)


# ----------------------------------------------------------------------------------------- source checkpoint
def test_best_source_keeps_the_best_evaluated_weights():
    cfg = tiny_cfg("pretrain.source_checkpoint=best_source")
    tr = Pretrainer(cfg, SourceData([], np.arange(4), [], ([], []), ([], [])), DevicePolicy("cpu", amp=False))
    w = tr.model.classifier.weight
    with torch.no_grad():
        w.fill_(1.0)
    assert tr.consider_best(5, 0.30)
    with torch.no_grad():
        w.fill_(2.0)
    assert not tr.consider_best(10, 0.20) and not tr.consider_best(15, 0.30)  # lower, equal: kept epoch 5
    with torch.no_grad():
        w.fill_(3.0)
    state, epoch, m = tr.selected_state()
    assert (epoch, m) == (5, 0.30) and torch.all(state["classifier.weight"] == 1.0)
    tr.cfg = tiny_cfg()  # final: the current weights
    state, epoch, _ = tr.selected_state()
    assert torch.all(state["classifier.weight"] == 3.0)


def test_pretrain_stage_passes_the_best_source_checkpoint(tmp_path):
    """Same training, two choices: model.pt of ``final`` holds the last epoch, ``best_source`` the epoch
    with the highest source mAP of the history (evaluated every epoch); the training state carries the
    best weights, so a resumed run keeps them."""
    from lf2core.checkpoint import TrainingState, load_checkpoint
    from lf2core.stages.pretrain import pretrain_source

    data = make_tiny_data(tmp_path)
    over = ["pretrain.eval_every=1", "pretrain.sampler=released", "pretrain.bn_group=4"]
    res = {}
    for choice in ("final", "best_source"):
        cfg = tiny_cfg(*over, f"pretrain.source_checkpoint={choice}")
        res[choice] = pretrain_source(cfg, str(data), str(tmp_path / choice))
    hist = json.loads((tmp_path / "best_source" / "metrics.json").read_text())["history"]
    maps = [h["source_mAP"] for h in hist]
    best = int(np.argmax(maps)) + 1
    assert res["best_source"]["selected_epoch"] == best
    assert res["best_source"]["selected_source_mAP"] == pytest.approx(maps[best - 1])
    assert [h["loss"] for h in hist] == [h["loss"] for h in json.loads(
        (tmp_path / "final" / "metrics.json").read_text())["history"]]  # selection does not change training
    a = load_checkpoint(str(tmp_path / "final" / "model.pt"))["state_dict"]
    b = load_checkpoint(str(tmp_path / "best_source" / "model.pt"))["state_dict"]
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same == (best == len(hist))
    # resume: a trainer restored from the saved state holds the same best weights
    cfg = tiny_cfg(*over, "pretrain.source_checkpoint=best_source")
    from lf2core.stages.pretrain import _config_key, _source_data
    src = _source_data(cfg, str(data))
    t1 = Pretrainer(cfg, src, DevicePolicy("cpu", amp=False))
    state = TrainingState(str(tmp_path / "again"), "pretrain", _config_key(cfg))
    t1.train(state)
    t2 = Pretrainer(cfg, src, DevicePolicy("cpu", amp=False))
    assert t2.resume(state) == cfg.pretrain.epochs
    assert t2.best["epoch"] == t1.best["epoch"] == best
    assert all(torch.equal(t1.best["state_dict"][k], t2.best["state_dict"][k]) for k in t1.best["state_dict"])


# ----------------------------------------------------------------------------------------- a released round
def test_finetune_round_with_released_switches(tiny, tmp_path):  # noqa: F811
    from lf2core.stages.finetune import finetune

    tmp_, data, _, _ = tiny
    cfg = tiny_cfg("finetune.batch_size=8", "finetune.num_instances=4", "finetune.iters_per_epoch=2",
                   "finetune.epochs_per_round=1", "cluster.num_clusters=4", "finetune.sampler=released",
                   "finetune.bn_group=4", "finetune.erasing=released")
    res = finetune(cfg, str(data), str(tmp_ / "labels"), str(tmp_ / "pre"), str(tmp_path / "ft"))
    assert np.isfinite(res["loss"]) and res["num_classes"] == 4


# ----------------------------------------------------------------------------------------- resume, fewer GPUs
def test_rng_states_from_a_host_with_more_gpus(monkeypatch, caplog):
    """A state saved with 3 CUDA devices: on a host with 1, device 0's state is restored and devices 1, 2
    are skipped with a warning; with none, nothing CUDA is touched; the CPU generators are restored."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda st, device: calls.append((int(st[0]), device)))
    states = checkpoint.rng_states()
    states["cuda"] = [torch.full((4,), i, dtype=torch.uint8) for i in (7, 8, 9)]
    expected = torch.rand(3)
    torch.rand(5)
    with caplog.at_level(logging.WARNING, logger="lf2core.checkpoint"):
        checkpoint.set_rng_states(states, device_count=1)
    assert calls == [(7, 0)]
    assert torch.equal(torch.rand(3), expected)
    assert "3 device(s) saved, 1 present" in caplog.text and "skipped device(s) 1, 2" in caplog.text
    calls.clear()
    checkpoint.set_rng_states(states, device_count=4)  # more devices than saved: all saved ones restored
    assert calls == [(7, 0), (8, 1), (9, 2)]
    calls.clear()
    monkeypatch.setattr(checkpoint, "cuda_device_count", lambda: 0)  # this CPU machine, default count
    checkpoint.set_rng_states(states)
    assert calls == []
    del states["cuda"]
    checkpoint.set_rng_states(states, device_count=2)  # saved without CUDA: nothing to restore
    assert calls == []


def test_method_doc_names_every_switch():
    """docs/method.md, section 9: the table names every switch with its released value."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text()
    table = doc[doc.index("### The released behaviour, switch by switch"):doc.index("### Other switches")]
    rows = [ln for ln in table.splitlines() if ln.startswith("| **")]
    assert len(rows) == 7
    for key in RELEASED:
        if key in ("pretrain.eval_every", "finetune.random_erasing"):
            continue
        leaf = key.split(".")[-1]
        row = next((r for r in rows if f"`{key}`" in r or f"`{leaf}`" in r), None)
        assert row is not None, key
        assert str(RELEASED[key]).lower() in row.lower(), key
