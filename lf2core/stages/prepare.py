"""Stage prepare-data: parse (or generate) the source and target datasets and write the manifest.

``prepare_data(cfg, out)`` writes ``out/manifest.json`` (format in ``lf2core.stages``) and
``out/stats.json``, atomically through ``storage.output_dir``. For each side (``cfg.data.source`` /
``cfg.data.target``):

- ``name: synthetic``: the synthetic generator (``lf2core.data.synthetic.write_domain``) writes domain
  ``a`` (source) or ``b`` (target) with ``cfg.data.synth`` (seed + 0 for the source, + 1 for the target).
  With ``root: ""`` the data goes inside the output (``out/source``, ``out/target``) and the manifest
  records the relative root ``source`` / ``target``, so the output stays valid when moved or copied
  between pipeline steps. With a root, the data is generated there once: a root already holding a
  complete generation with the same parameters, generator version and statistics is reused; a non-empty
  root that lf2 did not generate is never overwritten (DataError).
- any other name: the real dataset at ``root`` (local path or s3:// URI) is parsed with
  ``lf2core.data.datasets.load``.

The target train split may be unlabelled (pid ``datasets.UNLABELLED``, ``folder`` format); the source
train split must not (DataError naming the source root and the number of unlabelled images).

Returns flat metrics: ``{side}_{split}_{images,ids,cameras}`` (ids do not count unlabelled images),
``{side}_{split}_unlabelled`` for a split holding unlabelled images and, when synthetic data is used,
``synthetic_generator_version``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .. import artifacts, storage
from ..config import Config
from ..data import datasets
from ..data.manifest import SIDES
from ..errors import DataError, StorageError
from .table import PREPARE, SYNTHETIC_DATA

log = logging.getLogger(__name__)

SYNTH_MARKER = "lf2_synthetic.json"
SYNTH_DOMAINS = {"source": "a", "target": "b"}


def _synth_params(cfg: Config, side: str, version: str) -> dict[str, Any]:
    s = cfg.data.synth
    return {
        "generator_version": version,
        "domain": SYNTH_DOMAINS[side],
        "ids": s.ids,
        "test_ids": s.test_ids,
        "seed": s.seed + (0 if side == "source" else 1),
        "height": s.height,
        "width": s.width,
    }


def _generate(params: dict[str, Any], local_dir: Path) -> datasets.Splits:
    """Run the generator into ``local_dir``, parse it and leave the marker file next to the data."""
    from ..data import synthetic

    kw = {k: v for k, v in params.items() if k not in ("generator_version", "domain")}
    log.info("generating synthetic domain %s (generator %s) into %s (%s)", params["domain"],
             params["generator_version"], local_dir, kw)
    synthetic.write_domain(params["domain"], str(local_dir), version=params["generator_version"], **kw)
    splits = datasets.load("market1501", str(local_dir))
    marker = {"params": params, "stats": splits.stats()}
    (local_dir / SYNTH_MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    return splits


def _non_empty(uri: str) -> bool:
    if storage.is_remote(uri):
        return storage.exists(uri)
    p = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
    return p.is_file() or (p.is_dir() and any(p.iterdir()))


def _reusable(root: str, params: dict[str, Any]) -> datasets.Splits | None:
    """The parsed generation at ``root`` if it is complete and matches ``params``, else None."""
    marker_uri = storage.join(root, SYNTH_MARKER)
    try:
        if not (storage.exists(marker_uri) and storage.is_complete(root)):
            return None
        recorded = json.loads(storage.read_bytes(marker_uri))
    except (StorageError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(recorded, dict) or recorded.get("params") != params:
        return None
    try:
        splits = datasets.load("market1501", root)
    except DataError:
        return None
    return splits if splits.stats() == recorded.get("stats") else None


def _synthetic_at_root(side: str, root: str, params: dict[str, Any]) -> tuple[datasets.Splits, bool]:
    """(splits, generated?) for a synthetic domain kept at a user-given root."""
    splits = _reusable(root, params)
    if splits is not None:
        log.info("reusing synthetic data at %s", root)
        return splits, False
    if _non_empty(root) and not storage.exists(storage.join(root, SYNTH_MARKER)):
        raise DataError(
            f"config key 'data.{side}.root': {root} is not empty and holds no lf2 synthetic data "
            f"({SYNTH_MARKER}); refusing to overwrite it - use an empty or new directory, or root \"\""
        )
    with storage.output_dir(root, SYNTHETIC_DATA) as tmp:
        _generate(params, Path(tmp))
    return datasets.load("market1501", root), True


def _check_role(side: str, splits: datasets.Splits) -> None:
    problems = datasets.role_problems(splits, side)
    if problems:
        raise DataError(f"{side} dataset {splits.root}: {problems[0]}")


def prepare_data(cfg: Config, out: str) -> dict[str, Any]:
    """Write ``out/manifest.json`` (+ ``out/stats.json`` and any data generated inside the output).

    Returns flat metrics ``{side}_{split}_{images,ids,cameras}`` (+ ``{side}_{split}_unlabelled``,
    ``synthetic_generator_version``).
    """
    if cfg.data.cache_dir:
        storage.set_cache_dir(cfg.data.cache_dir)
    metrics: dict[str, Any] = {}
    with storage.output_dir(str(out), PREPARE) as tmp:
        tmp = Path(tmp)
        loaded: dict[str, datasets.Splits] = {}
        for side in SIDES:
            dom = getattr(cfg.data, side)
            if dom.name == "synthetic":
                params = _synth_params(cfg, side, cfg.data.synth.version)
                metrics["synthetic_generator_version"] = cfg.data.synth.version
                if dom.root == "":
                    splits = _generate(params, tmp / side)
                    # recorded relative to the manifest's directory: valid wherever the output is moved
                    splits.root = side
                else:
                    splits, _ = _synthetic_at_root(side, dom.root, params)
                splits.name = "synthetic"
            else:
                if not dom.root:
                    raise DataError(f"config key 'data.{side}.root': empty; give the {dom.name} dataset's location")
                log.info("parsing %s dataset at %s", dom.name, dom.root)
                splits = datasets.load(dom.name, dom.root)
            _check_role(side, splits)
            loaded[side] = splits
            for split, st in splits.stats().items():
                metrics[f"{side}_{split}_images"] = st["images"]
                metrics[f"{side}_{split}_ids"] = st["identities"]
                metrics[f"{side}_{split}_cameras"] = st["cameras"]
                if "unlabelled" in st:
                    metrics[f"{side}_{split}_unlabelled"] = st["unlabelled"]
        artifacts.write_manifest(tmp, loaded["source"], loaded["target"])
        artifacts.write_json(tmp / artifacts.DATA_STATS, metrics, indent=1)
    log.info("prepare-data: manifest written to %s", out)
    return metrics
