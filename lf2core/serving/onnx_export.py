"""``lf2 export --format onnx``: the evaluated embedding as an ONNX graph, proven to rank like PyTorch.

``export_model(cfg, model, data, out, opset=OPSET, fixed_images=32)``

- ``model``: ``models:/NAME/VERSION`` / ``models:/NAME@ALIAS`` (a registered lf2 pyfunc: the report is
  then attached to that version), a stage output or a checkpoint file (preprocessing from ``cfg``);
- ``data``: a prepare-data output; its TARGET query + gallery split is the parity set.

The graph is ``lf2core.serving.embedder.EmbeddingModule`` (network + flip averaging + L2 normalisation):
input ``images`` float32 ``[batch, 3, H, W]`` (normalised as the recipe's test transform), output
``embeddings`` float32 ``[batch, D]``; the batch axis is dynamic, the opset is ``OPSET`` (stated in the
report and the file), exported by ``torch.onnx.export(dynamo=True)`` into one self-contained file and
validated with ``onnx.checker.check_model(full_check=True)``. The file's metadata holds ``lf2.height``,
``lf2.width``, ``lf2.mean``, ``lf2.std`` and ``lf2.flip`` so ``lf2 search`` can preprocess for it.

Parity (onnxruntime CPU vs PyTorch eager, same preprocessed batches):

1. a fixed image set -- the first ``fixed_images`` test images in manifest order, run as a batch of 1
   and a batch of the rest (both sizes through the dynamic axis): max |difference| and min cosine;
   it fails if any element is outside ``|onnx - torch| <= ATOL + RTOL * |torch|``;
2. the whole target test split: the same element check, and mAP / Rank-1 recomputed from the ONNX
   embeddings (``lf2core.evaluation.evaluate_features``) must equal PyTorch's within ``METRIC_POINTS``
   (percentage points).

Outputs: ``out/model.onnx`` and ``out/parity.json`` (written whatever the verdict), the verdict also as
the version tag ``lf2.onnx.parity`` = passed | failed (``lf2 promote`` refuses a failed version).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .. import storage
from ..config import Config
from ..errors import DataError, Lf2Error
from .embedder import INPUT_NAME, OUTPUT_NAME, EmbeddingModule, OnnxEmbedder, TorchEmbedder, load_embedder, sha256_bytes

log = logging.getLogger(__name__)

OPSET = 18
RTOL, ATOL = 1e-3, 1e-5
METRIC_POINTS = 0.1  # mAP / Rank-1 difference allowed, in percentage points
MAX_BATCH = 4096  # upper bound of the dynamic batch axis (torch.export needs one)
REPORT_FORMAT = "lf2-onnx-parity/1"


class ExportError(Lf2Error):
    """The model cannot be exported, or the exported file is not a valid ONNX model."""


def export_onnx(module: EmbeddingModule, path: str | Path, height: int, width: int, opset: int = OPSET,
                metadata: Optional[dict[str, Any]] = None) -> float:
    """Write ``module`` to ``path`` (one file, dynamic batch axis, ``opset``), add lf2 metadata and run
    ``onnx.checker``; returns the export time in seconds (torch.onnx + check + save)."""
    import onnx

    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):  # per-pass INFO lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    module = module.eval()
    example = torch.randn(2, 3, int(height), int(width))
    t0 = time.perf_counter()
    try:
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=int(opset), input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}},
            external_data=False, verbose=False, report=False,
        )
        proto = program.model_proto
    except Exception as e:  # torch.export / onnxscript raise many types; say which model failed
        raise ExportError(f"torch.onnx.export failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    meta = {"lf2.height": str(height), "lf2.width": str(width), "lf2.input": f"{INPUT_NAME}: float32[batch,3,"
            f"{height},{width}] RGB normalised (x/255 - mean) / std", "lf2.output": f"{OUTPUT_NAME}: float32[batch,D] "
            "L2-normalised, flip-averaged" if module.flip else f"{OUTPUT_NAME}: float32[batch,D] L2-normalised",
            "lf2.flip": str(module.flip).lower(), "lf2.opset": str(opset)}
    meta.update({k: (json.dumps(v) if not isinstance(v, str) else v) for k, v in (metadata or {}).items()})
    del proto.metadata_props[:]
    for k, v in sorted(meta.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {e}") from None
    Path(path).write_bytes(proto.SerializeToString())
    return time.perf_counter() - t0


def compare(reference: np.ndarray, candidate: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> dict[str, Any]:
    """Element and row agreement of two ``[N, D]`` embedding sets (``reference`` = PyTorch)."""
    ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if ref.shape != cand.shape:
        return {"images": int(len(ref)), "shape_torch": list(ref.shape), "shape_onnx": list(cand.shape),
                "max_abs_diff": float("inf"), "min_cosine": float("-inf"), "allclose": False}
    diff = np.abs(cand - ref)
    cos = (ref * cand).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12)
    excess = diff - (atol + rtol * np.abs(ref))
    return {"images": int(len(ref)), "max_abs_diff": float(diff.max()), "min_cosine": float(cos.min()),
            "mean_abs_diff": float(diff.mean()), "elements_out_of_tolerance": int((excess > 0).sum()),
            "allclose": bool(np.isfinite(cand).all() and (excess <= 0).all())}


def _batches(loader: Any) -> list[torch.Tensor]:
    return [b[0] for b in loader]


def _run(embedder: Any, batches: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([embedder.embed_tensor(b) for b in batches])


def parity(torch_emb: TorchEmbedder, onnx_emb: OnnxEmbedder, query: list, gallery: list, batch_size: int,
           fixed_images: int = 32, num_workers: int = 0) -> dict[str, Any]:
    """The parity report (without file/model fields): fixed set, whole split, metrics, verdict."""
    from tqdm import tqdm

    from ..data.loaders import test_loader
    from ..data.transforms import test_transform
    from ..evaluation import evaluate_features
    from ..features import progress_enabled

    tf = test_transform(torch_emb.height, torch_emb.width)
    fixed = (list(query) + list(gallery))[:max(2, int(fixed_images))]
    x = torch.cat(_batches(test_loader(fixed, tf, len(fixed), num_workers)))
    fixed_batches = [x[:1], x[1:]]
    fixed_cmp = compare(_run(torch_emb, fixed_batches), _run(onnx_emb, fixed_batches))
    fixed_cmp["batches"] = [len(b) for b in fixed_batches]

    feats: dict[str, dict[str, np.ndarray]] = {"torch": {}, "onnx": {}}
    for name, samples in (("query", query), ("gallery", gallery)):
        loader = test_loader(list(samples), tf, batch_size, num_workers)
        t_chunks, o_chunks = [], []
        for b in tqdm(loader, desc=f"parity {name}", unit="batch", disable=not progress_enabled(), leave=False):
            t_chunks.append(torch_emb.embed_tensor(b[0]))
            o_chunks.append(onnx_emb.embed_tensor(b[0]))
        feats["torch"][name], feats["onnx"][name] = np.concatenate(t_chunks), np.concatenate(o_chunks)
    q_pids = np.array([s.pid for s in query]); g_pids = np.array([s.pid for s in gallery])
    q_cams = np.array([s.camid for s in query]); g_cams = np.array([s.camid for s in gallery])
    metrics = {k: evaluate_features(f["query"], f["gallery"], q_pids, g_pids, q_cams, g_cams) for k, f in feats.items()}
    split_cmp = compare(np.concatenate([feats["torch"]["query"], feats["torch"]["gallery"]]),
                        np.concatenate([feats["onnx"]["query"], feats["onnx"]["gallery"]]))
    split_cmp.update({
        "pytorch": {k: metrics["torch"][k] for k in ("mAP", "R1")},
        "onnx": {k: metrics["onnx"][k] for k in ("mAP", "R1")},
        "mAP_diff_points": abs(metrics["onnx"]["mAP"] - metrics["torch"]["mAP"]) * 100,
        "R1_diff_points": abs(metrics["onnx"]["R1"] - metrics["torch"]["R1"]) * 100,
    })
    failures = []
    for where, c in (("fixed set", fixed_cmp), ("test split", split_cmp)):
        if not c["allclose"]:
            failures.append(f"{where}: max abs diff {c['max_abs_diff']:.3g} / min cosine {c['min_cosine']:.6f} "
                            f"outside rtol {RTOL:g} / atol {ATOL:g}")
    for k in ("mAP", "R1"):
        if not split_cmp[f"{k}_diff_points"] <= METRIC_POINTS:
            failures.append(f"{k} {100 * metrics['onnx'][k]:.2f}% (onnxruntime) vs {100 * metrics['torch'][k]:.2f}% "
                            f"(PyTorch): differs by more than {METRIC_POINTS} point")
    return {"tolerance": {"rtol": RTOL, "atol": ATOL, "metric_points": METRIC_POINTS},
            "fixed_set": fixed_cmp, "test_split": split_cmp, "passed": not failures, "failures": failures}


def export_model(cfg: Optional[Config], model: str, data: str, out: str, opset: int = OPSET, fixed_images: int = 32,
                 log_to_registry: bool = True) -> dict[str, Any]:
    """Export ``model`` to ``out/model.onnx``, check parity on ``data``'s target test split, write
    ``out/parity.json`` and (for a ``models:/`` URI) attach both to the registered version. ``cfg`` None:
    a stage output's sizes come from its checkpoint, batches of 256 in this process."""
    import onnxruntime

    from .. import tracking
    from .. import artifacts

    query, gallery = artifacts.read_split(data, "target_query"), artifacts.read_split(data, "target_gallery")
    if not query or not gallery:
        raise DataError(f"{data}: the target query/gallery split is empty ({len(query)} / {len(gallery)} images)")
    emb = load_embedder(model, cfg)
    batch_size, workers = (cfg.eval.batch_size, cfg.data.num_workers) if cfg is not None else (256, 0)
    if not isinstance(emb, TorchEmbedder):
        raise ExportError(f"{model}: already an ONNX file; export takes a registered model or a stage output")
    with storage.output_dir(out, "export-onnx") as tmp:
        path = Path(tmp) / "model.onnx"
        secs = export_onnx(emb.module, path, emb.height, emb.width, opset,
                           metadata={"lf2.source_model": str(model), "lf2.fingerprint": emb.fingerprint})
        onnx_emb = OnnxEmbedder(str(path))
        report: dict[str, Any] = {
            "format": REPORT_FORMAT, "model": str(model), "onnx_file": "model.onnx", "opset": int(opset),
            "onnx_sha256": sha256_bytes(path.read_bytes()), "onnx_bytes": path.stat().st_size,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, emb.height, emb.width], "dtype": "float32"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", int(onnx_emb.session.get_outputs()[0].shape[1])]},
            "flip": bool(emb.module.flip), "export_seconds": round(secs, 3), "data": str(data),
        }
        report.update(parity(emb, onnx_emb, query, gallery, batch_size, fixed_images, workers))
        target = None
        if log_to_registry and str(model).startswith("models:/") and tracking.enabled():
            target = tracking.resolve_model_uri(str(model))
            report["registered_version"] = "/".join(target)
        (Path(tmp) / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
        if target is not None:
            name, version = target
            s = report["test_split"]
            report["logged_to"] = tracking.log_version_report(
                name, version, {"model.onnx": str(path), "parity.json": str(Path(tmp) / "parity.json")},
                f"onnx/v{version}",
                {tracking.PARITY_TAG: "passed" if report["passed"] else "failed", "lf2.onnx.opset": opset,
                 "lf2.onnx.max_abs_diff": f"{max(report['fixed_set']['max_abs_diff'], s['max_abs_diff']):.3g}",
                 "lf2.onnx.min_cosine": f"{min(report['fixed_set']['min_cosine'], s['min_cosine']):.8f}",
                 "lf2.onnx.mAP_diff_points": f"{s['mAP_diff_points']:.4f}"},
                location_tag="lf2.onnx.artifacts")
    return report


def summary(report: dict[str, Any]) -> str:
    """The human-readable lines ``lf2 export`` prints."""
    f, s = report["fixed_set"], report["test_split"]
    lines = [
        f"ONNX opset {report['opset']}, dynamic batch axis, {report['onnx_bytes'] / 1e6:.1f} MB, exported + "
        f"checked in {report['export_seconds']:.1f}s",
        f"{'set':<12}{'images':>8}{'max |diff|':>14}{'min cosine':>14}  within rtol {RTOL:g}/atol {ATOL:g}",
        f"{'fixed':<12}{f['images']:>8}{f['max_abs_diff']:>14.3g}{f['min_cosine']:>14.8f}  {f['allclose']}",
        f"{'test split':<12}{s['images']:>8}{s['max_abs_diff']:>14.3g}{s['min_cosine']:>14.8f}  {s['allclose']}",
        f"mAP  PyTorch {100 * s['pytorch']['mAP']:.2f}%  onnxruntime {100 * s['onnx']['mAP']:.2f}%  "
        f"(diff {s['mAP_diff_points']:.3f} points, allowed {METRIC_POINTS})",
        f"R1   PyTorch {100 * s['pytorch']['R1']:.2f}%  onnxruntime {100 * s['onnx']['R1']:.2f}%  "
        f"(diff {s['R1_diff_points']:.3f} points)",
        "parity: PASSED" if report["passed"] else "parity: FAILED: " + "; ".join(report["failures"]),
    ]
    if report.get("registered_version"):
        lines.append(f"logged to {report['registered_version']} ({report.get('logged_to')}), tag "
                     f"lf2.onnx.parity={'passed' if report['passed'] else 'failed'}")
    return "\n".join(lines)


def export_main(cfg: Optional[Config], model: str, data: str, out: str, fmt: str = "onnx", opset: int = OPSET,
                fixed_images: int = 32) -> int:
    """``lf2 export``: prints the summary; exit 0 when parity passed, 1 when it failed."""
    if fmt != "onnx":
        raise ExportError(f"--format {fmt}: only onnx is supported")
    report = export_model(cfg, model, data, out, opset, fixed_images)
    print(summary(report))
    print(f"wrote {storage.join(out, 'model.onnx')} and {storage.join(out, 'parity.json')}")
    return 0 if report["passed"] else 1
