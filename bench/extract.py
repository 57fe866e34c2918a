"""Benchmark: lf2core.features.extract vs a bare ``model(x)`` loop on the same pre-loaded batches.

Measures the bookkeeping overhead of the extraction loop (flip concatenation, float32 cast, L2
normalisation, CPU copy, index reordering, tqdm) -- data loading is excluded on both sides (the batches
are tensors already in memory). Two comparisons, each on identical work:

- ``flip=False``: ``extract`` vs ``for x in batches: model(x)``;
- ``flip=True`` : ``extract`` vs ``for x in batches: model(cat[x, flip(x)])`` (what extract forwards).

The model is the extraction stage's ``MeanTeacher.fusion_features`` (teacher map x student attention,
three outputs). Both sides run under ``torch.inference_mode`` with the same autocast / channels_last
settings (on CUDA: float16 autocast + channels_last). Best of ``--repeats`` runs; prints a table and a
markdown row for docs/benchmarks.md.

    .venv/bin/python bench/extract.py                       # CPU defaults: resnet18_narrow 64x32
    .venv/bin/python bench/extract.py --arch resnet50 --height 256 --width 128 --batch 256 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lf2core.config import load_config
from lf2core.features import extract
from lf2core.runtime import autocast_context
from lf2core.models import SourceModel, build_target_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(fn, batches, device, flip: bool, amp: bool, channels_last: bool) -> None:
    with torch.inference_mode():
        for x, *_ in batches:
            x = x.to(device, non_blocking=True)
            if flip:
                x = torch.cat([x, torch.flip(x, dims=[3])], 0)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp):
                fn(x)
    sync(device)


def timed(f, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18_narrow")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-amp", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("LF2_PROGRESS", "1")

    cfg = load_config("demo", [f"model.arch={args.arch}", f"data.height={args.height}", f"data.width={args.width}",
                               f"device={args.device}"])
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    amp = not args.no_amp
    channels_last = device.type == "cuda"
    torch.manual_seed(0)
    mt = build_target_model(cfg, SourceModel(args.arch, 10).state_dict()).to(device).eval()
    if channels_last:
        mt = mt.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(args.batches):
        x = torch.randn(args.batch, 3, args.height, args.width, generator=g)
        if device.type == "cuda":
            x = x.pin_memory()
        idx = torch.arange(b * args.batch, (b + 1) * args.batch)
        batches.append((x, idx, idx % 6, idx))
    n = args.batch * args.batches
    fn = mt.fusion_features
    # warm-up (allocator, cuDNN autotune)
    bare_loop(fn, batches[:2], device, True, amp, channels_last)
    extract(fn, batches[:2], device, flip=True, amp=amp)

    rows = []
    for flip in (False, True):
        t_bare = timed(lambda: bare_loop(fn, batches, device, flip, amp, channels_last), args.repeats)
        t_ext = timed(lambda: (extract(fn, batches, device, flip=flip, amp=amp), sync(device)), args.repeats)
        rows.append((flip, n / t_bare, n / t_ext, 100.0 * (t_ext / t_bare - 1.0)))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"extract benchmark: {args.arch} {args.height}x{args.width}, batch {args.batch} x {args.batches}, "
          f"{where}, amp={amp and device.type == 'cuda'}, load avg {load:.1f}")
    print(f"{'flip':>5} {'bare img/s':>11} {'extract img/s':>14} {'overhead':>9}")
    for flip, bare, ext, ov in rows:
        print(f"{str(flip):>5} {bare:11.1f} {ext:14.1f} {ov:8.1f}%")
    print("\nmarkdown:")
    for flip, bare, ext, ov in rows:
        print(f"| {args.arch} {args.height}x{args.width} | {where} | {args.batch} | {flip} | {bare:.0f} | {ext:.0f} "
              f"| {ov:+.1f}% |")


if __name__ == "__main__":
    main()
