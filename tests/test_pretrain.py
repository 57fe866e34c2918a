"""Stage pretrain-source on a tiny generated two-domain dataset: outputs, schedule, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lf2core.checkpoint import TrainingState, load_checkpoint
from lf2core.config import load_config
from lf2core.data.datasets import Sample, Splits
from lf2core.data.manifest import write_manifest
from lf2core.stages.pretrain import lr_factor, pretrain_source, work_dir


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _write_domain(root: Path, ids: int, test_ids: int, shift: float, seed: int) -> Splits:
    """Tiny Market-like domain: each identity a colour pair (top/bottom halves), 2 cameras, noise."""
    rng = np.random.default_rng(seed)
    lists: dict[str, list[Sample]] = {"train": [], "query": [], "gallery": []}
    for split, pids, per_cam in (("train", range(1, ids + 1), 2), ("test", range(100, 100 + test_ids), 2)):
        for pid in pids:
            top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            for cam in range(2):
                for k in range(per_cam):
                    img = np.zeros((32, 16, 3), np.float32)
                    img[:16], img[16:] = top, bottom
                    img = img * (1 - shift) + shift * 128 + rng.normal(0, 12, img.shape)
                    name = f"{pid:04d}_c{cam + 1}s1_{k:06d}_00.jpg"
                    sub = "bounding_box_train" if split == "train" else ("query" if k == 0 else "bounding_box_test")
                    path = root / sub / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
                    which = split if split == "train" else ("query" if k == 0 else "gallery")
                    lists[which].append(Sample(str(path), pid, cam))
    return Splits(lists["train"], lists["query"], lists["gallery"], name="market1501", root=str(root),
                  local_root=str(root))


def make_tiny_data(tmp: Path) -> Path:
    """A prepare-data-like output (manifest.json) with source (shift 0) and target (shift 0.4) domains."""
    src = _write_domain(tmp / "src", ids=6, test_ids=4, shift=0.0, seed=0)
    tgt = _write_domain(tmp / "tgt", ids=6, test_ids=4, shift=0.4, seed=1)
    out = tmp / "data"
    write_manifest(out, src, tgt)
    return out


TINY_OVERRIDES = [
    "model.arch=resnet18_narrow", "model.weights=none", "data.height=32", "data.width=16",
    "data.num_workers=0", "pretrain.epochs=3", "pretrain.iters_per_epoch=2", "pretrain.batch_size=8",
    "pretrain.num_instances=2", "pretrain.lr=0.00035", "pretrain.warmup_epochs=1", "pretrain.milestones=[2]",
    "pretrain.eval_every=2", "eval.batch_size=32", "device=cpu",
]


def tiny_cfg(*extra: str):
    return load_config("demo", [*TINY_OVERRIDES, *extra])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny"))


def test_lr_factor_warmup_multistep():
    # paper: warmup 10 epochs from 0.01, x0.1 at 40 and 70
    assert lr_factor(0, 10, 0.01, [40, 70], 0.1) == pytest.approx(0.01)
    assert lr_factor(5, 10, 0.01, [40, 70], 0.1) == pytest.approx(0.01 * 0.5 + 0.5)
    assert lr_factor(10, 10, 0.01, [40, 70], 0.1) == pytest.approx(1.0)
    assert lr_factor(39, 10, 0.01, [40, 70], 0.1) == pytest.approx(1.0)
    assert lr_factor(40, 10, 0.01, [40, 70], 0.1) == pytest.approx(0.1)
    assert lr_factor(79, 10, 0.01, [40, 70], 0.1) == pytest.approx(0.01)


class Interrupt(Exception):
    pass


_REAL_SAVE = TrainingState.save


def saved_epochs(monkeypatch, crash_after=None) -> list[int]:
    """Record the epochs whose resumable state the run saves; with ``crash_after``, raise Interrupt just
    after the state of that epoch is written (a run killed between epochs)."""
    epochs: list[int] = []
    real = _REAL_SAVE

    def save(self, model, optimizer, scheduler, epoch, **extra):
        real(self, model, optimizer, scheduler, epoch, **extra)
        epochs.append(epoch)
        if epoch == crash_after:
            raise Interrupt()

    monkeypatch.setattr(TrainingState, "save", save)
    return epochs


def test_pretrain_outputs_and_exact_resume(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_cfg()
    seen_a = saved_epochs(monkeypatch)
    out_a = tmp_path / "a"
    res_a = pretrain_source(cfg, str(tiny_data), str(out_a))

    # outputs: checkpoint + metrics; no training state left behind
    ck = load_checkpoint(str(out_a / "model.pt"), kind="source")
    assert ck["arch"] == "resnet18_narrow" and ck["num_classes"] == 6
    assert ck["config"]["pretrain"]["epochs"] == 3
    metrics = json.loads((out_a / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert "source_mAP" in metrics["history"][1] and "source_mAP" not in metrics["history"][0]  # eval_every=2
    assert "source_mAP" in metrics["history"][2]  # and after the last epoch
    assert 0.0 <= res_a["target_mAP"] <= 1.0 and 0.0 <= res_a["source_mAP"] <= 1.0
    lrs = [h["lr"] for h in metrics["history"]]
    assert lrs == pytest.approx([3.5e-4 * 0.01, 3.5e-4, 3.5e-5])  # warmup 1 epoch, x0.1 at epoch 2
    assert seen_a == [1, 2, 3]  # the state is saved after every epoch
    assert not Path(work_dir(str(out_a))).exists()
    assert (out_a / "_COMPLETE").exists()

    # interrupted just after the state of epoch 1 is saved, then resumed
    out_b = tmp_path / "b"
    saved_epochs(monkeypatch, crash_after=1)
    with pytest.raises(Interrupt):
        pretrain_source(cfg, str(tiny_data), str(out_b))
    assert not out_b.exists() and (Path(work_dir(str(out_b))) / "state.pt").exists()
    seen_b = saved_epochs(monkeypatch)
    pretrain_source(cfg, str(tiny_data), str(out_b))
    assert seen_b == [2, 3]  # continued after epoch 1
    sa = load_checkpoint(str(out_a / "model.pt"))["state_dict"]
    sb = load_checkpoint(str(out_b / "model.pt"))["state_dict"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "resumed run differs from the uninterrupted one"
    hb = json.loads((out_b / "metrics.json").read_text())["history"]
    assert [h["loss"] for h in hb] == [h["loss"] for h in metrics["history"]]


def test_resume_ignores_state_of_another_config(tiny_data, tmp_path, caplog, monkeypatch):
    out = tmp_path / "c"
    cfg1 = tiny_cfg("pretrain.epochs=1", "pretrain.eval_every=0", "pretrain.adapt_target_bn=false")
    saved_epochs(monkeypatch, crash_after=1)
    with pytest.raises(Interrupt):
        pretrain_source(cfg1, str(tiny_data), str(out))
    cfg2 = tiny_cfg("pretrain.epochs=1", "pretrain.eval_every=0", "pretrain.lr=0.001",
                    "pretrain.adapt_target_bn=false")
    steps = saved_epochs(monkeypatch)
    with caplog.at_level("WARNING"):
        pretrain_source(cfg2, str(tiny_data), str(out))
    assert "another config" in caplog.text and steps == [1]  # epoch 1 trained again, from scratch
