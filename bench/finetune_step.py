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

The pieces are importable (``bench/gpu_check.py`` uses them): ``build_case`` (model + batches),
``VARIANTS`` / ``prepare`` / ``run_variant`` (one step of a variant), ``time_variants`` (interleaved timing),
``median`` and ``round_seconds``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lf2core.config import load_config  # noqa: E402
from lf2core.models import MeanTeacher, SourceModel, build_target_model  # noqa: E402
from lf2core.training import (  # noqa: E402
    Batch, Criteria, StepResult, StepSettings, fast_step, make_optimizer, reference_step,
)

# name -> how the step runs: fast_step or reference_step, channels_last, autocast, teacher/Fuse forwards
VARIANTS: dict[str, dict[str, bool]] = {
    "reference": dict(fast=False, cl=False),
    "reference_cl": dict(fast=False, cl=True),
    "fast": dict(fast=True, cl=False),
    "fast_cl": dict(fast=True, cl=True),
    "fast_amp_cl": dict(fast=True, cl=True, amp=True),
    "fast_cl_student_only": dict(fast=True, cl=True, teacher=False),
    "fast_amp_cl_student_only": dict(fast=True, cl=True, amp=True, teacher=False),
}
CLI_VARIANTS = ("reference", "reference_cl", "fast", "fast_cl", "fast_amp_cl", "fast_cl_student_only")
LR, WEIGHT_DECAY = 3.5e-4, 5e-4  # the paper's finetuning Adam


@dataclass
class StepCase:
    """One benchmark problem: a round-0 ``MeanTeacher``, the step's three P x 4 batches (on ``device``),
    the step settings and losses, and the autocast dtype of the ``amp`` variants."""

    mt: MeanTeacher
    batches: list[Batch]
    settings: StepSettings
    crit: Criteria
    device: torch.device
    amp_dtype: torch.dtype


def amp_dtype_for(device: torch.device) -> torch.dtype:
    """bfloat16 on CPU and on CUDA GPUs that support it, else float16 (``DevicePolicy.step_autocast_dtype``)."""
    return torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16


def build_case(arch: str, height: int, width: int, batch: int, classes: int, device: torch.device | str,
               fusion_loss_weight: float = 0.0, seed: int = 0) -> StepCase:
    """A ``MeanTeacher`` of ``arch`` (random source weights from ``seed``, ``classes`` clusters) and three
    random batches [batch,3,height,width] with labels ``arange(batch // 4)`` x 4 instances."""
    dev = torch.device(device)
    cfg = load_config("demo", [f"model.arch={arch}"])
    torch.manual_seed(seed)
    mt = build_target_model(cfg, SourceModel(arch, 10).state_dict(), num_classes=classes).to(dev)
    g = torch.Generator().manual_seed(seed + 1)
    p = batch // 4
    batches = [(torch.randn(batch, 3, height, width, generator=g).to(dev),
                torch.arange(p).repeat_interleave(4).to(dev)) for _ in range(3)]
    return StepCase(mt, batches, StepSettings(fusion_loss_weight=fusion_loss_weight), Criteria(classes), dev,
                    amp_dtype_for(dev))


def prepare(case: StepCase, names: Sequence[str]) -> dict[str, tuple[MeanTeacher, torch.optim.Optimizer, list[Batch]]]:
    """Per variant name: its own copy of the model (channels_last where the variant says so), a fresh Adam
    and the batches in the variant's memory format."""
    state = {}
    for name in names:
        v = VARIANTS[name]
        m = copy.deepcopy(case.mt)
        if v["cl"]:
            m = m.to(memory_format=torch.channels_last)
        bs = [(x.contiguous(memory_format=torch.channels_last) if v["cl"] else x, y) for x, y in case.batches]
        state[name] = (m, make_optimizer(m, LR, WEIGHT_DECAY), bs)
    return state


def run_variant(case: StepCase, name: str, entry: tuple[MeanTeacher, torch.optim.Optimizer, list[Batch]],
                step: int) -> StepResult:
    """One optimisation step (global step ``step``) of variant ``name`` on its ``prepare`` entry."""
    v = VARIANTS[name]
    m, opt, bs = entry
    if v["fast"]:
        return fast_step(m, opt, bs, step, case.crit, case.settings, channels_last=v["cl"],
                         autocast_dtype=case.amp_dtype if v.get("amp") else None, teacher_pass=v.get("teacher", True))
    return reference_step(m, opt, bs, step, case.crit, case.settings)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(case: StepCase, names: Sequence[str], reps: int, warmup: int = 1,
                  deadline: Optional[float] = None) -> dict[str, list[float]]:
    """Seconds per step of each variant: ``warmup + reps`` rounds, each round one step of every variant in
    turn (interleaved, so machine load affects all alike), the first ``warmup`` rounds not recorded.
    Stops after a recorded round once ``time.perf_counter()`` passes ``deadline`` (at least one is recorded)."""
    state = prepare(case, names)
    times: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(warmup + reps):
        for name in names:
            sync(case.device)
            t0 = time.perf_counter()
            run_variant(case, name, state[name], rep)
            sync(case.device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - t0)
        if rep >= warmup and deadline is not None and time.perf_counter() > deadline:
            break
    return times


def median(xs: Sequence[float]) -> float:
    """The upper median (the element at ``len // 2`` of the sorted values)."""
    return sorted(xs)[len(xs) // 2]


def round_seconds(with_teacher: float, student_only: float, iters: int = 400, tail: int = 66) -> float:
    """Mean seconds per iteration of a round whose last ``tail`` of ``iters`` iterations run the teacher
    and Fuse forwards (``training.teacher_tail``: 66 of the paper's 400)."""
    return (tail * with_teacher + (iters - tail) * student_only) / iters


def bench(args: argparse.Namespace, threads: int) -> dict[str, list[float]]:
    torch.set_num_threads(threads)
    case = build_case(args.arch, args.height, args.width, args.batch, args.classes, args.device,
                      args.fusion_loss_weight)
    return time_variants(case, CLI_VARIANTS, args.reps, warmup=1)


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
        med = {k: median(v) for k, v in times.items()}
        mn = {k: min(v) for k, v in times.items()}
        for name, ts in times.items():
            same = "no (autocast)" if "amp" in name else "yes"
            up = med["reference"] / med[name]
            print(f"| {th} | {name} | {same} | {mn[name]:.3f} | {med[name]:.3f} | {up:.2f}x |")
        rnd = round_seconds(med["fast_cl"], med["fast_cl_student_only"])
        rmn = round_seconds(mn["fast_cl"], mn["fast_cl_student_only"])
        print(f"| {th} | round (paper: 400 it, teacher in the last 66) | yes (float32) | {rmn:.3f} | {rnd:.3f} | "
              f"{med['reference'] / rnd:.2f}x |")
    print(f"# load avg after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
