"""The whole LF2 method in one process: ``lf2 run-local`` (development, demo, benchmark).

``run_local(cfg, out, data=None, source_model=None, on_metrics=None, eval_every=0)`` calls the SAME stage
functions as the KFP pipeline, with their outputs under ``out/``::

    out/data/                      prepare_data            (skipped when ``data`` is given)
    out/pretrain/                  pretrain_source         (skipped when ``source_model`` is given)
    out/round_00/features/         extract_features        (round 0 from the pretrain output)
    out/round_00/labels/           cluster
    out/round_00/model/            finetune                (next round extracts with this model)
    out/round_00/eval/             evaluate, every ``eval_every`` rounds (optional)
    ...
    out/round_NN/eval/             evaluate (the final teacher, last round; ``out/eval/`` with 0 rounds)
    out/run_config.json            the settings the run was started with
    out/summary.json               final metrics + per-round cluster statistics

Resumable: a stage whose output directory is complete (``lf2core.storage.is_complete``) is skipped, and
finetune resumes inside a round from its own training state, so re-running the same command after a
crash continues where it stopped. Resuming with settings that would change a finished stage is refused
(``ConfigError``); a larger ``finetune.rounds`` extends a finished run.

The per-round evaluations (``eval_every``) use the TARGET TEST split; they are for reporting curves only
(the benchmark's plots) -- nothing reads them back, no round or model is selected with them: the final
teacher is the one evaluated last and registered.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Optional

from .. import storage
from ..config import Config, ConfigError
from ..errors import DataError, StorageError

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]

CLUSTER_KEYS = ("num_clusters", "outlier_ratio", "nmi", "ari", "nmi_camera", "pairwise_precision", "pairwise_recall")


def _read_json(uri: str) -> Any:
    try:
        return json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as e:
        raise DataError(f"{uri}: invalid JSON ({e})") from None


def round_dir(out: str, r: int) -> str:
    return storage.join(out, f"round_{r:02d}")


def target_as_source_manifest(data: str, out: str) -> str:
    """A prepare-data output whose SOURCE is the target dataset of ``data`` (the oracle baseline: the
    same pretraining recipe with the true target identities). Writes ``out/manifest.json``."""
    from ..data.manifest import read_manifest, write_manifest

    if storage.exists(storage.join(out, "manifest.json")):
        return out
    m = read_manifest(data)
    with storage.output_dir(out, "prepare-data") as tmp:
        write_manifest(str(tmp), m["target"], m["target"])
    return out


# keys that may change between a run and its resumption: they do not change what a finished stage computed
# (``finetune.rounds``: more rounds extend a run; each round depends only on the rounds before it)
RESUMABLE_KEYS = ("finetune.rounds", "data.num_workers", "data.cache_dir", "eval.batch_size", "recipe")


def _claim_run_dir(out: str) -> None:
    """A run directory is new, empty, or one that ``run_local`` started (it holds ``run_config.json``)."""
    if storage.present_files(out) and not storage.exists(storage.join(out, "run_config.json")) \
            and not storage.overwrite_allowed():
        raise StorageError(f"{out}: is not empty and is not an lf2 run directory (no run_config.json); use an "
                           f"empty or new directory (or --overwrite: lf2 deletes nothing there)")


def _check_run_config(cfg: Config, out: str, data: str, source_model: str) -> None:
    """Record the config of ``out`` on its first start; refuse to resume it with a different one.

    Stage outputs are reused when complete, so resuming a run directory with other settings would mix
    results of two configs silently. Raises ``ConfigError`` naming the directory and the keys that differ.
    """
    cur = {k: v for k, v in cfg.flat().items() if not k.startswith("tracking.") and k not in RESUMABLE_KEYS}
    cur["_inputs.data"], cur["_inputs.source_model"] = data, source_model
    uri = storage.join(out, "run_config.json")
    if storage.exists(uri):
        old = _read_json(uri)
        diff = sorted(k for k in set(old) | set(cur) if old.get(k, "<unset>") != cur.get(k, "<unset>"))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {cur.get(k, '<unset>')!r}" for k in diff[:4])
            more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
            raise ConfigError(f"{uri}: this run directory was started with another config ({shown}{more}); "
                              f"use a new output directory or the original settings")
        return
    storage.write_bytes(uri, (json.dumps(cur, indent=2, sort_keys=True, default=str) + "\n").encode())


def run_local(
    cfg: Config,
    out: str,
    data: Optional[str] = None,
    source_model: Optional[str] = None,
    on_metrics: Optional[MetricsCallback] = None,
    eval_every: int = 0,
) -> dict[str, Any]:
    """prepare -> pretrain -> rounds x (extract -> cluster -> finetune) -> evaluate.

    ``on_metrics(metrics, step)`` receives flat metrics with a stage prefix: ``pretrain/*`` (step = epoch),
    ``finetune/*`` (step = global iteration), ``cluster/<set>/*`` and ``eval_round/*`` (step = round + 1),
    ``eval/*`` (step = rounds). Returns ``{"metrics": final eval, "source_only": {...} | None,
    "rounds": [{"round", "cluster": {set: stats}, "eval": {...}?, "finetune": {...}}], "seconds": {...}}``.
    """
    from .cluster import cluster
    from .evaluate import evaluate
    from .extract import extract_features
    from .finetune import finetune
    from .pretrain import pretrain_source
    from .prepare import prepare_data

    _claim_run_dir(out)
    emit = on_metrics or (lambda m, s: None)

    def prefixed(prefix: str) -> MetricsCallback:
        return lambda m, s: emit({f"{prefix}/{k}": float(v) for k, v in m.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)}, s)

    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.time()
        res = fn()
        seconds[name] = seconds.get(name, 0.0) + time.time() - t0
        return res

    if data is None:
        data = storage.join(out, "data")
        if not storage.is_complete(data):
            timed("prepare", lambda: prepare_data(cfg, data))
    if source_model is None:
        source_model = storage.join(out, "pretrain")
        if not storage.is_complete(source_model):
            timed("pretrain", lambda: pretrain_source(cfg, data, source_model, on_metrics=prefixed("pretrain")))
    _check_run_config(cfg, out, data, source_model)
    source_only = None
    pm = storage.join(source_model, "metrics.json")
    if storage.exists(pm):
        final = _read_json(pm).get("final", {})
        source_only = {k[len("target_"):]: v for k, v in final.items() if k.startswith("target_")} or None

    model = source_model
    rounds: list[dict[str, Any]] = []
    n_rounds = cfg.finetune.rounds
    for r in range(n_rounds):
        rd = round_dir(out, r)
        feats, labels, mdl = storage.join(rd, "features"), storage.join(rd, "labels"), storage.join(rd, "model")
        if not storage.is_complete(feats):
            timed("extract", lambda: extract_features(cfg, data, model, feats))
        if not storage.is_complete(labels):
            timed("cluster", lambda: cluster(cfg, feats, labels, round_index=r))
        stats = _read_json(storage.join(labels, "stats.json"))
        entry: dict[str, Any] = {"round": r, "cluster": {}}
        for name, s in stats.items():
            if isinstance(s, dict):
                entry["cluster"][name] = {k: s[k] for k in CLUSTER_KEYS if k in s}
                prefixed(f"cluster/{name}")(entry["cluster"][name], r + 1)
        if not storage.is_complete(mdl):
            timed("finetune", lambda: finetune(cfg, data, labels, model, mdl, round_index=r,
                                               on_metrics=prefixed("finetune")))
        entry["finetune"] = _read_json(storage.join(mdl, "metrics.json")).get("final", {})
        model = mdl
        if eval_every > 0 and (r + 1) % eval_every == 0 and r + 1 < n_rounds:
            ev = storage.join(rd, "eval")  # report only (target test split), never used for selection
            if not storage.is_complete(ev):
                timed("evaluate", lambda: evaluate(cfg, data, model, ev))
            entry["eval"] = _read_json(storage.join(ev, "metrics.json"))
            prefixed("eval_round")(entry["eval"], r + 1)
        rounds.append(entry)
        c = entry["cluster"].get("global", {})
        log.info("round %d/%d: %s global clusters, NMI %s", r + 1, n_rounds, c.get("num_clusters"),
                 f"{c['nmi']:.3f}" if "nmi" in c else "n/a")

    # the final model's evaluation sits with its round, so a run extended by more rounds evaluates anew
    ev = storage.join(round_dir(out, n_rounds - 1), "eval") if n_rounds > 0 else storage.join(out, "eval")
    if not storage.is_complete(ev):
        timed("evaluate", lambda: evaluate(cfg, data, model, ev))
    metrics = _read_json(storage.join(ev, "metrics.json"))
    if n_rounds > 0 and rounds and eval_every > 0:
        rounds[-1]["eval"] = metrics
    prefixed("eval")(metrics, n_rounds)
    summary = {"metrics": metrics, "source_only": source_only, "rounds": rounds, "seconds": seconds,
               "model": model, "variant": cfg.finetune.variant, "cluster_method": cfg.cluster.method}
    storage.write_bytes(storage.join(out, "summary.json"),
                        (json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n").encode())
    return summary
