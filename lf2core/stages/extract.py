"""Stage extract-features: the fusion features of one split (the clustering input of a round).

``extract_features(cfg, data, model, out, split="target_train")``

- ``model``: a pretrain output (``model.pt``, kind ``source``: the round-0 student/teacher are built
  from it with ``build_target_model`` -- seeded, so identical to what finetune round 0 builds) or a
  finetune output (``student.pt`` + ``teacher.pt``, kind ``lf2``).
- features: the K+1 FUSION features φ0..φK = Fuse(teacher feature map, student part attention), all
  modules in eval mode, test transform, each output summed with that of the horizontally flipped image
  and L2-normalised (the released code's clustering features).
- ``out/features.npz``: float32 ``global``, ``upper``, ``lower`` [N, C] (for K=2; ``global``,
  ``part1``..``partK`` otherwise), int64 ``pids``, ``camids`` [N] (ground truth as in the manifest;
  -1 where unknown), rows in manifest order. ``out/meta.json``: split, model kind, shapes, timing.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from .. import artifacts, storage
from ..artifacts import feature_names  # noqa: F401  (the names of features.npz, defined with the file)
from ..config import Config
from ..errors import DataError
from ..features import extract
from ..distributed import Dist, device_policy, setup
from .table import EXTRACT

log = logging.getLogger(__name__)


def extract_features(cfg: Config, data: str, model: str, out: str, split: str = "target_train"
                     ) -> Optional[dict[str, Any]]:
    """Write ``out/features.npz`` (+ ``meta.json``) for ``split``; return counts and throughput.

    Started by torchrun (``WORLD_SIZE`` > 1): every rank extracts its contiguous shard of the split
    (``Dist.shard``), rank 0 gathers the shards in rank order (= manifest order) and writes; the other
    ranks return None."""
    d = setup(cfg, EXTRACT)
    with d.guard("extract"):
        return _extract_features(cfg, data, model, out, split, d)


def _extract_features(cfg: Config, data: str, model: str, out: str, split: str, d: Dist) -> Optional[dict[str, Any]]:
    from ..data.loaders import test_loader
    from ..data.transforms import test_transform

    samples = artifacts.read_split(data, split)
    if not samples:
        raise DataError(f"{data}: split '{split}' is empty")
    source = artifacts.read_model(cfg, model)
    kind = source.kind
    policy = device_policy(cfg, d)
    device = policy.device
    mt = policy.model(source.mean_teacher()).eval()
    names = feature_names(mt.student.num_parts)
    lo, hi = d.shard(len(samples))
    if hi <= lo:
        raise DataError(f"{data}: split '{split}' has {len(samples)} images, fewer than WORLD_SIZE={d.world_size}")
    loader = test_loader(samples[lo:hi], test_transform(cfg.data.height, cfg.data.width), cfg.eval.batch_size,
                         cfg.data.num_workers)
    t0 = time.time()
    part = extract(mt.fusion_features, loader, device, flip=True, amp=cfg.amp, names=names,
                   desc=f"extract {split}")
    gathered = d.gather_rows(part)
    secs = time.time() - t0
    if gathered is None:  # not rank 0
        d.barrier("features written by rank 0")
        return None
    feats = gathered
    n = len(samples)
    if len(feats["pids"]) != n:
        raise DataError(f"{data}: extracted {len(feats['pids'])} rows for {n} images of '{split}'")
    meta = {
        "split": split,
        "model": str(model),
        "model_kind": kind,
        "features": names,
        "images": n,
        "dim": int(feats[names[0]].shape[1]),
        "seconds": round(secs, 3),
        "images_per_s": round(n / max(secs, 1e-9), 1),
        "device": str(device),
    }
    with storage.output_dir(out, EXTRACT) as tmp:
        artifacts.write_features(tmp, artifacts.Features({k: feats[k] for k in names}, feats["pids"], feats["camids"]),
                                 meta)
    log.info("extracted %d x %d fusion features of %s (%s model) in %.1fs (%.0f img/s)", n, meta["dim"], split,
             kind, secs, meta["images_per_s"])
    d.barrier("features written by rank 0")
    return {"images": n, "dim": meta["dim"], "seconds": meta["seconds"], "images_per_s": meta["images_per_s"]}
