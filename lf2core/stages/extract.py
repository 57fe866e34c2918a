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
from typing import Any

from .. import artifacts, storage
from ..artifacts import feature_names  # noqa: F401  (the names of features.npz, defined with the file)
from ..config import Config
from ..errors import DataError
from ..features import extract
from ..runtime import DevicePolicy
from .table import EXTRACT

log = logging.getLogger(__name__)


def extract_features(cfg: Config, data: str, model: str, out: str, split: str = "target_train") -> dict[str, Any]:
    """Write ``out/features.npz`` (+ ``meta.json``) for ``split``; return counts and throughput."""
    from ..data.loaders import test_loader
    from ..data.transforms import test_transform

    samples = artifacts.read_split(data, split)
    if not samples:
        raise DataError(f"{data}: split '{split}' is empty")
    source = artifacts.read_model(cfg, model)
    kind = source.kind
    policy = DevicePolicy.from_config(cfg)
    device = policy.device
    mt = policy.model(source.mean_teacher()).eval()
    names = feature_names(mt.student.num_parts)
    loader = test_loader(samples, test_transform(cfg.data.height, cfg.data.width), cfg.eval.batch_size,
                         cfg.data.num_workers)
    t0 = time.time()
    feats = extract(mt.fusion_features, loader, device, flip=True, amp=cfg.amp, names=names,
                    desc=f"extract {split}")
    secs = time.time() - t0
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
    return {"images": n, "dim": meta["dim"], "seconds": meta["seconds"], "images_per_s": meta["images_per_s"]}
