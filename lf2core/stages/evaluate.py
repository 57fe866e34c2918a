"""Stage evaluate: rank metrics of a model on the TARGET query / gallery split.

``evaluate(cfg, data, model, out)``

- ``model``: a finetune output (``teacher.pt``: the teacher ``LF2Model``; its test feature is
  normalize(cat[f0, f1, .., fK]); for the ``mt_global`` baseline, recorded in the checkpoint, the global
  feature f0 alone: ``Variant.test_feature``; loaded with ``lf2core.artifacts.read_model``) or a pretrain output (``model.pt``, kind ``source``: the source-only baseline and the
  oracle, the L2-normalised BN feature); a checkpoint file path works too.
- features: test transform, original + horizontally flipped image summed and renormalised
  (``cfg.eval.flip``), batches of ``cfg.eval.batch_size``;
- ``lf2core.evaluation.evaluate_features`` (squared Euclidean, or k-reciprocal re-ranking with
  ``cfg.eval.rerank``); same-identity same-camera gallery entries are excluded.

Outputs: ``out/metrics.json`` ``{"mAP", "R1", "R5", "R10", "mINP"}`` (fractions) and ``out/ranklist.png``
(top-10 of 8 random queries). This is a REPORT on the test split; nothing in lf2 selects a model with it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from .. import artifacts, storage
from ..config import Config
from ..errors import DataError, Lf2Error
from ..features import RANK_METRICS, extract
from ..runtime import DevicePolicy
from .table import EVALUATE

log = logging.getLogger(__name__)

METRIC_KEYS = RANK_METRICS


def evaluate(cfg: Config, data: str, model: str, out: str) -> dict[str, Any]:
    """Evaluate ``model`` on the target query/gallery; write metrics.json and ranklist.png."""
    from ..data.loaders import test_loader
    from ..data.manifest import split
    from ..data.transforms import test_transform
    from ..evaluation import evaluate_features
    from ..plots import ranklist_png

    manifest = artifacts.read_manifest(data)
    query, gallery = split(manifest, "target_query"), split(manifest, "target_gallery")
    if not query or not gallery:
        raise DataError(f"{data}: the target query/gallery split is empty ({len(query)} / {len(gallery)} images)")
    net, fn, info = artifacts.read_model(cfg, model).eval_network()
    policy = DevicePolicy.from_config(cfg)
    policy.model(net)
    tf = test_transform(cfg.data.height, cfg.data.width)
    t0 = time.time()
    feats = []
    with torch.no_grad():
        for name, samples in (("query", query), ("gallery", gallery)):
            loader = test_loader(samples, tf, cfg.eval.batch_size, cfg.data.num_workers)
            feats.append(extract(fn, loader, policy.device, flip=cfg.eval.flip, amp=cfg.amp, desc=f"eval {name}"))
    q, g = feats
    r = evaluate_features(q["features"], g["features"], q["pids"], g["pids"], q["camids"], g["camids"],
                          rerank=cfg.eval.rerank, max_rank=cfg.eval.max_rank)
    metrics = {k: float(r[k]) for k in METRIC_KEYS}
    log.info("evaluate %s (%s): mAP %.1f%% R1 %.1f%% R5 %.1f%% R10 %.1f%% mINP %.1f%% (%.1fs)", model,
             info["variant"], 100 * metrics["mAP"], 100 * metrics["R1"], 100 * metrics["R5"], 100 * metrics["R10"],
             100 * metrics["mINP"], time.time() - t0)
    with storage.output_dir(out, EVALUATE) as tmp:
        artifacts.write_metrics(tmp, metrics)
        try:
            ranklist_png(str(Path(tmp) / artifacts.RANKLIST), [s.path for s in query], [s.path for s in gallery],
                         r["distmat"], q["pids"], g["pids"], q["camids"], g["camids"], seed=cfg.seed)
        except Lf2Error as e:  # a plot must not fail an evaluation (e.g. no query with a valid match)
            log.warning("%s not written: %s", artifacts.RANKLIST, e)
    return metrics
