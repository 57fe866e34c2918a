"""``lf2 pipeline compile | run | submit``, and the ``lf2`` console script (``lf2_main``).

    lf2 pipeline compile --out lf2.yaml [--target local|kubeflow] [--gpus N] [--image IMG] [-c RECIPE] [--rounds N]
                         [--rounds-per-task K] [--nodes M]
    lf2 pipeline run --out runs/p1 [-c RECIPE] [-s key=value ...] [--object-prefix s3://b/p] [--experiment E]
                     [--runner subprocess|docker] [--image IMG] [--rounds-per-task K]
    lf2 pipeline submit --host URL [--package lf2.yaml | -c RECIPE ...] [--experiment E] [--run-name N]
                        [--gpus N] [--nodes M]

``--gpus N`` > 1 runs the training stages under torchrun with N processes in their pod; ``--nodes M`` runs
them as Kubeflow Trainer TrainJobs of M nodes (docs/distributed-pipeline.md).

``run --runner docker`` runs every component in the project image (``make images``) through
``kfp.local.DockerRunner``, with host networking, as the image's non-root user; the S3 and MLflow
settings of this environment (``AWS_*``, ``MLFLOW_*``) are passed to the containers, which see only the
pipeline root (``--out``): MLflow must be a server (``MLFLOW_TRACKING_URI=http://...``) and the datasets
synthetic or in S3.

The number of rounds is unrolled at compile time: it defaults to ``finetune.rounds`` of the recipe after
the overrides, and the compiled pipeline refuses a config asking for another number. ``--rounds-per-task K``
runs K consecutive rounds in one task (default 1: one task per stage; ``pipelines.lf2_uda``).

``lf2_main`` is the ``lf2`` command: the stage commands of ``lf2core.cli`` plus ``lf2 pipeline``, added here
as an ``lf2core.cli.Command`` -- this package sits above lf2core and may import both; lf2core never
imports it (nor kfp).
"""

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from lf2core import cli as lf2_cli
from lf2core.cli import Command
from lf2core.config import load_config
from lf2core.errors import Lf2Error

log = logging.getLogger("lf2.pipeline")


def _rounds(args: argparse.Namespace) -> int:
    if getattr(args, "rounds", None):
        return int(args.rounds)
    return load_config(args.config, args.set).finetune.rounds


def pipeline_arguments(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "recipe": args.config,
        "overrides": json.dumps(list(args.set)),
        "source_root": args.source_root or "",
        "target_root": args.target_root or "",
        "mlflow_experiment": args.experiment or "",
        "object_prefix": args.object_prefix or "",
        "run_name": args.run_name or "",
        "resume_run_id": getattr(args, "resume_run_id", "") or "",
    }


# environment passed to the containers of ``--runner docker`` (only the names are ever logged, never values)
DOCKER_ENV_PREFIXES = ("AWS_", "MLFLOW_", "LF2_S3_")
DOCKER_ENV_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG")


def docker_environment(environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The S3 / MLflow / threading settings of ``environ`` that the component containers need."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if k.startswith(DOCKER_ENV_PREFIXES) or k in DOCKER_ENV_NAMES}


def _docker_client() -> Any:
    try:
        import docker

        c = docker.from_env(timeout=120)
        c.ping()
        return c
    except Exception as e:  # no socket, engine down, permission denied
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise Lf2Error(f"--runner docker: no Docker engine answers at {host} ({first[:160]}); start one "
                       "(docker/engine.sh start) or use --runner subprocess") from None


def docker_runner(image: str, pipeline_root: Path, workspace: Path, tracking_uri: str,
                  environ: Optional[dict[str, str]] = None) -> Any:
    """A ``kfp.local.DockerRunner`` for ``image``: host network, the image's non-root user, the S3/MLflow
    environment; the pipeline root and workspace are made writable for that user. Lf2Error (one line) when
    the MLflow store, the engine or the image will not do."""
    from kfp import local

    scheme = tracking_uri.split("://", 1)[0].lower() if "://" in tracking_uri else ""
    if scheme not in ("http", "https", "databricks"):
        raise Lf2Error(f"--runner docker: the MLflow store {tracking_uri!r} is not reachable from the containers "
                       "(they see only the pipeline root); set MLFLOW_TRACKING_URI to an MLflow server "
                       "(make demo-docker starts one)")
    client = _docker_client()
    try:
        try:
            img = client.images.get(image)
        except Exception:
            raise Lf2Error(f"--runner docker: image {image} is not in the local engine; build it with "
                           "`make images` (or pass --image)") from None
        user = (img.attrs.get("Config") or {}).get("User") or ""
    finally:
        client.close()
    uid_s, _, gid_s = user.partition(":")
    if not uid_s.isdigit() or int(uid_s) == 0:
        raise Lf2Error(f"--runner docker: image {image} does not run as a numeric non-root user (USER {user!r})")
    uid, gid = int(uid_s), int(gid_s or uid_s)
    run_as, home = f"{uid}:{gid}", "/home/lf2"
    if os.geteuid() == 0:  # hand the mounted folders to the image's user (outputs of earlier runs included)
        for top in (pipeline_root, workspace):
            os.chown(top, uid, gid)
            for dirpath, dirnames, filenames in os.walk(top):
                for name in dirnames + filenames:
                    os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
    else:  # no chown without root: run as the caller, who owns the folders; the image's HOME is not theirs
        run_as, home = f"{os.getuid()}:{os.getgid()}", "/tmp"
    env = {**docker_environment(environ), "HOME": home}
    if home == "/tmp":
        env.update(XDG_CACHE_HOME="/tmp/.cache", LF2_CACHE_DIR="/tmp/.cache/lf2", MPLCONFIGDIR="/tmp/.cache/mpl",
                   TORCH_HOME="/tmp/.cache/torch")
    log.info("DockerRunner: image %s, user %s, host network, environment %s", image, run_as, sorted(env))
    return local.DockerRunner(network_mode="host", user=run_as, environment=env)


def run_pipeline_local(recipe: str, overrides: list[str], out: str, *, object_prefix: str = "", experiment: str = "",
              run_name: str = "", source_root: str = "", target_root: str = "", resume_run_id: str = "",
              cache: bool = True, image: Optional[str] = None, runner: str = "subprocess",
              rounds_per_task: int = 1) -> dict[str, Any]:
    """Run the pipeline locally with kfp.local: ``runner="subprocess"`` (``SubprocessRunner`` in this
    Python environment) or ``"docker"`` (``DockerRunner``: every component in ``image``, see ``docker_runner``).

    Outputs go under ``out/kfp`` (the local pipeline root; the KFP cache is ``out/kfp/.kfp_cache``).
    Returns ``{"run_id", "version", "metrics", "seconds", "pipeline_root", "runner", "image"}``.
    """
    from kfp import local

    from components.stages import DEFAULT_IMAGE
    from pipelines.lf2_uda import build_pipeline

    if runner not in ("subprocess", "docker"):
        raise Lf2Error(f"--runner must be 'subprocess' or 'docker', got {runner!r}")
    cfg = load_config(recipe, overrides)
    rounds = cfg.finetune.rounds
    image = image or DEFAULT_IMAGE
    root = Path(out, "kfp").resolve()
    root.mkdir(parents=True, exist_ok=True)
    workspace = Path(out, "kfp-workspace").resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    if runner == "docker":
        uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
        kfp_runner = docker_runner(image, root, workspace, uri)
    else:
        kfp_runner = local.SubprocessRunner(use_venv=False)
    local.init(runner=kfp_runner, pipeline_root=str(root), workspace_root=str(workspace), enable_caching=cache)
    fn = build_pipeline(rounds, image=image, target="local", rounds_per_task=rounds_per_task)
    t0 = time.time()
    # the components import the repository's packages: make sure the subprocesses find them
    repo = str(Path(__file__).resolve().parent.parent)
    old_pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = repo + (os.pathsep + old_pythonpath if old_pythonpath else "")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            task = fn(recipe=recipe, overrides=json.dumps(list(overrides)), source_root=source_root,
                      target_root=target_root, mlflow_experiment=experiment, object_prefix=object_prefix,
                      run_name=run_name, resume_run_id=resume_run_id)
    except RuntimeError as e:  # kfp.local: a task failed (its log is above)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        raise Lf2Error(f"pipeline run under {root} failed: {plain}") from None
    finally:
        if old_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pythonpath
    metrics_art = task.outputs["metrics"]
    return {
        "run_id": task.outputs["run_id"],
        "version": task.outputs["version"],
        "metrics": dict(getattr(metrics_art, "metadata", {}) or {}),
        "seconds": time.time() - t0,
        "pipeline_root": str(root),
        "runner": runner,
        "image": image if runner == "docker" else "",
    }


def _compile(args: argparse.Namespace) -> int:
    from pipelines.lf2_uda import compile_pipeline

    rounds = _rounds(args)
    compile_pipeline(args.out, rounds, image=args.image, target=args.target, gpus=args.gpus, retries=args.retries,
                     rounds_per_task=args.rounds_per_task, nodes=args.nodes or 0)
    dist = f", TrainJobs of {args.nodes} nodes x {max(args.gpus, 1)} processes" if args.nodes else \
        (f", torchrun x {args.gpus}" if args.gpus > 1 else "")
    print(f"wrote {args.out} ({args.target}, {rounds} rounds, {args.rounds_per_task} per task{dist}, "
          f"image {args.image})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from lf2core import tracking

    tracking.check_reachable(load_config(args.config, args.set))  # before any task starts
    res = run_pipeline_local(args.config, args.set, args.out, object_prefix=args.object_prefix or "",
                    experiment=args.experiment or "", run_name=args.run_name or "", source_root=args.source_root or "",
                    target_root=args.target_root or "", resume_run_id=args.resume_run_id or "",
                    cache=not args.no_cache, image=args.image, runner=args.runner,
                    rounds_per_task=args.rounds_per_task)
    print(json.dumps(res, indent=2, sort_keys=True, default=str))
    return 0


def _submit(args: argparse.Namespace) -> int:
    import kfp

    from pipelines.lf2_uda import compile_pipeline

    package = args.package
    tmp = None
    if args.nodes and not (args.object_prefix or "").startswith("s3://"):
        raise Lf2Error("--object-prefix: --nodes runs the training stages as TrainJobs, whose pods write their "
                       "outputs to object storage; give an s3:// prefix")
    if not package:
        tmp = tempfile.NamedTemporaryFile(suffix=".yaml", delete=False)
        package = tmp.name
        compile_pipeline(package, _rounds(args), image=args.image, target="kubeflow", gpus=args.gpus,
                         retries=args.retries, rounds_per_task=args.rounds_per_task, nodes=args.nodes or 0)
    token = os.environ.get("KFP_TOKEN") or None
    params = pipeline_arguments(args)
    try:
        client = kfp.Client(host=args.host, namespace=args.namespace, existing_token=token)
        run = client.create_run_from_pipeline_package(
            package, arguments=params,
            run_name=args.run_name or f"lf2-{args.config}-{time.strftime('%Y%m%d-%H%M%S')}",
            experiment_name=args.kfp_experiment, enable_caching=not args.no_cache, namespace=args.namespace,
        )
    except Exception as e:  # connection refused, 401/403, API errors: one clear line naming the endpoint
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Lf2Error(f"{args.host}: cannot submit the pipeline ({type(e).__name__}: {msg[:300]})") from None
    finally:
        if tmp is not None:
            Path(package).unlink(missing_ok=True)
    print(f"submitted run {run.run_id} to {args.host} (experiment {args.kfp_experiment})")
    return 0


NODES_HELP = ("run the training stages as Kubeflow Trainer v2.1 TrainJobs (runtime torch-distributed) of M nodes "
              "x max(--gpus, 1) processes; needs object_prefix=s3://... (docs/distributed-pipeline.md)")
PIPELINE_HELP = ("Compile the LF2 pipeline for Kubeflow, run it locally (kfp.local), or submit it to a Kubeflow "
                 "Pipelines endpoint.")


def at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The ``lf2 pipeline`` parser (filled into ``parser`` when given: the ``lf2`` command's sub-parser)."""
    from components.stages import DEFAULT_IMAGE

    parser = parser or argparse.ArgumentParser(prog="lf2 pipeline", description=PIPELINE_HELP)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def cfg_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", default="demo", help="recipe name or YAML path (default: demo)")
        p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="config override")
        p.add_argument("--image", default=os.environ.get("LF2_IMAGE", DEFAULT_IMAGE), help="component image")
        p.add_argument("--rounds-per-task", type=at_least(1), default=1, metavar="K",
                       help="run K consecutive rounds (extract -> cluster -> finetune) in one task (default 1: a "
                            "task per stage)")

    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--source-root", default="", help="source dataset URI (default: the recipe's)")
        p.add_argument("--target-root", default="", help="target dataset URI (default: the recipe's)")
        p.add_argument("--experiment", default="", help="MLflow experiment (default: tracking.experiment)")
        p.add_argument("--object-prefix", default="", help="s3:// prefix for stage outputs (default: KFP artifacts)")
        p.add_argument("--run-name", default="")
        p.add_argument("--resume-run-id", default="", help="continue this MLflow run (finished rounds are cached)")
        p.add_argument("--no-cache", action="store_true", help="disable KFP caching")

    p = sub.add_parser("compile", help="write the pipeline IR YAML")
    cfg_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--target", choices=["local", "kubeflow"], default="kubeflow")
    p.add_argument("--gpus", type=at_least(0), default=1,
                   help="GPUs per training task (kubeflow target); N > 1 runs the training stages under torchrun "
                        "with N processes (with --nodes: GPUs and processes per node)")
    p.add_argument("--nodes", type=at_least(1), default=None, metavar="M", help=NODES_HELP)
    p.add_argument("--rounds", type=at_least(1), default=None, help="rounds to unroll (default: finetune.rounds)")
    p.add_argument("--retries", type=at_least(0), default=None, help="retries per task (default 2 kubeflow, 0 local)")
    p.set_defaults(func=_compile)

    p = sub.add_parser("run", help="run the pipeline locally (kfp.local: subprocesses in this venv, or containers)")
    cfg_args(p)
    run_args(p)
    p.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                   help="subprocess: this venv; docker: every component in --image (kfp.local.DockerRunner)")
    p.add_argument("--out", required=True, help="local pipeline root")
    p.set_defaults(func=_run)

    p = sub.add_parser("submit", help="submit to a Kubeflow Pipelines endpoint")
    cfg_args(p)
    run_args(p)
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    p.add_argument("--namespace", default=None)
    p.add_argument("--package", default=None, help="compiled YAML (default: compile now for kubeflow)")
    p.add_argument("--kfp-experiment", default="lf2", help="KFP experiment name")
    p.add_argument("--gpus", type=at_least(0), default=1, help="GPUs (= torchrun processes) per training task")
    p.add_argument("--nodes", type=at_least(1), default=None, metavar="M", help=NODES_HELP)
    p.add_argument("--rounds", type=at_least(1), default=None)
    p.add_argument("--retries", type=at_least(0), default=None)
    p.set_defaults(func=_submit)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """``lf2 pipeline ARGS``."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def _add_pipeline_command(sub: Any) -> None:
    build_parser(sub.add_parser("pipeline", help="compile | run | submit the KFP pipeline", description=PIPELINE_HELP))


PIPELINE_COMMAND = Command("pipeline", _add_pipeline_command)


def lf2_main(argv: Optional[list[str]] = None) -> int:
    """The ``lf2`` console script: ``lf2core.cli.main`` with the ``pipeline`` command."""
    return lf2_cli.main(argv, commands=[PIPELINE_COMMAND])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(lf2_main())
