"""A tiny world for the serving / export / search tests: synthetic target data (prepare-data output), a
teacher checkpoint (finetune-output layout, seeded random weights), its evaluate output, and the
reference embeddings computed the way ``evaluate`` computes them (``artifacts.read_model(..).eval_network`` +
``test_loader`` + ``features.extract`` with flip) -- independent of lf2core.serving."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

# cluster.eps=auto: on these few ids the demo's eps 0.6 can put every image in one cluster
TINY = [
    "cluster.eps=auto", "data.synth.ids=8", "data.synth.test_ids=6", "data.synth.height=64", "data.synth.width=32",
    "data.height=32", "data.width=16", "model.arch=resnet18_narrow", "model.weights=none", "eval.batch_size=64",
]


@dataclass
class World:
    root: Path
    cfg: object
    data: str  # prepare-data output
    model: str  # finetune-output layout (teacher.pt)
    metrics: str  # evaluate output
    query: list  # Samples
    gallery: list
    q_ref: np.ndarray  # evaluated embeddings (reference)
    g_ref: np.ndarray
    evaluated: dict  # metrics.json
    registered: Optional[str] = None  # models:/NAME@champion when registered


def evaluated_features(cfg, model: str, samples: list) -> np.ndarray:
    from lf2core.data.loaders import test_loader
    from lf2core.data.transforms import test_transform
    from lf2core.features import extract
    from lf2core.artifacts import read_model

    net, fn, _ = read_model(cfg, model).eval_network()
    loader = test_loader(samples, test_transform(cfg.data.height, cfg.data.width), 64, 0)
    return extract(fn, loader, "cpu", flip=True, amp=False)["features"]


def build(root: Path, seed: int = 1) -> World:
    from lf2core.checkpoint import save_checkpoint
    from lf2core.config import load_config
    from lf2core.artifacts import read_split
    from lf2core.models.lf2 import LF2Model
    from lf2core.stages.evaluate import evaluate
    from lf2core.stages.prepare import prepare_data

    cfg = load_config("demo", TINY)
    data, model, ev = root / "data", root / "ft", root / "eval"
    prepare_data(cfg, str(data))
    torch.manual_seed(seed)
    net = LF2Model(cfg.model.arch, num_classes=5, num_parts=cfg.model.num_parts).eval()
    model.mkdir(parents=True)
    save_checkpoint(str(model / "teacher.pt"), net, "lf2", cfg)
    evaluate(cfg, str(data), str(model), str(ev))
    query, gallery = read_split(str(data), "target_query"), read_split(str(data), "target_gallery")
    return World(root, cfg, str(data), str(model), str(ev), query, gallery,
                 evaluated_features(cfg, str(model), query), evaluated_features(cfg, str(model), gallery),
                 json.loads((ev / "metrics.json").read_text()))


def local_registry(root: Path):
    """A MonkeyPatch pointing MLflow (sqlite store + artifacts) and the lf2 cache into ``root``; undo it."""
    import pytest

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("LF2_MLFLOW_ARTIFACTS", str(root / "mlartifacts"))
    mp.setenv("LF2_CACHE_DIR", str(root / "cache"))
    mp.setenv("LF2_PROGRESS", "0")
    mp.delenv("LF2_TRACKING", raising=False)
    return mp


def register_champion(world: World, name: str) -> str:
    """Register the world's teacher in the current tracking store as ``name`` and promote it."""
    from lf2core import tracking
    from lf2core.config import load_config
    from lf2core.stages.register import register

    cfg = load_config("demo", TINY + [f"tracking.registered_model={name}", "tracking.experiment=serving"])
    out = register(cfg, world.model, world.metrics)
    assert tracking.promote(version=out["version"], model_name=name).promoted
    world.registered = f"models:/{name}@champion"
    return world.registered
