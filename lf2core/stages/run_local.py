"""The whole LF2 method in one process: ``lf2 run-local`` (development, demo, benchmark).

``run_local(cfg, out, data=None, source_model=None, eval_every=0)`` calls the SAME stage
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

The per-round evaluations (``eval_every``; ``lf2 run-local`` takes ``eval.every_rounds`` unless
``--eval-every`` is given) use the TARGET TEST split; they are for reporting curves only (the
benchmark's plots, the MLflow adaptation curve) -- nothing reads them back, no round or model is selected
with them: the final teacher is the one evaluated last and registered. ``paper_comparable`` is the one
exception, labelled as such: the best of those test-split figures, as the released code reports them
(test-set selection; never used for promotion).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional

from .. import artifacts, kept_models, run_log, storage, tracking
from ..config import Config, ConfigError
from ..errors import StorageError
from .rounds import Place, StageRunner, stage_summary
from .table import CLUSTER, EVALUATE, EXTRACT, FINETUNE, PREPARE, PRETRAIN

log = logging.getLogger(__name__)


def round_dir(out: str, r: int) -> str:
    return storage.join(out, f"round_{r:02d}")


def target_as_source_manifest(data: str, out: str) -> str:
    """A prepare-data output whose SOURCE is the target dataset of ``data`` (the oracle baseline: the
    same pretraining recipe with the true target identities). Writes ``out/manifest.json``."""
    if storage.exists(storage.join(out, artifacts.MANIFEST)):
        return out
    m = artifacts.read_manifest(data)
    with storage.output_dir(out, PREPARE) as tmp:
        artifacts.write_manifest(str(tmp), m["target"], m["target"])
    return out


# keys that may change between a run and its resumption: they do not change what a finished stage computed
# (``finetune.rounds``: more rounds extend a run; each round depends only on the rounds before it)
RESUMABLE_KEYS = ("finetune.rounds", "data.num_workers", "data.cache_dir", "eval.batch_size", "recipe")


def _claim_run_dir(out: str) -> None:
    """A run directory is new, empty, or one that ``run_local`` started (it holds ``run_config.json``)."""
    if storage.present_files(out) and not storage.exists(storage.join(out, artifacts.RUN_CONFIG)) \
            and not storage.overwrite_allowed():
        raise StorageError(f"{out}: is not empty and is not an lf2 run directory (no {artifacts.RUN_CONFIG}); use "
                           f"an empty or new directory (or --overwrite: lf2 deletes nothing there)")


def _check_run_config(cfg: Config, out: str, data: str, source_model: str) -> None:
    """Record the config of ``out`` on its first start; refuse to resume it with a different one.

    Stage outputs are reused when complete, so resuming a run directory with other settings would mix
    results of two configs silently. Raises ``ConfigError`` naming the directory and the keys that differ.
    """
    cur = {k: v for k, v in cfg.flat().items() if not k.startswith("tracking.") and k not in RESUMABLE_KEYS}
    cur["_inputs.data"], cur["_inputs.source_model"] = data, source_model
    uri = storage.join(out, artifacts.RUN_CONFIG)
    if storage.exists(uri):
        old = artifacts.read_json(uri)
        diff = sorted(k for k in set(old) | set(cur) if old.get(k, "<unset>") != cur.get(k, "<unset>"))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {cur.get(k, '<unset>')!r}" for k in diff[:4])
            more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
            raise ConfigError(f"{uri}: this run directory was started with another config ({shown}{more}); "
                              f"use a new output directory or the original settings")
        return
    storage.write_bytes(uri, (json.dumps(cur, indent=2, sort_keys=True, default=str) + "\n").encode())


TEST_SET_SELECTION = ("best round chosen on the TARGET TEST split, as the released code reports its figures "
                      "(test-set selection: not an estimate of accuracy on new data; never used for promotion)")


def paper_comparable(rounds: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The figure comparable to the released code's reports: the per-round evaluation with the highest
    target-test mAP (``eval_every`` rounds; the last one is the final teacher), labelled as test-set
    selection. ``{"selection": TEST_SET_SELECTION, "round", "mAP", "R1", ...}``; None without per-round
    evaluations. The honest figure stays ``metrics`` (the final teacher)."""
    evals = [(r["round"], r["eval"]) for r in rounds if "eval" in r]
    if not evals:
        return None
    best_round, best = max(evals, key=lambda e: (e[1]["mAP"], -e[0]))
    return {"selection": TEST_SET_SELECTION, "round": best_round, **best}


def _place(out: str) -> Place:
    """Round outputs of a run directory: ``out/round_NN/{features,labels,model}``."""
    names = {EXTRACT: "features", CLUSTER: "labels", FINETUNE: "model"}
    return lambda name, r, inputs: storage.join(round_dir(out, r), names[name])


def run_local(
    cfg: Config,
    out: str,
    data: Optional[str] = None,
    source_model: Optional[str] = None,
    eval_every: int = 0,
    mlflow: bool = False,
    run_name: Optional[str] = None,
) -> dict[str, Any]:
    """prepare -> pretrain -> rounds x (extract -> cluster -> finetune) -> evaluate.

    ``mlflow``: also log the run to MLflow (``cfg.tracking``; ``lf2 run-local --mlflow``) exactly as the
    pipeline does (``lf2core.run_log``: the adaptation curve at the ``eval_every`` rounds evaluated here,
    clustering, plots, summary metrics, lineage, system metrics); the run is named ``run_name``.

    Returns ``{"metrics": final eval, "source_only": {...} | None,
    "rounds": [{"round", "cluster": {set: stats}, "eval": {...}?, "finetune": {...}}], "seconds": {...},
    "paper_comparable": best-of-rounds on the target test split (``paper_comparable``) | None,
    "run_id": the MLflow run | None}``.
    """
    _claim_run_dir(out)
    own_data, own_source = data is None, source_model is None
    data = storage.join(out, "data") if own_data else data
    source_model = storage.join(out, "pretrain") if own_source else source_model
    # recorded before any stage runs: a run killed at any point resumes, one with other settings is refused
    _check_run_config(cfg, out, data, source_model)
    run_id = tracking.create_run(cfg, run_name, {"lf2.runner": "run-local"}) if mlflow else None
    with tracking.ended_on_error(run_id), tracking.system_metrics(run_id):
        return _run(cfg, out, data, source_model, eval_every, own_data, own_source, run_id)


def _run(cfg: Config, out: str, data: str, source_model: str, eval_every: int, own_data: bool, own_source: bool,
         run_id: Optional[str]) -> dict[str, Any]:
    def after(name: str, r: int, output: str) -> None:
        run_log.log_stage_output(cfg, name, output, r, run_id)  # the curve points are evaluated below

    runner = StageRunner(cfg, after=after if run_id else None)
    if own_data:
        runner.run(PREPARE, data)
    if own_source:
        runner.run(PRETRAIN, source_model, data)
    run_log.log_run_start(cfg, run_id, data, source_model)
    source_only = None
    if storage.exists(storage.join(source_model, artifacts.METRICS)):
        final = artifacts.read_final_metrics(source_model)
        source_only = {k[len("target_"):]: v for k, v in final.items() if k.startswith("target_")} or None

    model, rounds, n_rounds = source_model, [], cfg.finetune.rounds
    with kept_models.models_in_memory():
        for r in range(n_rounds):
            model, entry = runner.round(r, data, model, _place(out))
            if run_log.curve_due(eval_every, r, n_rounds):
                # report only (target test split), never used for selection
                t0 = time.time()
                ev = runner.run(EVALUATE, storage.join(round_dir(out, r), "eval"), data, model)
                entry["eval"] = stage_summary(EVALUATE, ev)
                run_log.log_curve_point(cfg, run_id, r + 1, entry["eval"], ev, time.time() - t0)
            rounds.append(entry)
    # the final model's evaluation sits with its round, so a run extended by more rounds evaluates anew
    ev = storage.join(round_dir(out, n_rounds - 1), "eval") if n_rounds > 0 else storage.join(out, "eval")
    metrics = artifacts.read_metrics(runner.run(EVALUATE, ev, data, model))
    run_log.log_final(cfg, run_id, metrics, ev, seconds=runner.seconds)
    if n_rounds > 0 and rounds and eval_every > 0:
        rounds[-1]["eval"] = metrics
    summary = {"metrics": metrics, "source_only": source_only, "rounds": rounds, "seconds": runner.seconds,
               "model": model, "variant": cfg.finetune.variant, "cluster_method": cfg.cluster.method,
               "paper_comparable": paper_comparable(rounds), "run_id": run_id}
    pc = summary["paper_comparable"]
    if pc is not None:
        log.info("final teacher: mAP %.1f%% R1 %.1f%%; paper-comparable (round %d, %s): mAP %.1f%% R1 %.1f%%",
                 100 * metrics["mAP"], 100 * metrics["R1"], pc["round"] + 1, TEST_SET_SELECTION, 100 * pc["mAP"],
                 100 * pc["R1"])
    storage.write_bytes(storage.join(out, artifacts.RUN_SUMMARY),
                        (json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n").encode())
    return summary
