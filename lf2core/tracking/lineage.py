"""Lineage of a run: which code, image, recipe and data made it, as run tags and MLflow dataset inputs.

Tags (``lineage_tags``): ``lf2.version``, ``lf2.git_commit`` (``$LF2_GIT_COMMIT``, else the commit of the
lf2 checkout, else "unknown"), ``lf2.image`` (``$LF2_IMAGE``: the image the components run in, "" when
not in one), ``lf2.recipe``, ``lf2.source.name`` / ``lf2.source.uri`` and ``lf2.target.name`` /
``lf2.target.uri``, ``lf2.data`` (the prepare-data output's manifest URI), ``lf2.source_model`` (the
pretrain output's URI) and ``lf2.source_model.digest``. Locations are URIs (``s3://...``, or ``file://``
for a local path); synthetic data is named by its generator settings, not by a directory.

Dataset inputs (``log_datasets``): one per domain and role (source train = ``training``, target train =
``training`` (unlabelled use), target query+gallery = ``evaluation``), each with the SHA-256 digest of its
manifest rows and a profile (images, identities, cameras).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from .store import client, enabled, mask


def as_uri(location: str) -> str:
    """``location`` as a URI: remote ones unchanged, a local path as ``file://<absolute path>``."""
    location = str(location)
    if "://" in location:
        return mask(location)
    return Path(location).resolve().as_uri()


_IMAGE_SHA = re.compile(r":[^:/]+-(?P<sha>[0-9a-f]{7,40})(-gpu)?$")  # lf2:<version>-<sha>[-gpu]


def git_commit() -> str:
    """``$LF2_GIT_COMMIT``, else the lf2 checkout's commit (``-dirty`` with uncommitted changes), else the
    commit in the image tag ``$LF2_IMAGE`` (``lf2:<version>-<sha>``, what ``make images`` builds: inside
    an image there is no ``.git``), else ``unknown``."""
    env = os.environ.get("LF2_GIT_COMMIT", "").strip()
    if env:
        return env
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        m = _IMAGE_SHA.search(os.environ.get("LF2_IMAGE", ""))
        return m["sha"] if m else "unknown"
    try:
        r = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    sha = r.stdout.strip() if r.returncode == 0 else ""
    if sha:
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    return "unknown"


def _domain_uri(domain: Any, side: str, data_uri: str) -> str:
    if domain.name == "synthetic" and not domain.root:
        return f"{data_uri}#{side}"  # generated inside the prepare-data output
    return as_uri(domain.root) if domain.root else ""


def _domain_name(cfg: Any, side: str) -> str:
    d = getattr(cfg.data, side)
    if d.name != "synthetic":
        return d.name
    style = "a" if side == "source" else "b"
    s = cfg.data.synth
    return f"synthetic-{style} (ids {s.ids}, test ids {s.test_ids}, seed {s.seed})"


def lineage_tags(cfg: Any, data: str = "", source_model: str = "") -> dict[str, str]:
    """The lineage tags of a run (see the module docstring); ``data`` / ``source_model``: the locations of
    the prepare-data and pretrain outputs ("" when not known yet)."""
    from .. import __version__

    data_uri = as_uri(data) if data else ""
    tags = {"lf2.version": __version__, "lf2.git_commit": git_commit(),
            "lf2.image": os.environ.get("LF2_IMAGE", ""), "lf2.recipe": str(cfg.recipe)}
    for side in ("source", "target"):
        tags[f"lf2.{side}.name"] = _domain_name(cfg, side)
        tags[f"lf2.{side}.uri"] = _domain_uri(getattr(cfg.data, side), side, data_uri + "/manifest.json"
                                              if data_uri else "prepare-data output")
    if data_uri:
        tags["lf2.data"] = data_uri + "/manifest.json"
    if source_model:
        tags["lf2.source_model"] = as_uri(source_model)
    return tags


def model_digest(location: str) -> str:
    """16 hex digits of SHA-256 over the model files of a pretrain/finetune output ("" when none)."""
    from .. import artifacts, storage

    h = hashlib.sha256()
    found = False
    for name in artifacts.MODEL_FILES:
        uri = storage.join(location, name)
        if storage.exists(uri):
            h.update(name.encode() + b"\0" + Path(storage.local_path(uri)).read_bytes())
            found = True
    return h.hexdigest()[:16] if found else ""


def split_profile(rows: list) -> dict[str, int]:
    """``[[path, pid, camid], ...]`` -> images, identities (pid >= 0), cameras."""
    return {"images": len(rows), "identities": len({r[1] for r in rows if r[1] >= 0}),
            "cameras": len({r[2] for r in rows})}


def dataset_entries(manifest: Mapping[str, Any], cfg: Any, data: str) -> list[dict[str, Any]]:
    """The dataset inputs of a manifest (``manifest.json`` as read from JSON): ``{"name", "digest",
    "source", "context", "profile"}`` for source train, target train and target test (query + gallery).
    ``digest``: 16 hex digits of SHA-256 over the rows (path, pid, camid) and root of those splits."""
    out = []
    data_uri = as_uri(data) + "/manifest.json"
    for side, splits, context in (("source", ("train",), "training"), ("target", ("train",), "training"),
                                  ("target", ("query", "gallery"), "evaluation")):
        dom = manifest.get(side, {})
        rows = {s: dom.get(s, []) for s in splits}
        if not any(rows.values()):
            continue
        digest = hashlib.sha256(json.dumps([dom.get("root", ""), rows], sort_keys=True).encode()).hexdigest()[:16]
        profile = {s: split_profile(r) for s, r in rows.items()}
        out.append({"name": f"{side}-{'+'.join(splits)}: {_domain_name(cfg, side)}", "digest": digest,
                    "source": _domain_uri(getattr(cfg.data, side), side, data_uri) or data_uri,
                    "context": context, "profile": profile})
    return out


def log_datasets(run_id: Optional[str], manifest: Mapping[str, Any], cfg: Any, data: str) -> list[dict[str, Any]]:
    """Log ``dataset_entries`` as MLflow dataset inputs of ``run_id`` (tag ``mlflow.data.context``)."""
    entries = dataset_entries(manifest, cfg, data)
    if not enabled() or not run_id or not entries:
        return entries
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [DatasetInput(Dataset(name=e["name"], digest=e["digest"], source_type="lf2-manifest",
                                   source=json.dumps({"uri": e["source"]}), profile=json.dumps(e["profile"])),
                           tags=[InputTag("mlflow.data.context", e["context"])]) for e in entries]
    client().log_inputs(run_id, datasets=inputs)
    return entries
