"""Stage ``register``: log the final teacher to MLflow as a pyfunc that takes images and register it.

``register(cfg, model, metrics, run_id=None)``

- ``model``: a finetune output (directory holding ``teacher.pt``) or an lf2 checkpoint file (kind ``lf2``),
  local path or s3:// URI;
- ``metrics``: an evaluate output (directory holding ``metrics.json``) or the JSON file itself;
- ``run_id``: the pipeline's MLflow run to log into (default: a new run).

The logged model is an MLflow pyfunc (``lf2core.serving.pyfunc``): input a batch of images (column
``image``: encoded JPEG/PNG bytes, or uint8 H x W x 3 arrays), preprocessing inside (the recipe's test
transform at ``data.height`` x ``data.width``), output the teacher's L2-normalised, flip-averaged test
embedding ``[B, (K+1) * C]`` -- what ``evaluate`` measures. Its signature and an input example are stored
with it, ``lf2core`` is bundled as code so ``mlflow.pyfunc.load_model`` and ``mlflow models serve``
work without installing lf2 (docs/serving.md).
The version is tagged (lineage: ``lf2core.tracking.lineage``, checkpoint URI, ``metric.<name>`` for every
evaluation figure) and the alias ``candidate`` points at it; ``lf2 promote`` decides about ``champion``.
The logged model (MLflow 3 ``LoggedModel``) carries the final evaluation as its metrics
(``summary/target_*``, linked by model id), not the run's metrics of the moment it was logged.
"""

from __future__ import annotations

import io
import logging
import tempfile
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


def example_image(height: int, width: int) -> bytes:
    """A PNG of ``height`` x ``width`` seeded noise: the input example stored with the model."""
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def register(cfg: Config, model: str, metrics: str, run_id: Optional[str] = None) -> dict[str, Any]:
    """Log + register the teacher; returns ``{"registered", "name", "version", "model_uri", "mAP", ...}``."""
    scores = read_metrics(metrics)
    net, info = load_eval_model(cfg, model)
    h, w = cfg.data.height, cfg.data.width
    from ..tracking import catalog, lineage

    tags: dict[str, Any] = {
        **lineage.lineage_tags(cfg),
        "lf2.arch": info["arch"],
        "lf2.variant": info["variant"],
        "lf2.checkpoint": lineage.as_uri(model),
        "lf2.input": f"images (encoded JPEG/PNG or uint8 HxWx3 RGB), resized to {h}x{w} inside",
    }
    if "synthetic" in (cfg.data.source.name, cfg.data.target.name):
        tags["lf2.synthetic_generator"] = cfg.data.synth.version
    for k, v in tracking.flatten_metrics(scores).items():
        tags[f"metric.{k}"] = f"{v:.6g}"
    pkg = Path(__file__).resolve().parent.parent
    reqs = [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pyyaml", "scipy", "pillow"]
    try:
        import torchvision

        reqs.append(f"torchvision=={torchvision.__version__.split('+')[0]}")
    except ImportError:  # pragma: no cover
        pass
    from ..serving.embedder import write_model_dir

    with torch.no_grad():
        dim = int(net(torch.zeros(1, 3, h, w)).shape[1])
    with tempfile.TemporaryDirectory(prefix="lf2-pyfunc-") as tmp:
        write_model_dir(Path(tmp) / "lf2", model, cfg)
        info = tracking.log_and_register_pyfunc(
            "lf2core.serving.pyfunc", str(Path(tmp) / "lf2"), [example_image(h, w)], dim, cfg=cfg,
            run_id=run_id or None, tags=tags, code_paths=[str(pkg)], pip_requirements=reqs,
            model_metrics=catalog.design({f"summary/target_{k}": v for k, v in scores.items()
                                          if k in catalog.RETRIEVAL}),
            model_metrics_step=cfg.finetune.rounds,
        )
    out: dict[str, Any] = {"registered": info is not None, "mAP": scores.get("mAP")}
    if info is not None:
        out.update(info)
        log.info("registered %s version %s (alias %s)", info["name"], info["version"], info["alias"])
    else:
        log.info("tracking disabled (LF2_TRACKING=off): model not registered")
    return out
