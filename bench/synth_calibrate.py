"""Calibrate the synthetic two-domain data with three supervised runs (never with UDA results).

    .venv/bin/python bench/synth_calibrate.py [--work DIR] [--ids 200] [--test-ids 100] [--seed 0]
                                              [--iters N] [--runs source,adabn,oracle] [--json OUT]

Runs (ResNet-18-narrow, 64x32 input, label-smoothed CE + soft-margin batch-hard triplet, the demo
recipe's pretrain schedule by default):

- ``source``: train on domain a's train split, test on b (query/gallery). Also reports a -> a.
- ``adabn``: the source model with its BatchNorm statistics recomputed on b's train images (no labels,
  no gradient), tested on b.
- ``oracle``: train on b's train split (with labels), test on b.

Targets (docs/synthetic.md, from the real Duke -> Market figures): oracle mAP 75-90; source-only
25-45 % of the oracle; AdaBN below the oracle. As a diagnostic (not a target) it also prints how the
features of b's train images cluster (k-means with as many clusters as identities): NMI with the
identity and with the camera, for the source-only, AdaBN and oracle features.

To fit a shared 2-core machine, images are decoded and resized to 64x32 once (the lf2 test transform:
bicubic, antialiased, ImageNet normalisation) and the training augmentation of
``lf2core.data.transforms.train_transform`` (horizontal flip, zero-pad 10 + random 64x32 crop) is applied
batch-wise on tensors; batches come from ``lf2core.data.samplers.IdentityBatchSampler`` (P x K,
preferring other cameras) as in the pipeline. The a-run and the b-run are trained in two parallel
processes with one torch thread each (``--parallel 0`` runs them one after the other).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from lf2core.config import load_config
from lf2core.data import datasets, loaders, synthetic, transforms
from lf2core.data.samplers import IdentityBatchSampler
from lf2core.evaluation import evaluate_rank, pairwise_distance
from lf2core.losses import CrossEntropyLabelSmooth, SoftTripletLoss, TripletLoss
from lf2core.models.source import SourceModel
from lf2core.runtime import seed_everything

H, W = 64, 32
ARCH = "resnet18_narrow"


def ensure_domain(work: Path, domain: str, ids: int, test_ids: int, seed: int, version: str) -> Path:
    """Generate domain ``domain`` under ``work`` unless an output of this generator version is there."""
    root = work / f"{domain}_v{version}_i{ids}_t{test_ids}_s{seed}"
    if not (root / "_COMPLETE").exists():
        stats = synthetic.write_domain(domain, root, ids=ids, test_ids=test_ids, seed=seed, version=version)
        print(f"generated {domain}: {stats['images']} images, {stats['images_per_s']} img/s", flush=True)
    return root


_CACHE: dict[tuple[str, ...], torch.Tensor] = {}


def load_tensors(samples: list[datasets.Sample]) -> torch.Tensor:
    """All images of ``samples`` through the lf2 test transform: float32 [N, 3, 64, 32] (normalised)."""
    key = tuple(s.path for s in samples)
    if key not in _CACHE:
        tf = transforms.test_transform(H, W)
        _CACHE[key] = torch.stack([tf(loaders.load_image(s.path)) for s in samples])
    return _CACHE[key]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Batch version of train_transform's random part on normalised tensors [B,3,H,W]: horizontal flip
    (p=0.5), pad 10 with black (the normalised value of 0, as the PIL transform pads before normalising),
    random HxW crop."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], torch.flip(x, dims=[3]), x)
    black = (-torch.tensor(transforms.IMAGENET_MEAN) / torch.tensor(transforms.IMAGENET_STD))[None, :, None, None]
    pad = transforms.PAD
    big = black.expand(b, 3, H + 2 * pad, W + 2 * pad).clone()
    big[:, :, pad:pad + H, pad:pad + W] = x
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(H)[None, :])[:, None, :, None].expand(b, 3, H, W + 2 * pad)
    big = torch.gather(big, 2, rows)
    cols = (ox[:, None] + torch.arange(W)[None, :])[:, None, None, :].expand(b, 3, H, W)
    return torch.gather(big, 3, cols)


def train(splits: datasets.Splits, iters: int, seed: int, cfg: Any, label: str) -> SourceModel:
    """Supervised training on ``splits.train`` with the pretrain recipe of ``cfg`` scaled to ``iters``."""
    seed_everything(seed)
    pc = cfg.pretrain
    labels = datasets.relabel(splits.train)
    imgs = load_tensors(splits.train)
    lab_t = torch.from_numpy(labels)
    model = SourceModel(ARCH, int(labels.max()) + 1, "none", last_stride=1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=pc.lr, weight_decay=pc.weight_decay)
    total = pc.epochs * pc.iters_per_epoch
    scale = iters / total
    warm = pc.warmup_epochs * pc.iters_per_epoch * scale
    miles = [m * pc.iters_per_epoch * scale for m in pc.milestones]

    def lr_at(it: int) -> float:
        f = pc.warmup_factor + (1 - pc.warmup_factor) * it / warm if it < warm else 1.0
        return pc.lr * f * pc.gamma ** sum(it >= m for m in miles)

    ce = CrossEntropyLabelSmooth(int(labels.max()) + 1, pc.label_smoothing)
    tri = SoftTripletLoss() if pc.triplet_margin == 0 else TripletLoss(pc.triplet_margin)
    camids = np.array([s.camid for s in splits.train])
    sampler = IdentityBatchSampler(labels, camids, pc.batch_size, pc.num_instances, iters, seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for it, idx in enumerate(sampler):
        idx_t = torch.as_tensor(idx)
        img, lab = augment(imgs[idx_t], gen), lab_t[idx_t]
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        feat, logits = model(img)
        loss = ce(logits, lab) + tri(feat, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (it + 1) % 100 == 0 or it + 1 == iters:
            el = time.perf_counter() - t0
            print(f"  [{label}] iter {it + 1}/{iters} loss {loss.item():.3f} "
                  f"({(it + 1) * pc.batch_size / el:.0f} img/s)", flush=True)
    return model


@torch.no_grad()
def features(model: torch.nn.Module, samples: list[datasets.Sample]) -> np.ndarray:
    """L2-normalised eval features [N, C] (image + horizontal flip, summed then normalised)."""
    model.eval()
    out = []
    for img in load_tensors(samples).split(256):
        f = model(img) + model(torch.flip(img, dims=[3]))
        out.append(torch.nn.functional.normalize(f, dim=1))
    return torch.cat(out).numpy()


@torch.no_grad()
def adabn(model: SourceModel, samples: list[datasets.Sample]) -> SourceModel:
    """A copy of ``model`` whose BatchNorm running statistics are recomputed (cumulative average) on
    ``samples`` in train mode; no parameter changes."""
    m = copy.deepcopy(model)
    bns = [x for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    m.train()
    for img in load_tensors(samples).split(128):
        m(img)
    return m


def evaluate(model: torch.nn.Module, splits: datasets.Splits) -> dict[str, float]:
    q, g = features(model, splits.query), features(model, splits.gallery)
    r = evaluate_rank(pairwise_distance(q, g), np.array([s.pid for s in splits.query]),
                      np.array([s.pid for s in splits.gallery]), np.array([s.camid for s in splits.query]),
                      np.array([s.camid for s in splits.gallery]))
    return {"mAP": round(100 * r["mAP"], 2), "rank1": round(100 * float(r["cmc"][0]), 2)}


def cluster_nmi(model: torch.nn.Module, samples: list[datasets.Sample], seed: int) -> dict[str, float]:
    """k-means (k = number of identities) of the features of ``samples``: NMI with identity and camera."""
    f = features(model, samples)
    pids = np.array([s.pid for s in samples])
    cams = np.array([s.camid for s in samples])
    lab = KMeans(len(set(pids.tolist())), n_init=1, random_state=seed).fit_predict(f)
    return {"nmi_id": round(float(normalized_mutual_info_score(pids, lab)), 3),
            "nmi_cam": round(float(normalized_mutual_info_score(cams, lab)), 3),
            # reference: the camera NMI of a perfect identity clustering (identities visit few cameras)
            "nmi_cam_true_ids": round(float(normalized_mutual_info_score(cams, pids)), 3)}


def run_role(role: str, a: datasets.Splits, b: datasets.Splits, iters: int, seed: int, data_seed: int,
             cfg: Any) -> dict[str, Any]:
    """``a``: train on a -> a->a, source-only a->b, AdaBN; ``b``: train on b -> oracle b->b."""
    res: dict[str, Any] = {}
    t = time.perf_counter()
    model = train(a if role == "a" else b, iters, seed, cfg, role)
    res[f"train_{role}_s"] = round(time.perf_counter() - t, 1)
    if role == "a":
        res["a_to_a"] = evaluate(model, a)
        res["source_only_a_to_b"] = evaluate(model, b)
        res["source_only_b_clusters"] = cluster_nmi(model, b.train, data_seed)
        ad = adabn(model, b.train)
        res["adabn_a_to_b"] = evaluate(ad, b)
        res["adabn_b_clusters"] = cluster_nmi(ad, b.train, data_seed)
    else:
        res["oracle_b_to_b"] = evaluate(model, b)
        res["oracle_b_clusters"] = cluster_nmi(model, b.train, data_seed)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/lf2_synth_calib")
    ap.add_argument("--ids", type=int, default=200)
    ap.add_argument("--test-ids", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="data seed")
    ap.add_argument("--train-seed", type=int, default=1)
    ap.add_argument("--version", default=synthetic.GENERATOR_VERSION, choices=synthetic.VERSIONS,
                    help="generator version to calibrate")
    ap.add_argument("--iters", type=int, default=0, help="training iterations (0: the demo recipe's)")
    ap.add_argument("--parallel", type=int, default=1, help="1: train the a- and b-runs in two processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    ap.add_argument("--role", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config("demo")
    iters = args.iters or cfg.pretrain.epochs * cfg.pretrain.iters_per_epoch
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    a = datasets.load("market1501", str(ensure_domain(work, "a", args.ids, args.test_ids, args.seed, args.version)))
    b = datasets.load("market1501", str(ensure_domain(work, "b", args.ids, args.test_ids, args.seed, args.version)))
    if args.role:  # child process
        res = run_role(args.role, a, b, iters, args.train_seed, args.seed, cfg)
        Path(args.json).write_text(json.dumps(res))
        return 0
    res: dict[str, Any] = {"generator_version": args.version, "ids": args.ids,
                           "test_ids": args.test_ids, "data_seed": args.seed, "train_seed": args.train_seed,
                           "iters": iters, "batch_size": cfg.pretrain.batch_size, "arch": ARCH,
                           "input": f"{H}x{W}"}
    t0 = time.perf_counter()
    if args.parallel:
        procs = []
        for role in ("a", "b"):
            cmd = [sys.executable, __file__, "--role", role, "--json", str(work / f"role_{role}.json")]
            for k in ("work", "ids", "test_ids", "seed", "train_seed", "iters", "threads", "version"):
                cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            procs.append(subprocess.Popen(cmd))
        if any(p.wait() != 0 for p in procs):
            print("a training process failed", file=sys.stderr)
            return 1
        for role in ("a", "b"):
            res.update(json.loads((work / f"role_{role}.json").read_text()))
    else:
        for role in ("a", "b"):
            res.update(run_role(role, a, b, iters, args.train_seed, args.seed, cfg))
    o = res["oracle_b_to_b"]["mAP"]
    res["source_over_oracle"] = round(res["source_only_a_to_b"]["mAP"] / o, 3)
    res["adabn_over_oracle"] = round(res["adabn_a_to_b"]["mAP"] / o, 3)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    res["loadavg_1m"] = round(__import__("os").getloadavg()[0], 2)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
