"""Images -> L2-normalised re-ID embeddings, from PyTorch or onnxruntime, for any model location.

``EmbeddingModule(net, flip)`` is the evaluated feature as one module: ``net`` is the eval-mode network
``evaluate`` measures (``lf2core.stages.register.EvalFeatureModel``); with ``flip`` the batch is run with
its horizontal mirror and the two outputs are summed, then every row is L2-normalised -- the rule of
``lf2core.features.extract`` (``cfg.eval.flip``). Input: normalised float32 ``[B, 3, H, W]``; output
float32 ``[B, D]``. It is what the pyfunc runs and what ``lf2 export`` writes to ONNX (flip inside the graph).

``load_embedder(uri, cfg)`` accepts

- ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``: a registered lf2 pyfunc (downloaded through
  ``lf2core.tracking``; its ``serving.json`` fixes size and flip);
- a path ending in ``.onnx``: an exported model (size from its metadata);
- a stage output (finetune / pretrain) or a checkpoint file: size and flip from ``cfg``
  (``data.height``, ``data.width``, ``eval.flip``), as ``evaluate`` would use them.

Every embedder has a ``fingerprint`` (hash of the weights/graph and the preprocessing) used as the cache
key of gallery embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import artifacts, storage
from ..config import Config, config_from_dict
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError, DataError
from .images import preprocess

log = logging.getLogger(__name__)

SERVING_FILE = "serving.json"  # in a pyfunc's data directory, next to the checkpoint
CHECKPOINT_FILE = artifacts.TEACHER  # the evaluated teacher, named as in a finetune output
SERVING_FORMAT = "lf2-serving/1"
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


class EmbeddingModule(torch.nn.Module):
    """Normalised ``[B, 3, H, W]`` -> flip-averaged, L2-normalised embedding ``[B, D]`` (see module doc)."""

    def __init__(self, net: torch.nn.Module, flip: bool = True) -> None:
        super().__init__()
        self.net = net
        self.flip = bool(flip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.flip:
            x = torch.cat([x, torch.flip(x, dims=[3])], dim=0)
        y = self.net(x).float()
        if self.flip:
            y = y[:b] + y[b:]
        return F.normalize(y, dim=1)


def load_network(model: str, cfg: Optional[Config] = None) -> tuple[torch.nn.Module, dict[str, Any], Config]:
    """The evaluated network of a stage output / checkpoint (CPU, eval mode), its info, and the config
    used (``cfg``, or the checkpoint's own stored config when None).

    The one place lf2.serving turns a stage output into a network (``lf2core.artifacts.read_model``)."""
    from .. import artifacts
    from ..stages.register import EvalFeatureModel

    stage_model = artifacts.read_model(cfg or Config(), model)
    if cfg is None:
        cfg = _stored_config(stage_model.checkpoint, stage_model.path)
        stage_model.cfg = cfg
    net, _, info = stage_model.eval_network()
    return EvalFeatureModel(net.cpu(), info["variant"]).eval(), info, cfg


def _stored_config(ck: dict[str, Any], path: str) -> Config:
    """A checkpoint's own config (its training recipe); the defaults with its architecture if unreadable."""
    try:
        return config_from_dict(ck.get("config") or {"model": {"arch": ck["arch"]}})
    except Exception:  # an older or foreign config
        log.warning("checkpoint %s: stored config not readable, using defaults", path)
        return config_from_dict({"model": {"arch": ck["arch"]}})


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(*parts: Any) -> str:
    return sha256_bytes(json.dumps(parts, sort_keys=True, default=str).encode())[:32]


class Embedder:
    """Base: ``embed_tensor`` (normalised batch -> embeddings) is provided by the subclasses."""

    height: int
    width: int
    fingerprint: str
    source: str

    def embed_tensor(self, x: torch.Tensor) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def embed_images(self, images: Sequence[Any], names: Optional[Sequence[str]] = None,
                     batch_size: int = 64) -> np.ndarray:
        """float32 ``[N, D]`` for images given as bytes / uint8 arrays / PIL images (``images.to_pil``)."""
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        out = [self.embed_tensor(preprocess(images[i:i + batch_size], self.height, self.width,
                                            names[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
        if not out:
            raise DataError("no images given (expected a batch of at least one image)")
        return np.concatenate(out)

    def embed_files(self, paths: Sequence[str], batch_size: int = 64, desc: str = "embed",
                    num_workers: int = 0) -> np.ndarray:
        """float32 ``[N, D]`` for local image files, in order, read and transformed as ``evaluate`` does
        (``lf2core.data.loaders.test_loader``), with a progress bar."""
        from tqdm import tqdm

        from ..data.datasets import Sample
        from ..data.loaders import test_loader
        from ..data.transforms import test_transform
        from ..features import progress_enabled

        loader = test_loader([Sample(str(p), -1, -1) for p in paths], test_transform(self.height, self.width),
                             batch_size, num_workers)
        chunks = [self.embed_tensor(batch[0])
                  for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress_enabled())]
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


class TorchEmbedder(Embedder):
    """PyTorch eager on the CPU."""

    def __init__(self, module: EmbeddingModule, height: int, width: int, fingerprint: str, source: str,
                 meta: Optional[dict[str, Any]] = None) -> None:
        self.module = module.eval()
        self.height, self.width = int(height), int(width)
        self.fingerprint, self.source = fingerprint, source
        self.meta = dict(meta or {})
        self.checkpoint = ""

    def embed_tensor(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.module(x.float()).numpy().astype(np.float32, copy=False)


class OnnxEmbedder(Embedder):
    """onnxruntime (CPU) over an ``lf2 export`` file; size and flip from its metadata."""

    def __init__(self, path: str, threads: Optional[int] = None) -> None:
        import onnxruntime as ort

        local = storage.local_path(path)
        data = local.read_bytes()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CheckpointError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {e})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.height, self.width = int(meta["lf2.height"]), int(meta["lf2.width"])
        except (KeyError, ValueError):
            raise CheckpointError(f"{path}: no lf2.height/lf2.width metadata (not written by `lf2 export`)") from None
        self.meta = dict(meta)
        self.source = str(path)
        self.fingerprint = _fingerprint("onnx", sha256_bytes(data))
        self.input_name = self.session.get_inputs()[0].name

    def embed_tensor(self, x: torch.Tensor) -> np.ndarray:
        arr = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32, copy=False))
        return self.session.run(None, {self.input_name: arr})[0].astype(np.float32, copy=False)


# ============================================================================ stage output / pyfunc data
def torch_embedder(model: str, cfg: Optional[Config] = None) -> TorchEmbedder:
    """A stage output or checkpoint, preprocessing from ``cfg`` (default: the checkpoint's own config)."""
    net, info, cfg = load_network(model, cfg)
    h, w, flip = cfg.data.height, cfg.data.width, cfg.eval.flip
    digest = sha256_bytes(storage.read_bytes(info["checkpoint"]))
    meta = serving_meta(cfg, info, digest)
    emb = TorchEmbedder(EmbeddingModule(net, flip), h, w,
                        _fingerprint("torch", digest, h, w, flip, info["variant"]), str(model), meta)
    emb.checkpoint = info["checkpoint"]
    return emb


def serving_meta(cfg: Config, info: dict[str, Any], checkpoint_sha256: str) -> dict[str, Any]:
    """``serving.json``: how the pyfunc turns images into the evaluated embedding."""
    return {
        "format": SERVING_FORMAT,
        "height": int(cfg.data.height), "width": int(cfg.data.width), "flip": bool(cfg.eval.flip),
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize": "bicubic (PIL, antialiased)",
        "kind": info["kind"], "variant": info["variant"], "arch": info["arch"],
        "checkpoint_sha256": checkpoint_sha256, "model_config": cfg.to_dict()["model"],
    }


def write_model_dir(out_dir: str | Path, model: str, cfg: Config) -> dict[str, Any]:
    """Fill ``out_dir`` (local) with the pyfunc's data: the checkpoint and ``serving.json``; returns the meta."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emb = torch_embedder(model, cfg)
    (out / CHECKPOINT_FILE).write_bytes(storage.read_bytes(emb.checkpoint))
    meta = dict(emb.meta)
    (out / SERVING_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_model_dir(path: str | Path) -> TorchEmbedder:
    """The embedder of a pyfunc data directory (``serving.json`` + checkpoint)."""
    p = Path(path)
    try:
        meta = json.loads((p / SERVING_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p / SERVING_FILE}: missing or invalid ({e})") from None
    if meta.get("format") != SERVING_FORMAT:
        raise CheckpointError(f"{p / SERVING_FILE}: format {meta.get('format')!r}, expected {SERVING_FORMAT}")
    cfg = config_from_dict({"model": meta.get("model_config", {}),
                            "data": {"height": meta["height"], "width": meta["width"]},
                            "eval": {"flip": meta["flip"]}})
    net, info, _ = load_network(str(p / CHECKPOINT_FILE), cfg)
    fp = _fingerprint("torch", meta["checkpoint_sha256"], meta["height"], meta["width"], meta["flip"],
                      info["variant"])
    return TorchEmbedder(EmbeddingModule(net, meta["flip"]), meta["height"], meta["width"], fp, str(p), meta)


def find_model_dir(root: str | Path) -> Path:
    """The directory holding ``serving.json`` below a downloaded MLflow model."""
    hits = sorted(Path(root).rglob(SERVING_FILE))
    if not hits:
        raise CheckpointError(f"{root}: no {SERVING_FILE} (not an lf2 pyfunc model; was it registered by "
                              f"this version of `lf2 register`?)")
    return hits[0].parent


def load_embedder(uri: str, cfg: Optional[Config] = None) -> Embedder:
    """An embedder for a registered model, an ``.onnx`` file or a stage output (see the module doc)."""
    uri = str(uri)
    if uri.startswith("models:/"):
        from .. import tracking

        emb = load_model_dir(find_model_dir(tracking.download_model(uri)))
        emb.source = uri
        return emb
    if uri.endswith(".onnx"):
        if not storage.exists(uri):
            raise CheckpointError(f"{uri}: no such ONNX file")
        return OnnxEmbedder(uri)
    return torch_embedder(uri, cfg)
