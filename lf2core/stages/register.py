"""Stage ``register``: log the final teacher to MLflow as a PyTorch model and register it.

``register(cfg, model, metrics, run_id=None)``

- ``model``: a finetune output (directory holding ``teacher.pt``) or an lf2 checkpoint file (kind ``lf2``),
  local path or s3:// URI;
- ``metrics``: an evaluate output (directory holding ``metrics.json``) or the JSON file itself;
- ``run_id``: the pipeline's MLflow run to log into (default: a new run).

The logged model is the eval-mode ``LF2Model``: input float32 ``[B, 3, H, W]`` (normalised image),
output the L2-normalised test feature ``[B, (K+1) * C]``. Its signature and an input example are stored
with it, ``lf2core`` is bundled as code so ``mlflow.pytorch.load_model`` works without installing lf2.
The version is tagged (recipe, source/target data, checkpoint, ``metric.<name>`` for every evaluation
figure) and the alias ``candidate`` points at it; ``lf2 promote`` decides about ``champion``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .. import artifacts, tracking
from ..config import Config
from ..errors import CheckpointError, DataError
from ..features import RANK_METRICS
from ..variants import get_variant

log = logging.getLogger(__name__)


class EvalFeatureModel(torch.nn.Module):
    """The evaluated network as one module: ``[B, 3, H, W]`` -> L2-normalised feature ``[B, D]``
    (``Variant.test_feature`` of ``variant``: what ``evaluate`` measures)."""

    def __init__(self, net: torch.nn.Module, variant: str) -> None:
        super().__init__()
        self.net = net
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return get_variant(self.variant, trainable=False).test_feature(self.net, x)


def load_eval_model(cfg: Config, model_uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The teacher of a finetune output as the eval-mode module ``evaluate`` measured (CPU) + info."""
    net, _, info = artifacts.read_model(cfg, model_uri).eval_network()
    if info["kind"] != "lf2":
        raise CheckpointError(f"checkpoint {info['checkpoint']}: kind {info['kind']!r}, register expects an "
                              f"'lf2' teacher (a finetune output)")
    return EvalFeatureModel(net.cpu(), info["variant"]).eval(), info


RETRIEVAL_METRICS = RANK_METRICS  # fractions; the promotion gate compares mAP


def read_metrics(metrics_uri: str) -> dict[str, Any]:
    """An evaluate output's metrics (``artifacts.read_metrics``), validated: ``mAP`` present and every
    retrieval metric a number in [0, 1] (a bad file must not move the ``candidate`` alias); DataError
    naming the file and key."""
    data = artifacts.read_metrics(metrics_uri)
    path = artifacts.locate(metrics_uri, artifacts.METRICS)
    for key in RETRIEVAL_METRICS:
        v = data.get(key)
        if key == "mAP" and v is None:
            raise DataError(f"{path}: no 'mAP' (an evaluate output holds mAP, R1, R5, R10, mINP)")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0):
            raise DataError(f"{path}: metric '{key}' must be a number in [0, 1], got {v!r}")
    return data


def register(cfg: Config, model: str, metrics: str, run_id: Optional[str] = None) -> dict[str, Any]:
    """Log + register the teacher; returns ``{"registered", "name", "version", "model_uri", "mAP", ...}``."""
    scores = read_metrics(metrics)
    net, info = load_eval_model(cfg, model)
    h, w = cfg.data.height, cfg.data.width
    example = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
    tags: dict[str, Any] = {
        "lf2.recipe": cfg.recipe,
        "lf2.source": f"{cfg.data.source.name}:{cfg.data.source.root}",
        "lf2.target": f"{cfg.data.target.name}:{cfg.data.target.root}",
        "lf2.arch": info["arch"],
        "lf2.variant": info["variant"],
        "lf2.checkpoint": info["checkpoint"],
        "lf2.input": f"float32[B,3,{h},{w}] normalised RGB",
    }
    if "synthetic" in (cfg.data.source.name, cfg.data.target.name):
        try:
            from ..data.synthetic import GENERATOR_VERSION

            tags["lf2.synthetic_generator"] = GENERATOR_VERSION
        except ImportError:  # pragma: no cover - data package not installed
            pass
    for k, v in tracking.flatten_metrics(scores).items():
        tags[f"metric.{k}"] = f"{v:.6g}"
    pkg = Path(__file__).resolve().parent.parent
    reqs = [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pyyaml", "scipy"]
    try:
        import torchvision

        reqs.append(f"torchvision=={torchvision.__version__.split('+')[0]}")
    except ImportError:  # pragma: no cover
        pass
    info = tracking.log_and_register_model(
        net, example, cfg=cfg, run_id=run_id or None, tags=tags, code_paths=[str(pkg)], pip_requirements=reqs,
    )
    out: dict[str, Any] = {"registered": info is not None, "mAP": scores.get("mAP")}
    if info is not None:
        out.update(info)
        log.info("registered %s version %s (alias %s)", info["name"], info["version"], info["alias"])
    else:
        log.info("tracking disabled (LF2_TRACKING=off): model not registered")
    return out
