"""Per-iteration time of one LF2 finetuning step: the plain released recipe vs lf2's fast step.

    python bench/finetune_step.py [--arch resnet18_narrow] [--height 64 --width 32] [--batch 64]
        [--reps 6] [--threads 1 2] [--device cpu|cuda]

Variants (same weights, same three batches, one full optimisation step each = forward, loss, backward,
Adam, EMA; interleaved repetitions so machine load affects all alike; the first repetition is warm-up):

- ``reference``: ``lf2core.training.reference_step`` -- each of the three batches through student,
  teacher and Fuse with autograd on, NCHW, float32 (what the released loop does);
- ``reference_cl``: the same with channels_last tensors (to separate the memory-format effect);
- ``fast``: ``fast_step`` -- one concatenated student forward/backward with per-sub-batch (ghost) BN,
  no-grad teacher and Fuse; SAME MATH (tests/test_finetune.py checks it to 1e-5 / 1e-9 in float64);
- ``fast_cl``: ``fast`` with channels_last;
- ``fast_amp_cl``: ``fast`` + channels_last + autocast (bfloat16 on CPU, float16/bfloat16 on CUDA):
  NOT the same math (reduced precision), listed for the speed it buys;
- ``fast_cl_student_only``: ``fast_cl`` without the teacher/Fuse forwards -- what the finetune stage runs
  before the round's tail (``training.teacher_tail``: 66 of the paper's 400 iterations run the teacher).
  The line ``round (paper: 400 it)`` is the resulting mean time per iteration of a 400-iteration round:
  (66 x fast_cl + 334 x fast_cl_student_only) / 400, to float32 precision the same round result.

Prints a table of min / median seconds per step and the speed-up of each variant over ``reference``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lf2core.config import load_config  # noqa: E402
from lf2core.models import SourceModel, build_target_model  # noqa: E402
from lf2core.training import Criteria, StepSettings, fast_step, make_optimizer, reference_step  # noqa: E402


def bench(args: argparse.Namespace, threads: int) -> dict[str, list[float]]:
    torch.set_num_threads(threads)
    dev = torch.device(args.device)
    cfg = load_config("demo", [f"model.arch={args.arch}"])
    torch.manual_seed(0)
    mt = build_target_model(cfg, SourceModel(args.arch, 10).state_dict(), num_classes=args.classes).to(dev)
    g = torch.Generator().manual_seed(1)
    p = args.batch // 4
    batches = [(torch.randn(args.batch, 3, args.height, args.width, generator=g).to(dev),
                torch.arange(p).repeat_interleave(4).to(dev)) for _ in range(3)]
    settings = StepSettings(fusion_loss_weight=args.fusion_loss_weight)
    crit = Criteria(args.classes)
    amp_dtype = torch.bfloat16 if dev.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    variants = {
        "reference": dict(fast=False, cl=False),
        "reference_cl": dict(fast=False, cl=True),
        "fast": dict(fast=True, cl=False),
        "fast_cl": dict(fast=True, cl=True),
        "fast_amp_cl": dict(fast=True, cl=True, amp=amp_dtype),
        "fast_cl_student_only": dict(fast=True, cl=True, teacher=False),
    }
    state = {}
    for name, v in variants.items():
        m = copy.deepcopy(mt)
        if v["cl"]:
            m = m.to(memory_format=torch.channels_last)
        bs = [(x.contiguous(memory_format=torch.channels_last) if v["cl"] else x, y) for x, y in batches]
        state[name] = (m, make_optimizer(m, 3.5e-4, 5e-4), bs)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.reps + 1):
        for name, v in variants.items():
            m, opt, bs = state[name]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if v["fast"]:
                fast_step(m, opt, bs, rep, crit, settings, channels_last=v["cl"], autocast_dtype=v.get("amp"),
                          teacher_pass=v.get("teacher", True))
            else:
                reference_step(m, opt, bs, rep, crit, settings)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if rep > 0:
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18_narrow")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="images per batch (three batches per step)")
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fusion-loss-weight", type=float, default=0.0)
    args = ap.parse_args()
    print(f"# finetune step: {args.arch} {args.height}x{args.width}, 3 x {args.batch} images, device {args.device}, "
          f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, load avg {os.getloadavg()[0]:.1f}")
    print("| threads | variant | same math | min s/step | median s/step | speed-up (median) |")
    print("|---|---|---|---|---|---|")
    for th in args.threads:
        times = bench(args, th)
        ref = sorted(times["reference"])[len(times["reference"]) // 2]
        for name, ts in times.items():
            med = sorted(ts)[len(ts) // 2]
            same = "no (autocast)" if "amp" in name else "yes"
            print(f"| {th} | {name} | {same} | {min(ts):.3f} | {med:.3f} | {ref / med:.2f}x |")
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        mn = {k: min(v) for k, v in times.items()}
        tail = 66
        rnd = (tail * med["fast_cl"] + (400 - tail) * med["fast_cl_student_only"]) / 400
        rmn = (tail * mn["fast_cl"] + (400 - tail) * mn["fast_cl_student_only"]) / 400
        print(f"| {th} | round (paper: 400 it, teacher in the last {tail}) | yes (float32) | {rmn:.3f} | {rnd:.3f} | "
              f"{med['reference'] / rnd:.2f}x |")
    print(f"# load avg after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
