"""The stage graph, declared once: every pipeline stage with its function, typed inputs, output,
parameters and resources. The ``lf2`` stage sub-commands (``lf2core.cli``), the KFP components and the
pipeline's GPU / caching settings (``components``, ``pipelines.lf2_uda``) and the in-process runner
(``lf2core.stages.run_local``) are derived from ``STAGES``: a new stage is added here.

A stage's name is also the owner recorded in its output directory (``storage.output_dir`` /
``storage.claim_output``). Calling convention: ``function(cfg, *inputs, out, **params)`` (``register``:
no ``out``). Functions are imported when first called (``Stage.function``), so reading the table is cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

# stage names = KFP component names = output owners
PREPARE = "prepare-data"
PRETRAIN = "pretrain-source"
EXTRACT = "extract-features"
CLUSTER = "cluster"
FINETUNE = "finetune"
EVALUATE = "evaluate"
REGISTER = "register"
SYNTHETIC_DATA = "synthetic-data"  # owner of a synthetic domain written by `lf2 data synth` / prepare-data


@dataclass(frozen=True)
class Port:
    """A stage input or output: a location holding one kind of stage output.

    ``kind``: ``data`` (prepare-data output), ``model`` (pretrain or finetune output), ``features``,
    ``labels``, ``results`` (evaluate output); ``artifact``: the KFP artifact type of the component."""

    name: str
    kind: str
    help: str = ""

    @property
    def artifact(self) -> str:
        return {"data": "Dataset", "model": "Model"}.get(self.kind, "Artifact")


@dataclass(frozen=True)
class Param:
    """A scalar stage parameter: keyword ``name`` of the function, ``--flag`` of the sub-command."""

    name: str
    flag: str
    type: type
    default: Any
    help: str = ""


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # `lf2 <command>`
    module: str
    func: str
    help: str
    inputs: tuple[Port, ...] = ()
    output: Optional[Port] = None  # None: writes no output directory (register)
    params: tuple[Param, ...] = ()
    resources: str = "cpu"  # gpu | cpu | light (Kubernetes requests of the kubeflow target)
    cacheable: bool = True

    @property
    def needs_gpu(self) -> bool:
        return self.resources == "gpu"

    @property
    def function(self) -> Callable[..., Any]:
        """The stage function, looked up at call time (``lf2core.stages.<module>.<func>``)."""
        return getattr(importlib.import_module(self.module), self.func)

    def __call__(self, cfg: Any, *locations: str, **params: Any) -> Any:
        return self.function(cfg, *locations, **params)


_DATA = Port("data", "data", "prepare-data output (manifest directory)")
_ROUND = Param("round_index", "--round", int, 0)

STAGES: tuple[Stage, ...] = (
    Stage(PREPARE, "prepare", "lf2core.stages.prepare", "prepare_data",
          "stage prepare-data: write the dataset manifest (and synthetic data)",
          output=Port("data", "data")),
    Stage(PRETRAIN, "pretrain", "lf2core.stages.pretrain", "pretrain_source",
          "stage pretrain-source: supervised training on the source domain",
          inputs=(_DATA,), output=Port("model", "model"), resources="gpu"),
    Stage(EXTRACT, "extract", "lf2core.stages.extract", "extract_features",
          "stage extract-features: fusion features of a split",
          inputs=(Port("data", "data"), Port("model", "model", "pretrain or finetune output")),
          output=Port("features", "features"), params=(Param("split", "--split", str, "target_train"),),
          resources="gpu"),
    Stage(CLUSTER, "cluster", "lf2core.stages.cluster", "cluster",
          "stage cluster: pseudo labels from the three feature sets",
          inputs=(Port("features", "features"),), output=Port("labels", "labels"), params=(_ROUND,)),
    Stage(FINETUNE, "finetune", "lf2core.stages.finetune", "finetune",
          "stage finetune: one round of mean-teacher training",
          inputs=(Port("data", "data"), Port("labels", "labels"),
                  Port("model", "model", "pretrain output (round 0) or previous finetune output")),
          output=Port("finetuned", "model"), params=(_ROUND,), resources="gpu"),
    Stage(EVALUATE, "evaluate", "lf2core.stages.evaluate", "evaluate",
          "stage evaluate: mAP/CMC of the teacher on the target test split",
          inputs=(Port("data", "data"), Port("model", "model")), output=Port("results", "results"),
          resources="gpu"),
    Stage(REGISTER, "register", "lf2core.stages.register", "register",
          "stage register: log the teacher to MLflow and register it",
          inputs=(Port("model", "model"), Port("metrics", "results", "evaluate output")),
          params=(Param("run_id", "--run-id", str, None, "MLflow run to attach to (default: a new run)"),),
          resources="light", cacheable=False),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
GPU_STAGES = tuple(s.name for s in STAGES if s.needs_gpu)


def stage(name: str) -> Stage:
    return BY_NAME[name]
