"""``lf2 search``: the top-k gallery images of each query image, with distances and a rank-list PNG.

``search(model, gallery, queries, top_k=10, split=None, png=..., cfg=None, cache_dir=None)``

- ``model``: ``models:/NAME/VERSION`` / ``models:/NAME@ALIAS``, a stage output / checkpoint, or an
  ``.onnx`` file written by ``lf2 export`` (``lf2core.serving.embedder.load_embedder``);
- ``gallery``: a folder (every image below it), an ``s3://`` prefix (downloaded through the storage
  cache), or with ``split`` a prepare-data output (``target_gallery``, ``source_query`` ...) or a dataset
  root (``gallery``, ``query``, ``train``; format detected);
- ``queries``: image files (local or s3://).

Embeddings are the model's evaluated ones (L2-normalised, flip-averaged); the distance is the squared
Euclidean distance ``evaluate`` ranks by (``2 - 2 cos``), searched exactly with a faiss ``IndexFlatL2``.
Gallery embeddings are cached on disk (``<cache>/embeddings/<key>.npz``, default cache ``~/.cache/lf2``
or ``$LF2_CACHE_DIR``) under a key made of the model fingerprint (weights/graph + preprocessing) and
every gallery file's path, size and modification time: a changed model or file set is recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .. import artifacts, storage
from ..config import Config
from ..errors import DataError, Lf2Error
from .embedder import Embedder, load_embedder

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
CACHE_FORMAT = "lf2-embeddings/1"


# ============================================================================================ inputs
def _images_below(local: Path) -> list[Path]:
    return sorted(p for p in local.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not any(part.startswith(".") for part in p.relative_to(local).parts))


def resolve_gallery(spec: str, split: Optional[str] = None) -> tuple[list[str], list[str]]:
    """``(names shown, local paths)`` of the gallery images (see the module doc); DataError if none."""
    spec = str(spec)
    if split:
        if spec.rstrip("/").endswith(".json") or storage.exists(storage.join(spec, artifacts.MANIFEST)):
            local = [s.path for s in artifacts.read_split(spec, split)]
        else:
            from ..data.datasets import detect_format, load
            from ..data.datasets.loading import localise

            _, root = localise(spec)
            splits = load(detect_format(root), spec)
            if split not in ("train", "query", "gallery"):
                raise DataError(f"{spec}: unknown split '{split}' of a dataset root (valid: train, query, gallery)")
            local = [s.path for s in splits.split(split)]
        names = list(local)
    elif storage.is_remote(spec):
        root = Path(storage.local_path(spec))
        files = _images_below(root) if root.is_dir() else [root]
        local = [str(p) for p in files]
        names = [spec.rstrip("/") + "/" + p.relative_to(root).as_posix() if root.is_dir() else spec for p in files]
    else:
        root = Path(spec)
        if not root.is_dir():
            raise DataError(f"gallery {spec}: not a directory (give a folder, an s3:// prefix, or --split with a "
                            f"prepare-data output or dataset root)")
        local = [str(p) for p in _images_below(root)]
        names = list(local)
    if not local:
        raise DataError(f"gallery {spec}{f' split {split}' if split else ''}: no images "
                        f"({', '.join(IMAGE_EXTS)})")
    return names, local


def resolve_queries(queries: Sequence[str]) -> list[str]:
    """Local paths of the query images; DataError naming a missing one."""
    out = []
    for q in queries:
        if storage.is_remote(str(q)):
            try:
                p = Path(storage.local_path(str(q)))
            except Lf2Error as e:
                raise DataError(f"query {e}") from None
        else:
            p = Path(str(q))
        if not p.is_file():
            raise DataError(f"query {q}: {'not a file' if p.exists() else 'no such file'}")
        out.append(str(p))
    if not out:
        raise DataError("no query images given")
    return out


# ============================================================================================ cache
def cache_key(embedder: Embedder, names: Sequence[str], local: Sequence[str]) -> str:
    """Key of a gallery's embeddings: the model fingerprint + every file's name, size and mtime."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, embedder.fingerprint]).encode())
    for n, p in zip(names, local):
        st = os.stat(p)
        h.update(json.dumps([n, p, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:40]


def gallery_embeddings(embedder: Embedder, names: Sequence[str], local: Sequence[str],
                       cache_dir: Optional[str] = None, batch_size: int = 64) -> tuple[np.ndarray, str, bool]:
    """``(embeddings [G, D], cache file, hit)``: read from the cache, or computed (progress bar) and stored."""
    folder = Path(cache_dir) if cache_dir else storage.cache_dir() / "embeddings"
    path = folder / f"{cache_key(embedder, names, local)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if list(z["names"]) == list(names):
                    return z["features"].astype(np.float32, copy=False), str(path), True
        except (OSError, ValueError, KeyError) as e:
            log.warning("embedding cache %s unreadable (%s); recomputing", path, e)
    feats = embedder.embed_files(local, batch_size=batch_size, desc="gallery")
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, features=feats, names=np.array(list(names)), fingerprint=np.array(embedder.fingerprint))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    with os.fdopen(fd, "wb") as fh:
        fh.write(buf.getvalue())
    os.replace(tmp, path)
    return feats, str(path), False


# ============================================================================================ search
def topk(query: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(distances [Q, k], indices [Q, k])``, squared Euclidean, ascending (faiss ``IndexFlatL2``)."""
    import faiss

    index = faiss.IndexFlatL2(int(gallery.shape[1]))
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    dist, idx = index.search(np.ascontiguousarray(query, dtype=np.float32), int(min(k, len(gallery))))
    return dist, idx


def ranklist_png(out: str, query_names: Sequence[str], query_local: Sequence[str], gallery_names: Sequence[str],
                 gallery_local: Sequence[str], dist: np.ndarray, idx: np.ndarray, model: str) -> str:
    """One row per query: the query then its top-k gallery images, rank and distance above each."""
    from matplotlib.figure import Figure

    from ..plots import QUERY_COLOR, RankCell, draw_rank_rows, save_png

    rows, k = len(query_local), idx.shape[1]
    cols = k + 1
    fig_h = 2.05 * rows + 0.9
    fig = Figure(figsize=(max(6.0, 0.95 * cols + 0.3), fig_h))
    fig.suptitle(f"lf2 search: top-{k} by squared Euclidean distance\n{model}", fontsize=8,
                 y=1 - 0.1 / fig_h, va="top")

    def cell(r: int, j: int) -> Optional[RankCell]:
        gi = int(idx[r, j])
        if gi < 0:
            return None
        return RankCell(gallery_local[gi], f"{j + 1}: d={dist[r, j]:.3f}\n{Path(gallery_names[gi]).name[:14]}",
                        "#555555", 1.5)

    draw_rank_rows(fig, [RankCell(query_local[r], f"query\n{Path(query_names[r]).name[:14]}", QUERY_COLOR, 3.0,
                                  QUERY_COLOR) for r in range(rows)], k, cell, fontsize=6)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.85 / fig_h, wspace=0.08, hspace=0.5)
    return save_png(fig, out, dpi=100)


def search(model: str, gallery: str, queries: Sequence[str], top_k: int = 10, split: Optional[str] = None,
           png: Optional[str] = "search_ranklist.png", cfg: Optional[Config] = None, cache_dir: Optional[str] = None,
           batch_size: int = 64) -> dict[str, Any]:
    """Search; returns ``{"model", "gallery_images", "cache", "cache_hit", "png", "results": [{"query",
    "matches": [{"rank", "distance", "gallery"}]}]}``."""
    if top_k < 1:
        raise DataError(f"--top-k must be >= 1, got {top_k}")
    q_local = resolve_queries(queries)
    g_names, g_local = resolve_gallery(gallery, split)
    emb = load_embedder(model, cfg)
    g_feat, cache, hit = gallery_embeddings(emb, g_names, g_local, cache_dir, batch_size)
    q_feat = emb.embed_files(q_local, batch_size=batch_size, desc="queries")
    dist, idx = topk(q_feat, g_feat, top_k)
    results = [{"query": str(q), "matches": [{"rank": j + 1, "distance": float(dist[i, j]), "gallery": g_names[int(g)]}
                                             for j, g in enumerate(idx[i]) if g >= 0]}
               for i, q in enumerate(queries)]
    out = {"model": str(model), "gallery": str(gallery), "gallery_images": len(g_names), "dim": int(g_feat.shape[1]),
           "cache": cache, "cache_hit": hit, "png": None, "results": results}
    if png:
        out["png"] = ranklist_png(png, [str(q) for q in queries], q_local, g_names, g_local, dist, idx, str(model))
    return out


def format_results(res: dict[str, Any]) -> str:
    lines = [f"model {res['model']}: {res['gallery_images']} gallery images, {res['dim']}-d embeddings "
             f"({'cached' if res['cache_hit'] else 'computed, cached'} in {res['cache']})"]
    for r in res["results"]:
        lines.append(f"query {r['query']}")
        lines.append(f"  {'rank':>4}  {'distance':>8}  gallery")
        lines += [f"  {m['rank']:>4}  {m['distance']:>8.4f}  {m['gallery']}" for m in r["matches"]]
    if res.get("png"):
        lines.append(f"rank list: {res['png']}")
    return "\n".join(lines)


def search_main(model: str, gallery: str, queries: Sequence[str], top_k: int = 10, split: Optional[str] = None,
                png: Optional[str] = "search_ranklist.png", cfg: Optional[Config] = None,
                cache_dir: Optional[str] = None, batch_size: int = 64, json_out: Optional[str] = None) -> int:
    res = search(model, gallery, queries, top_k, split, png, cfg, cache_dir, batch_size)
    print(format_results(res))
    if json_out:
        storage.write_bytes(json_out, (json.dumps(res, indent=2) + "\n").encode())
    return 0
