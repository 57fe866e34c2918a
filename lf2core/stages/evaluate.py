"""Stage evaluate: rank metrics of a model on the TARGET query / gallery split.

``evaluate(cfg, data, model, out)``

- ``model``: a finetune output (``teacher.pt``: the teacher ``LF2Model``; its test feature is
  normalize(cat[f0, f1, .., fK]); for the ``mt_global`` baseline, recorded in the checkpoint, the global
  feature f0 alone) or a pretrain output (``model.pt``, kind ``source``: the source-only baseline and the
  oracle, the L2-normalised BN feature); a checkpoint file path works too.
- features: test transform, original + horizontally flipped image summed and renormalised
  (``cfg.eval.flip``), batches of ``cfg.eval.batch_size``;
- ``lf2core.evaluation.evaluate_features`` (squared Euclidean, or k-reciprocal re-ranking with
  ``cfg.eval.rerank``); same-identity same-camera gallery entries are excluded.

Outputs: ``out/metrics.json`` ``{"mAP", "R1", "R5", "R10", "mINP"}`` (fractions) and ``out/ranklist.png``
(top-10 of 8 random queries). This is a REPORT on the test split; nothing in lf2 selects a model with it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import storage
from ..checkpoint import load_checkpoint
from ..config import Config
from ..errors import CheckpointError, DataError, Lf2Error
from ..features import extract
from ..runtime import select_device

log = logging.getLogger(__name__)

METRIC_KEYS = ("mAP", "R1", "R5", "R10", "mINP")


def load_eval_network(cfg: Config, model: str) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], dict]:
    """(network in eval mode, feature function [B,3,H,W] -> [B,D], info) for a stage output or file."""
    from ..models import LF2Model, SourceModel

    m = str(model)
    if m.endswith((".pt", ".pth")):
        path = m
    elif storage.exists(storage.join(m, "teacher.pt")):
        path = storage.join(m, "teacher.pt")
    elif storage.exists(storage.join(m, "model.pt")):
        path = storage.join(m, "model.pt")
    else:
        raise CheckpointError(f"model {m}: neither a finetune output (teacher.pt) nor a pretrain output (model.pt)")
    ck = load_checkpoint(path)
    state = ck["state_dict"]
    mcfg = (ck.get("config") or {}).get("model", {})
    last_stride = int(ck.get("last_stride", mcfg.get("last_stride", cfg.model.last_stride)))
    if ck["kind"] == "source":
        n = int(ck.get("num_classes") or state["classifier.weight"].shape[0])
        net = SourceModel(ck["arch"], n, "none", last_stride)
        fn: Callable[[torch.Tensor], torch.Tensor] = net
        variant = "source"
    elif ck["kind"] == "lf2":
        if "classifier.weight" not in state:
            raise CheckpointError(f"checkpoint {path}: not a teacher LF2Model state dict (no classifier.weight)")
        net = LF2Model(
            ck["arch"], int(state["classifier.weight"].shape[0]),
            num_parts=int(ck.get("num_parts", mcfg.get("num_parts", cfg.model.num_parts))),
            reduction=int(ck.get("attention_reduction", mcfg.get("attention_reduction", cfg.model.attention_reduction))),
            weights="none", last_stride=last_stride,
        )
        variant = str(ck.get("variant", "lf2"))
        if variant == "mt_global":
            def fn(x: torch.Tensor, _net: LF2Model = net) -> torch.Tensor:  # type: ignore[misc]
                return F.normalize(_net.features(x).global_feat, dim=1)
        else:
            fn = net
    else:
        raise CheckpointError(f"checkpoint {path}: kind {ck['kind']!r} cannot be evaluated (expected source or lf2)")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: does not match its {ck['arch']} network: {e}") from None
    return net.eval(), fn, {"checkpoint": path, "kind": ck["kind"], "variant": variant, "arch": ck["arch"]}


def evaluate(cfg: Config, data: str, model: str, out: str) -> dict[str, Any]:
    """Evaluate ``model`` on the target query/gallery; write metrics.json and ranklist.png."""
    from ..data.loaders import test_loader
    from ..data.manifest import read_manifest, split
    from ..data.transforms import test_transform
    from ..evaluation import evaluate_features
    from ..plots import ranklist_png

    manifest = read_manifest(data)
    query, gallery = split(manifest, "target_query"), split(manifest, "target_gallery")
    if not query or not gallery:
        raise DataError(f"{data}: the target query/gallery split is empty ({len(query)} / {len(gallery)} images)")
    net, fn, info = load_eval_network(cfg, model)
    device = select_device(cfg.device)
    net.to(device)
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    tf = test_transform(cfg.data.height, cfg.data.width)
    t0 = time.time()
    feats = []
    with torch.no_grad():
        for name, samples in (("query", query), ("gallery", gallery)):
            loader = test_loader(samples, tf, cfg.eval.batch_size, cfg.data.num_workers)
            feats.append(extract(fn, loader, device, flip=cfg.eval.flip, amp=cfg.amp, desc=f"eval {name}"))
    q, g = feats
    r = evaluate_features(q["features"], g["features"], q["pids"], g["pids"], q["camids"], g["camids"],
                          rerank=cfg.eval.rerank, max_rank=cfg.eval.max_rank)
    metrics = {k: float(r[k]) for k in METRIC_KEYS}
    log.info("evaluate %s (%s): mAP %.1f%% R1 %.1f%% R5 %.1f%% R10 %.1f%% mINP %.1f%% (%.1fs)", model,
             info["variant"], 100 * metrics["mAP"], 100 * metrics["R1"], 100 * metrics["R5"], 100 * metrics["R10"],
             100 * metrics["mINP"], time.time() - t0)
    with storage.output_dir(out, "evaluate") as tmp:
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        try:
            ranklist_png(str(Path(tmp) / "ranklist.png"), [s.path for s in query], [s.path for s in gallery],
                         r["distmat"], q["pids"], g["pids"], q["camids"], g["camids"], seed=cfg.seed)
        except Lf2Error as e:  # a plot must not fail an evaluation (e.g. no query with a valid match)
            log.warning("ranklist.png not written: %s", e)
    return metrics
