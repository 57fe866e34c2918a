"""Benchmark: the served model's throughput, onnxruntime CPU vs PyTorch eager, and the ONNX export time.

Setup (in a temporary directory, nothing outside it is touched): synthetic JPEG crops (`lf2 data synth`
style b), a teacher checkpoint of ``--arch`` (seeded random weights: throughput does not depend on the
values), registered in a throwaway sqlite MLflow store and promoted, then:

1. pyfunc server: ``mlflow models serve -m models:/lf2-reid@champion --env-manager local`` on
   127.0.0.1 (1 worker); images/s of POST /invocations with batches of 1 and 64 encoded JPEGs (base64
   JSON, decoding + preprocessing + flip-averaged network inside the server; client JSON encoding
   included in the time);
2. the same preprocessed batches (1 and 64) through PyTorch eager (``EmbeddingModule``) and onnxruntime
   (CPUExecutionProvider, the file ``lf2 export`` writes), both with ``--threads`` intra-op threads;
3. the export time (``torch.onnx.export(dynamo=True)`` + ``onnx.checker`` + save).

Each figure is the median of ``--repeats`` timed runs with its min-max spread; the machine load
(1-minute load average) is printed before and after. Prints a table and markdown rows for
docs/benchmarks.md.

    .venv/bin/python bench/serving.py                                    # resnet18_narrow 64x32
    .venv/bin/python bench/serving.py --arch resnet50 --height 256 --width 128 --repeats 3
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def rate(images: int, secs: list[float]) -> tuple[float, float, float]:
    """(median, min, max) images/s."""
    r = sorted(images / s for s in secs)
    return statistics.median(r), r[0], r[-1]


def post(url: str, images: list[str]) -> None:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b] for b in images]}}).encode()
    req = urllib.request.Request(url + "/invocations", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18_narrow")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=20, help="batch-1 requests per timed run")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LF2_PROGRESS", "0")

    from lf2core import tracking
    from lf2core.checkpoint import save_checkpoint
    from lf2core.config import load_config
    from lf2core.data.synthetic import write_domain
    from lf2core.models.lf2 import LF2Model
    from lf2core.serving.embedder import EmbeddingModule, OnnxEmbedder, load_network
    from lf2core.serving.images import preprocess
    from lf2core.serving.onnx_export import export_onnx
    from lf2core.stages.register import register
    from pipelines.local_servers import model_server

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lf2-bench-serving-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["LF2_MLFLOW_ARTIFACTS"] = str(root / "mlartifacts")
        os.environ["LF2_CACHE_DIR"] = str(root / "cache")
        os.environ.pop("LF2_TRACKING", None)
        cfg = load_config("demo", [f"model.arch={args.arch}", "model.weights=none", f"data.height={args.height}",
                                   f"data.width={args.width}", "tracking.experiment=bench"])
        write_domain("b", root / "synth", ids=10, test_ids=6, seed=0, height=2 * args.height, width=2 * args.width)
        files = sorted((root / "synth").rglob("*.jpg"))[:64]
        assert len(files) == 64, len(files)
        encoded = [f.read_bytes() for f in files]
        b64 = [base64.b64encode(e).decode() for e in encoded]
        torch.manual_seed(0)
        net = LF2Model(cfg.model.arch, num_classes=10, num_parts=cfg.model.num_parts).eval()
        (root / "ft").mkdir()
        save_checkpoint(str(root / "ft" / "teacher.pt"), net, "lf2", cfg)
        (root / "ev").mkdir()
        (root / "ev" / "metrics.json").write_text(json.dumps({"mAP": 0.5}))
        version = register(cfg, str(root / "ft"), str(root / "ev"))["version"]
        tracking.promote(version=version)

        rows = []
        with model_server("models:/lf2-reid@champion", root / "server",
                          env={"OMP_NUM_THREADS": str(args.threads)}) as url:
            s1 = timed(lambda: [post(url, b64[:1]) for _ in range(args.requests)], args.repeats)
            s64 = timed(lambda: post(url, b64), args.repeats)
        rows.append(("pyfunc server (HTTP, JPEG in)", 1, rate(args.requests, s1)))
        rows.append(("pyfunc server (HTTP, JPEG in)", 64, rate(64, s64)))

        module = EmbeddingModule(load_network(str(root / "ft"), cfg)[0], flip=True).eval()
        t_export = []
        for i in range(min(args.repeats, 3)):
            t_export.append(export_onnx(module, root / f"m{i}.onnx", args.height, args.width))
        ort_emb = OnnxEmbedder(str(root / "m0.onnx"), threads=args.threads)
        x64 = preprocess(encoded, args.height, args.width)
        x1 = x64[:1]
        with torch.inference_mode():
            for name, fn in (("PyTorch eager (CPU)", lambda x: module(x)), ("onnxruntime (CPU)", ort_emb.embed_tensor)):
                rows.append((name, 1, rate(args.requests, timed(lambda: [fn(x1) for _ in range(args.requests)],
                                                                 args.repeats))))
                rows.append((name, 64, rate(64, timed(lambda: fn(x64), args.repeats))))
            diff = float(np.abs(ort_emb.embed_tensor(x64) - module(x64).numpy()).max())
    load1 = os.getloadavg()[0]

    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {args.arch} {args.height}x{args.width}, flip-averaged, "
          f"{args.threads} intra-op thread(s), {os.cpu_count()} CPUs, load average {load0:.1f} -> {load1:.1f}, "
          f"torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"{'path':<32}{'batch':>6}{'images/s (median)':>20}{'min - max':>18}")
    for name, b, (med, lo, hi) in rows:
        print(f"{name:<32}{b:>6}{med:>20.1f}{f'{lo:.1f} - {hi:.1f}':>18}")
    print(f"ONNX export (torch.onnx dynamo + checker + save): median {statistics.median(t_export):.1f}s "
          f"(min {min(t_export):.1f}, max {max(t_export):.1f}, {len(t_export)} runs); max |onnx - torch| "
          f"on the batch of 64: {diff:.2g}")
    print("\nmarkdown:")
    for name, b, (med, lo, hi) in rows:
        print(f"| {name} | {b} | {med:.1f} | {lo:.1f} - {hi:.1f} |")
    print(f"| ONNX export time | - | {statistics.median(t_export):.1f} s | {min(t_export):.1f} - {max(t_export):.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
