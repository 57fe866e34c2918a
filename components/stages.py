"""KFP v2 lightweight components: one thin typed adapter per lf2 stage.

Each function body imports lf2core lazily (it runs in the project image, or in the same venv under
``kfp.local.SubprocessRunner(use_venv=False)``), calls the stage function from ``lf2core.stages`` and
records outputs/metrics. ``build_components(image)`` turns them into components with ``base_image``
set to the project image and ``install_kfp_package=False`` (the image already has kfp).

The stage components are derived from the stage table (``lf2core.stages.table``): ``_runtime.run_stage``
looks the stage up by name, resolves its inputs, places its output and calls its function; each function
here only declares the KFP types (``tests/test_pipeline_compile.py`` checks them against the table) and
logs what the pipeline shows.

Data flow: ``resolve-config`` turns recipe + overrides + data URIs into one validated YAML string that
every other component receives as ``config``; stage outputs are directory artifacts (Dataset / Model /
Artifact) or, with ``object_prefix``, s3:// prefixes recorded in the artifact (see ``_runtime``).
MLflow: ``start-run`` creates the pipeline's run (uncached) and returns its id; the round stages,
evaluate and register log into it with ``step = round``.
"""


from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import default_image

# what `make images` tags for this checkout (lf2:<version>-<git sha>), or $LF2_IMAGE
DEFAULT_IMAGE = default_image()


def resolve_config(recipe: str, overrides: str, source_root: str, target_root: str, experiment: str,
                   compiled_rounds: int, config_file: Output[Artifact]) -> str:
    """recipe + overrides (JSON list of key=value) + data URIs -> the validated config as YAML."""
    from components import _runtime as rt

    rt.setup_logging()
    text = rt.resolve_config(recipe, overrides, source_root, target_root, experiment, compiled_rounds)
    rt.write_text(config_file, text)
    return text


def prepare_data(config: str, object_prefix: str, data: Output[Dataset]) -> None:
    """Stage prepare-data: dataset manifest (+ synthetic domains when the recipe asks for them)."""
    from components import _runtime as rt

    _, out, result = rt.run_stage("prepare-data", config, object_prefix, data, {})
    rt.record_output(data, out, result)


def pretrain_source(config: str, object_prefix: str, data: Input[Dataset], model: Output[Model],
                    metrics: Output[Metrics]) -> None:
    """Stage pretrain-source: supervised source model (cached across pipeline runs with equal inputs)."""
    from components import _runtime as rt

    _, out, result = rt.run_stage("pretrain-source", config, object_prefix, model, {"data": data})
    rt.record_output(model, out, result)
    rt.log_kfp_metrics(metrics, result)


def start_run(config: str, run_name: str, resume_run_id: str, data: Input[Dataset],
              source_model: Input[Model], pipeline_job_name: str = "", pipeline_job_id: str = "") -> str:
    """Create (or resume) the pipeline's MLflow run: params, config, lineage tags (with the KFP run that
    made it), dataset inputs, the pretraining curves (step = epoch) and the source-only point of the
    adaptation curve. Returns the run id ("" when tracking is off). Never cached."""
    from components import _runtime as rt

    return rt.start_run(config, run_name, resume_run_id, data, source_model,
                        pipeline_run={"name": pipeline_job_name, "id": pipeline_job_id})


def extract_features(config: str, object_prefix: str, run_id: str, round_index: int, data: Input[Dataset],
                     model: Input[Model], features: Output[Artifact]) -> None:
    """Stage extract-features: fusion features of the target train split for one round."""
    from components import _runtime as rt

    _, out, result = rt.run_stage("extract-features", config, object_prefix, features, {"data": data, "model": model},
                                  run_id=run_id, round_index=round_index)
    rt.record_output(features, out, result)
    rt.log_round_output("extract-features", out, round_index, run_id)


def cluster(config: str, object_prefix: str, run_id: str, round_index: int, features: Input[Artifact],
            labels: Output[Artifact], summary: Output[Markdown]) -> None:
    """Stage cluster: pseudo labels of the three feature sets; stats + plot to MLflow (step = round)."""
    from components import _runtime as rt

    _, out, _ = rt.run_stage("cluster", config, object_prefix, labels, {"features": features}, run_id=run_id,
                             round_index=round_index)
    rt.record_output(labels, out)
    rows = rt.log_round_output("cluster", out, round_index, run_id)
    rt.write_text(summary, rt.markdown_table(f"Clustering, round {round_index}", rows))


def finetune(config: str, object_prefix: str, run_id: str, round_index: int, data: Input[Dataset],
             labels: Input[Artifact], model: Input[Model], finetuned: Output[Model],
             metrics: Output[Metrics]) -> None:
    """Stage finetune: one round of mean-teacher training on the round's pseudo labels."""
    from components import _runtime as rt

    _, out, result = rt.run_stage("finetune", config, object_prefix, finetuned,
                                  {"data": data, "labels": labels, "model": model}, run_id=run_id,
                                  round_index=round_index)
    rt.record_output(finetuned, out, result)
    rt.log_kfp_metrics(metrics, result or {})
    rt.log_round_output("finetune", out, round_index, run_id)


def adapt_rounds(config: str, object_prefix: str, run_id: str, first_round: int, num_rounds: int,
                 data: Input[Dataset], model: Input[Model], rounds: Output[Artifact], finetuned: Output[Model],
                 metrics: Output[Metrics], summary: Output[Markdown]) -> None:
    """Rounds ``first_round`` .. ``first_round + num_rounds - 1`` (extract-features -> cluster -> finetune
    each) in one task (``lf2 pipeline compile --rounds-per-task K``): the same stage functions, outputs,
    MLflow metrics and resume as one task per stage, without a pod start and library import per stage."""
    from components import _runtime as rt

    out, entries = rt.run_rounds(config, object_prefix, run_id, first_round, num_rounds, data, model, rounds,
                                 finetuned)
    final = entries[-1]["finetune"]
    rt.record_output(finetuned, out, final)
    rt.log_kfp_metrics(metrics, final)
    rows = [(f"round {e['round']} global clusters", e["cluster"].get("global", {}).get("num_clusters", "-"))
            for e in entries] + [(f"finetune {k}", v) for k, v in final.items()]
    rt.write_text(summary, rt.markdown_table(f"Rounds {first_round}-{first_round + num_rounds - 1}", rows))


def evaluate(config: str, object_prefix: str, run_id: str, data: Input[Dataset], model: Input[Model],
             results: Output[Artifact], metrics: Output[Metrics], ranklist: Output[HTML],
             summary: Output[Markdown]) -> None:
    """Stage evaluate: mAP / CMC of the final teacher on the target query/gallery."""
    from components import _runtime as rt
    from lf2core import artifacts

    cfg, out, result = rt.run_stage("evaluate", config, object_prefix, results, {"data": data, "model": model},
                                    run_id=run_id)
    rt.record_output(results, out, result)
    rt.log_kfp_metrics(metrics, result, ["mAP", "R1", "R5", "R10", "mINP"])
    rt.log_evaluation(cfg, out, result, run_id)
    png = rt.local_file(out, artifacts.RANKLIST)
    rt.write_text(ranklist, rt.png_html("Rank lists (query + top-10, hits marked)", png))
    rows = [(k, result[k]) for k in ("mAP", "R1", "R5", "R10", "mINP") if k in result]
    rt.write_text(summary, rt.markdown_table("Target test split", rows))


def register(config: str, run_id: str, model: Input[Model], metrics: Input[Artifact],
             summary: Output[Markdown]) -> str:
    """Stage register: log the teacher to MLflow, register it as ``lf2-reid`` with alias ``candidate``,
    and close the pipeline's MLflow run. Returns the version ("" when tracking is off). Never cached."""
    from components import _runtime as rt

    cfg, _, result = rt.run_stage("register", config, "", None, {"model": model, "metrics": metrics}, run_id=run_id)
    version = str(result.get("version", "")) if result.get("registered") else ""
    rows = [("registered model", cfg.tracking.registered_model), ("version", version or "-"),
            ("alias", result.get("alias", "-")), ("mAP", result.get("mAP")), ("MLflow run", run_id or "-")]
    rt.write_text(summary, rt.markdown_table("Registered model", rows))
    return version


STAGE_FUNCTIONS = (resolve_config, prepare_data, pretrain_source, start_run, extract_features, cluster, finetune,
                   adapt_rounds, evaluate, register)


def build_components(image: str = DEFAULT_IMAGE) -> SimpleNamespace:
    """The components with ``base_image=image``; attribute names = function names."""
    return SimpleNamespace(**{
        f.__name__: dsl.component(f, base_image=image, install_kfp_package=False) for f in STAGE_FUNCTIONS
    })
