"""The LF2 UDA pipeline (KFP v2), unrolled over rounds at compile time.

    resolve-config -> prepare-data -> pretrain-source -> start-run
        -> round 0..R-1: extract-features -> cluster -> finetune
        -> evaluate -> register

With ``rounds_per_task`` K > 1 (``lf2 pipeline compile --rounds-per-task K``) the rounds run as
ceil(R / K) ``adapt-rounds`` tasks of K consecutive rounds each (the last one shorter when K does not
divide R): the same stage functions in one process, with the same per-round outputs (their S3 keys
under ``object_prefix`` are those of the one-task-per-stage pipeline), MLflow metrics and resume
(a retried task skips the rounds' complete outputs); one pod start and library import per K rounds
instead of three per round (overhead figures: docs/benchmarks.md).

Pipeline parameters: ``recipe``, ``overrides`` (JSON list of ``key=value``), ``source_root`` /
``target_root`` (dataset URIs; "" = the recipe's), ``mlflow_experiment``, ``object_prefix`` (s3://...;
"" = KFP artifact storage), ``run_name``, ``resume_run_id`` (continue an MLflow run: the rounds then
hit the KFP cache).

Targets: ``local`` (kfp.local; no Kubernetes settings) and ``kubeflow`` (kfp-kubernetes: GPU accelerator
type and limit on the training stages, CPU/memory requests and limits, S3 and MLflow credentials from
Kubernetes secrets as environment variables, ``/dev/shm`` as a memory emptyDir, image pull policy).
Distributed training (docs/distributed-pipeline.md): the training stages (``DISTRIBUTED_STAGES``:
pretrain-source, extract-features, finetune, and the ``adapt-rounds`` tasks) run with ``--gpus N`` > 1 as
``torchrun`` with N processes in their pod (GPU limit N; CPU, memory and ``/dev/shm`` x N; the task's
``LF2_NPROC_PER_NODE``), and with ``--nodes M`` as a Kubeflow Trainer TrainJob of M nodes x max(N, 1)
processes that the task creates, watches and deletes (the task itself: light, no GPU; ``LF2_TRAINJOB``
holds the ``components.trainjob.TrainJobSettings``). ``components.launch`` reads those variables.
Per-stage GPU, resource class and caching come from the stage table (``lf2core.stages.table``): caching is
on except for ``register`` (not cacheable there), ``resolve-config`` (its output must follow the recipe
file and the code, not only the recipe's name: it carries the code fingerprint, see
``components._runtime.resolve_config``) and ``start-run``; every task retries on failure with backoff.
"""


import re
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Tuple

from kfp import compiler, dsl

from components.launch import DISTRIBUTED_STAGES, NPROC_ENV, TRAINJOB_ENV
from components.stages import DEFAULT_IMAGE, build_components
from components.trainjob import DEFAULT_RUNTIME, TrainJobSettings
from lf2core.errors import Lf2Error
from lf2core.stages.table import BY_NAME, GPU_STAGES, STAGES

STAGE_COMPONENTS = tuple(s.name for s in STAGES)  # + resolve-config and start-run (pipeline plumbing, light)
ROUNDS_TASK = "adapt-rounds"  # K rounds in one task: the resources of the round stages (a GPU)


@dataclass
class KubeSettings:
    """Kubernetes settings of the ``kubeflow`` target (defaults sized for one ResNet-50 process per GPU: a
    training task with N processes gets N x the CPU, memory and ``/dev/shm`` of one)."""

    gpus: int = 1  # GPUs per training task (> 1: torchrun with that many processes) or per TrainJob node
    nodes: int = 0  # > 0: the training stages run as Kubeflow Trainer TrainJobs of that many nodes
    trainjob_runtime: str = DEFAULT_RUNTIME  # the ClusterTrainingRuntime the TrainJobs reference
    trainjob_timeout_s: float = 7 * 24 * 3600.0  # a TrainJob still running after this fails its task
    accelerator: str = "nvidia.com/gpu"
    cpu_request: str = "4"
    cpu_limit: str = "8"
    memory_request: str = "16G"
    memory_limit: str = "32G"
    light_cpu: str = "500m"  # resolve-config, start-run, register
    light_memory: str = "2G"
    shm_per_process: str = "8Gi"  # /dev/shm (memory emptyDir) per training process
    pull_policy: str = "IfNotPresent"
    s3_secret: str = "lf2-s3"  # keys: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL
    s3_secret_keys: Tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
    mlflow_secret: str = "lf2-mlflow"  # keys: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, ..._PASSWORD
    mlflow_secret_keys: Tuple[str, ...] = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                           "MLFLOW_TRACKING_PASSWORD")
    env: dict[str, str] = field(default_factory=lambda: {"PYTHONUNBUFFERED": "1"})


def scale_quantity(quantity: str, factor: int) -> str:
    """A Kubernetes quantity times ``factor``: ``("8Gi", 2) -> "16Gi"``, ``("500m", 3) -> "1500m"``,
    ``("4", 2) -> "8"``."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", quantity.strip())
    if m is None:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    value = float(m.group(1)) * factor
    return (str(int(value)) if value.is_integer() else f"{value:g}") + m.group(2)


def trainjob_settings(ks: KubeSettings, image: str) -> TrainJobSettings:
    """The TrainJob settings of the training stages under ``ks.nodes`` (names of secrets, never values)."""
    return TrainJobSettings(
        nodes=ks.nodes, procs_per_node=max(ks.gpus, 1), image=image, runtime=ks.trainjob_runtime,
        gpus_per_node=ks.gpus, accelerator=ks.accelerator,
        cpu_request=scale_quantity(ks.cpu_request, max(ks.gpus, 1)),
        cpu_limit=scale_quantity(ks.cpu_limit, max(ks.gpus, 1)),
        memory_request=scale_quantity(ks.memory_request, max(ks.gpus, 1)),
        memory_limit=scale_quantity(ks.memory_limit, max(ks.gpus, 1)),
        shm_size=scale_quantity(ks.shm_per_process, max(ks.gpus, 1)), s3_secret=ks.s3_secret,
        s3_secret_keys=tuple(ks.s3_secret_keys), mlflow_secret=ks.mlflow_secret,
        mlflow_secret_keys=tuple(ks.mlflow_secret_keys), env=dict(ks.env), timeout_s=ks.trainjob_timeout_s)


def _kube(task: dsl.PipelineTask, stage: str, ks: KubeSettings, image: str) -> None:
    from kfp import kubernetes

    training = stage in DISTRIBUTED_STAGES or stage == ROUNDS_TASK
    launcher = ks.nodes > 0 and training  # creates TrainJobs; adapt-rounds also clusters in its own pod
    procs = ks.gpus if training and ks.gpus > 1 and not launcher else 1  # torchrun processes in this pod
    heavy = stage == ROUNDS_TASK or (stage in BY_NAME and BY_NAME[stage].resources != "light")
    if heavy and not (launcher and stage != ROUNDS_TASK):
        task.set_cpu_request(scale_quantity(ks.cpu_request, procs)).set_cpu_limit(scale_quantity(ks.cpu_limit, procs))
        task.set_memory_request(scale_quantity(ks.memory_request, procs))
        task.set_memory_limit(scale_quantity(ks.memory_limit, procs))
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=scale_quantity(ks.shm_per_process, procs))
    else:
        task.set_cpu_request(ks.light_cpu).set_memory_request(ks.light_memory)
    if (stage in GPU_STAGES or stage == ROUNDS_TASK) and ks.gpus > 0 and not launcher:
        task.set_accelerator_type(ks.accelerator).set_accelerator_limit(ks.gpus if training else 1)
    if procs > 1:
        task.set_env_variable(NPROC_ENV, str(procs))
    if launcher:
        task.set_env_variable(TRAINJOB_ENV, trainjob_settings(ks, image).to_json())
    kubernetes.use_secret_as_env(task, ks.s3_secret, {k: k for k in ks.s3_secret_keys}, optional=False)
    kubernetes.use_secret_as_env(task, ks.mlflow_secret, {k: k for k in ks.mlflow_secret_keys}, optional=True)
    kubernetes.set_image_pull_policy(task, ks.pull_policy)
    for k, v in {**ks.env, "LF2_IMAGE": image}.items():
        task.set_env_variable(k, v)


def build_pipeline(
    rounds: int,
    image: str = DEFAULT_IMAGE,
    target: str = "local",
    kube: Optional[KubeSettings] = None,
    retries: Optional[int] = None,
    name: str = "lf2-uda",
    rounds_per_task: int = 1,
) -> Callable[..., Any]:
    """The pipeline function for ``rounds`` unrolled rounds (``finetune.rounds`` of the recipe), one task
    per stage (``rounds_per_task=1``) or ``rounds_per_task`` rounds per ``adapt-rounds`` task."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if rounds_per_task < 1:
        raise ValueError(f"rounds_per_task must be >= 1, got {rounds_per_task}")
    if target not in ("local", "kubeflow"):
        raise ValueError(f"target must be 'local' or 'kubeflow', got {target!r}")
    ks = kube or KubeSettings()
    check_distributed(target, ks)
    c = build_components(image)
    n_retries = (2 if target == "kubeflow" else 0) if retries is None else retries

    def setup(task: dsl.PipelineTask, stage: str, display: Optional[str] = None, cache: bool = True) -> dsl.PipelineTask:
        task.set_caching_options(cache and (stage not in BY_NAME or BY_NAME[stage].cacheable))
        if display:
            task.set_display_name(display)
        if n_retries > 0:
            task.set_retry(num_retries=n_retries, backoff_duration="30s", backoff_factor=2.0,
                           backoff_max_duration="600s")
        if target == "kubeflow":
            _kube(task, stage, ks, image)
        return task

    @dsl.pipeline(name=name, description=f"LF2 unsupervised domain adaptive re-ID ({rounds} rounds, {target})")
    def lf2_uda(
        recipe: str = "demo",
        overrides: str = "[]",
        source_root: str = "",
        target_root: str = "",
        mlflow_experiment: str = "lf2",
        object_prefix: str = "",
        run_name: str = "",
        resume_run_id: str = "",
    ) -> NamedTuple("Outputs", [("version", str), ("run_id", str), ("metrics", dsl.Metrics)]):
        conf = setup(c.resolve_config(recipe=recipe, overrides=overrides, source_root=source_root,
                                      target_root=target_root, experiment=mlflow_experiment,
                                      compiled_rounds=rounds), "resolve-config", cache=False)
        config = conf.outputs["Output"]
        prep = setup(c.prepare_data(config=config, object_prefix=object_prefix), "prepare-data")
        data = prep.outputs["data"]
        pre = setup(c.pretrain_source(config=config, object_prefix=object_prefix, data=data), "pretrain-source")
        run = setup(c.start_run(config=config, run_name=run_name, resume_run_id=resume_run_id, data=data,
                                source_model=pre.outputs["model"], pipeline_job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                                pipeline_job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), "start-run", cache=False)
        run_id = run.output
        model = pre.outputs["model"]
        for first in range(0, rounds, rounds_per_task) if rounds_per_task > 1 else ():
            last = min(first + rounds_per_task, rounds) - 1
            ar = setup(c.adapt_rounds(config=config, object_prefix=object_prefix, run_id=run_id, first_round=first,
                                      num_rounds=last - first + 1, data=data, model=model),
                       ROUNDS_TASK, f"rounds-r{first}-r{last}")
            model = ar.outputs["finetuned"]
        for r in range(rounds) if rounds_per_task == 1 else ():
            ext = setup(c.extract_features(config=config, object_prefix=object_prefix, run_id=run_id,
                                           round_index=r, data=data, model=model),
                        "extract-features", f"extract-features-r{r}")
            cl = setup(c.cluster(config=config, object_prefix=object_prefix, run_id=run_id, round_index=r,
                                 features=ext.outputs["features"]), "cluster", f"cluster-r{r}")
            ft = setup(c.finetune(config=config, object_prefix=object_prefix, run_id=run_id, round_index=r,
                                  data=data, labels=cl.outputs["labels"], model=model),
                       "finetune", f"finetune-r{r}")
            model = ft.outputs["finetuned"]
        ev = setup(c.evaluate(config=config, object_prefix=object_prefix, run_id=run_id, data=data, model=model),
                   "evaluate")
        reg = setup(c.register(config=config, run_id=run_id, model=model, metrics=ev.outputs["results"]),
                    "register")
        outputs = NamedTuple("Outputs", [("version", str), ("run_id", str), ("metrics", dsl.Metrics)])
        return outputs(version=reg.outputs["Output"], run_id=run_id, metrics=ev.outputs["metrics"])

    return lf2_uda


def check_distributed(target: str, ks: KubeSettings) -> None:
    """One clear line (Lf2Error) for settings the distributed launch cannot honour."""
    if ks.nodes < 0 or ks.gpus < 0:
        raise Lf2Error(f"--nodes and --gpus must be >= 0, got {ks.nodes} and {ks.gpus}")
    if target != "kubeflow" and (ks.nodes > 0 or ks.gpus > 1):
        flag = f"--nodes {ks.nodes}" if ks.nodes > 0 else f"--gpus {ks.gpus}"
        raise Lf2Error(f"{flag}: multi-process training needs --target kubeflow (the local target runs every "
                       "stage in-process)")


def compile_pipeline(out: str, rounds: int, image: str = DEFAULT_IMAGE, target: str = "local", gpus: int = 1,
                     retries: Optional[int] = None, kube: Optional[KubeSettings] = None,
                     rounds_per_task: int = 1, nodes: int = 0) -> str:
    """Write the pipeline IR YAML to ``out``; returns ``out``. ``gpus`` > 1: torchrun with that many
    processes per training task; ``nodes`` > 0: the training stages as TrainJobs of that many nodes."""
    ks = kube or KubeSettings(gpus=gpus)
    ks.gpus, ks.nodes = gpus, nodes
    fn = build_pipeline(rounds, image=image, target=target, kube=ks, retries=retries,
                        rounds_per_task=rounds_per_task)
    compiler.Compiler().compile(fn, package_path=out)
    return out
