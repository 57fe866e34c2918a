"""features.extract and stage extract-features against per-image references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lf2core.checkpoint import save_checkpoint
from lf2core.data.loaders import load_image
from lf2core.data.manifest import read_manifest, split
from lf2core.data.transforms import test_transform as make_test_transform
from lf2core.errors import CheckpointError
from lf2core.features import extract
from lf2core.artifacts import write_mean_teacher
from lf2core.models import SourceModel, build_target_model
from lf2core.stages.extract import extract_features, feature_names
from test_pretrain import make_tiny_data, tiny_cfg


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def test_extract_flip_sum_normalise_and_order():
    torch.manual_seed(0)
    imgs = torch.randn(7, 3, 4, 2)
    w = torch.randn(3 * 4 * 2, 5)

    def fn(x):  # a non-flip-invariant "model" with two outputs
        return [x.flatten(1) @ w, x.flatten(1)[:, :3] * 2]

    # batches out of index order: extract must return rows in index order
    order = [[4, 0, 6], [2, 5], [1, 3]]
    batches = [(imgs[i], torch.tensor(i) * 10, torch.tensor(i) % 2, torch.tensor(i)) for i in order]
    got = extract(fn, batches, "cpu", flip=True, names=["a", "b"])
    ref_a = F.normalize(fn(imgs)[0] + fn(torch.flip(imgs, dims=[3]))[0], dim=1)
    ref_b = F.normalize(fn(imgs)[1] + fn(torch.flip(imgs, dims=[3]))[1], dim=1)
    assert np.allclose(got["a"], ref_a.numpy(), atol=1e-5) and np.allclose(got["b"], ref_b.numpy(), atol=1e-5)
    assert got["pids"].tolist() == [10 * i for i in range(7)] and got["camids"].tolist() == [i % 2 for i in range(7)]
    assert got["a"].dtype == np.float32 and got["pids"].dtype == np.int64
    nf = extract(lambda x: x.flatten(1) @ w, batches, "cpu", flip=False)
    assert np.allclose(nf["features"], F.normalize(imgs.flatten(1) @ w, dim=1).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    data = make_tiny_data(tmp)
    cfg = tiny_cfg("eval.batch_size=5")  # several batches, last one partial
    torch.manual_seed(3)
    src = SourceModel("resnet18_narrow", 6)
    src.train()(torch.randn(8, 3, 32, 16))  # non-trivial BN statistics
    save_checkpoint(str(tmp / "pre" / "model.pt"), src, "source", cfg)
    return tmp, data, cfg


def reference(mt, samples, cfg) -> list[np.ndarray]:
    tf = make_test_transform(cfg.data.height, cfg.data.width)
    x = torch.stack([tf(load_image(s.path)) for s in samples])
    mt.eval()
    with torch.no_grad():
        a, b = mt.fusion_features(x), mt.fusion_features(torch.flip(x, dims=[3]))
    return [F.normalize(u + v, dim=1).numpy() for u, v in zip(a, b)]


def test_extract_stage_from_pretrain_output(tiny):
    tmp, data, cfg = tiny
    res = extract_features(cfg, str(data), str(tmp / "pre"), str(tmp / "feat0"))
    samples = split(read_manifest(str(data)), "target_train")
    z = np.load(tmp / "feat0" / "features.npz")
    assert sorted(z.files) == ["camids", "global", "lower", "pids", "upper"]
    assert res["images"] == len(samples) == 24 and res["dim"] == 256
    for name in ("global", "upper", "lower"):
        assert z[name].shape == (24, 256) and z[name].dtype == np.float32
        assert np.allclose(np.linalg.norm(z[name], axis=1), 1, atol=1e-5)
    assert z["pids"].tolist() == [s.pid for s in samples] and z["camids"].tolist() == [s.camid for s in samples]
    mt = build_target_model(cfg, torch.load(tmp / "pre" / "model.pt", weights_only=True))
    for got, ref in zip([z["global"], z["upper"], z["lower"]], reference(mt, samples, cfg)):
        assert np.allclose(got, ref, atol=1e-4)
    meta = json.loads((tmp / "feat0" / "meta.json").read_text())
    assert meta["model_kind"] == "source" and meta["split"] == "target_train"
    # the part features are not copies of the global one (attention differs per part)
    assert not np.allclose(z["upper"], z["global"], atol=1e-3)


def test_extract_stage_from_finetune_output(tiny):
    tmp, data, cfg = tiny
    mt = build_target_model(cfg, torch.load(tmp / "pre" / "model.pt", weights_only=True))
    mt.reset_classifier(torch.randn(4, 256))
    with torch.no_grad():
        for p in mt.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    mt.update_teacher(5)
    mt.train()
    with torch.no_grad():  # move teacher/fuse BN running stats
        mt.fusion_features(torch.randn(8, 3, 32, 16))
    write_mean_teacher(str(tmp / "ft"), mt, cfg)
    extract_features(cfg, str(data), str(tmp / "ft"), str(tmp / "feat1"), split="target_query")
    samples = split(read_manifest(str(data)), "target_query")
    z = np.load(tmp / "feat1" / "features.npz")
    for got, ref in zip([z["global"], z["upper"], z["lower"]], reference(mt, samples, cfg)):
        assert np.allclose(got, ref, atol=1e-4)
    assert json.loads((tmp / "feat1" / "meta.json").read_text())["model_kind"] == "lf2"


def test_extract_stage_errors(tiny):
    tmp, data, cfg = tiny
    (tmp / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        extract_features(cfg, str(data), str(tmp / "empty"), str(tmp / "x"))
    assert not (tmp / "x").exists()
    assert feature_names(3) == ["global", "part1", "part2", "part3"]
