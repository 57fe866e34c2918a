"""The adaptation round as one loop shared by ``lf2 run-local`` and the pipeline's several-rounds task.

A round is extract-features -> cluster -> finetune (the table's stages, called as themselves), each
output written where ``place(stage, round, inputs)`` says. ``StageRunner`` skips a stage whose output is
complete (``storage.is_complete``), so a process killed in round r and started again continues with the
first unfinished stage (finetune itself resumes inside its round from its training state); after each
stage, run or skipped, the ``after(stage, round, out)`` hook sees its output (the pipeline logs it to
MLflow there). The stage functions read their inputs from those outputs, so running K rounds in one
process changes nothing in what each stage computes; inside ``kept_models.models_in_memory()`` (both
callers) the networks a finetune just wrote are handed to the next extract-features and finetune in
memory instead of being read back (and digested) from their files, as long as those are unchanged
(ResNet-50: 2 x 1.0 s of reading + 0.25 s of hashing per round saved on this CPU, more from S3).

``stage_summary(stage, out)`` is the small numeric summary of a stage output, read back from the output
itself (what the pipeline logs per round, what ``run_local``'s summary lists).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

from .. import artifacts, storage
from ..checkpoint import release_work_dir, work_dir
from ..cluster.labels import REPORTED_STATS
from ..config import Config
from .table import CLUSTER, EVALUATE, EXTRACT, FINETUNE, PRETRAIN, stage

log = logging.getLogger(__name__)

ROUND_STAGES = (EXTRACT, CLUSTER, FINETUNE)
CLUSTER_KEYS = REPORTED_STATS  # lf2core.cluster.labels
EXTRACT_KEYS = ("images", "dim", "seconds", "images_per_s")

Place = Callable[[str, int, tuple[str, ...]], str]  # (stage name, round, input locations) -> output location
After = Callable[[str, int, str], None]  # (stage name, round, output location) -> None


def stage_summary(name: str, out: str) -> dict[str, Any]:
    """What a finished stage output reports: extract-features ``EXTRACT_KEYS`` of its ``meta.json``;
    cluster ``{label set: {CLUSTER_KEYS...}}`` of its ``stats.json``; pretrain/finetune the ``final``
    metrics; evaluate its metrics. ``{}`` for other stages."""
    if name == EXTRACT:
        meta = artifacts.read_json(storage.join(out, artifacts.FEATURES_META))
        return {k: meta[k] for k in EXTRACT_KEYS if k in meta}
    if name == CLUSTER:
        return {s: {k: v[k] for k in CLUSTER_KEYS if k in v}
                for s, v in artifacts.read_cluster_stats(out).items() if isinstance(v, dict)}
    if name in (PRETRAIN, FINETUNE):
        return artifacts.read_final_metrics(out)
    if name == EVALUATE:
        return artifacts.read_metrics(out)
    return {}


class StageRunner:
    """Runs stages of the table into given locations, skipping complete outputs; times each stage
    (``seconds``: stage name prefix -> total seconds actually run) and calls ``after`` on each output."""

    def __init__(self, cfg: Config, after: Optional[After] = None) -> None:
        self.cfg = cfg
        self.after = after
        self.seconds: dict[str, float] = {}

    def run(self, name: str, out: str, *inputs: str, round_index: Optional[int] = None, **params: Any) -> str:
        """``out``, after running stage ``name`` into it unless it is complete (then only a stale training
        state of a run killed between committing and releasing it is dropped)."""
        if not storage.is_complete(out):
            t0 = time.time()
            if round_index is not None and any(p.name == "round_index" for p in stage(name).params):
                params["round_index"] = round_index
            stage(name)(self.cfg, *inputs, out, **params)
            key = name.split("-")[0]
            self.seconds[key] = self.seconds.get(key, 0.0) + time.time() - t0
        elif name in (PRETRAIN, FINETUNE):
            release_work_dir(work_dir(out, name))
        if self.after is not None:
            self.after(name, -1 if round_index is None else round_index, out)
        return out

    def round(self, r: int, data: str, model: str, place: Place) -> tuple[str, dict[str, Any]]:
        """Round ``r`` from ``model``: the new model's location and the round's entry
        ``{"round", "cluster": {set: CLUSTER_KEYS}, "finetune": final metrics}``. Call it inside
        ``kept_models.models_in_memory()`` to hand the finetuned networks to the next round in memory."""
        feats = self.run(EXTRACT, place(EXTRACT, r, (data, model)), data, model, round_index=r)
        labels = self.run(CLUSTER, place(CLUSTER, r, (feats,)), feats, round_index=r)
        model = self.run(FINETUNE, place(FINETUNE, r, (data, labels, model)), data, labels, model, round_index=r)
        entry = {"round": r, "cluster": stage_summary(CLUSTER, labels), "finetune": stage_summary(FINETUNE, model)}
        c = entry["cluster"].get("global", {})
        log.info("round %d/%d: %s global clusters, NMI %s", r + 1, self.cfg.finetune.rounds, c.get("num_clusters"),
                 f"{c['nmi']:.3f}" if "nmi" in c else "n/a")
        return model, entry
