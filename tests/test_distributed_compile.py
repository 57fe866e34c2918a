"""The compiled Kubeflow pipeline with ``--gpus N`` (torchrun with N processes per training task) and
``--nodes M`` (the training tasks launch Kubeflow Trainer TrainJobs), read back from the IR YAML."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from components.launch import stage_argv
from components.trainjob import CONFIG_PATH, TrainJobSettings, trainjob_manifest
from lf2core.stages.table import stage
from pipelines.cli import lf2_main
from pipelines.lf2_uda import scale_quantity
from tests.fake_kube import SCHEMA

TRAINING = ("comp-pretrain-source", "comp-extract-features", "comp-finetune")


def _compile(tmp_path: Path, *flags: str) -> tuple[dict, dict, dict, str]:
    out = tmp_path / "lf2.yaml"
    assert lf2_main(["pipeline", "compile", "--out", str(out), "--target", "kubeflow", "--image",
                     "registry.example/lf2:test-gpu", "-c", "demo", "--rounds", "2", *flags]) == 0
    text = out.read_text()
    spec, platform = yaml.safe_load_all(text)
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    def by_comp(comp: str) -> tuple[dict, dict]:
        label = spec["components"][comp]["executorLabel"]
        return spec["deploymentSpec"]["executors"][label]["container"], kube[label]

    return spec, {c: by_comp(c) for c in spec["components"] if c in {*TRAINING, "comp-cluster", "comp-evaluate",
                                                                         "comp-adapt-rounds"}}, kube, text


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_gpus_2_runs_training_tasks_under_torchrun(tmp_path: Path) -> None:
    _, comps, _, _ = _compile(tmp_path, "--gpus", "2")
    for comp in TRAINING:
        c, k = comps[comp]
        r = c["resources"]
        assert r["accelerator"]["resourceType"] == "nvidia.com/gpu" and r["accelerator"]["resourceCount"] == "2"
        assert (r["resourceCpuRequest"], r["resourceCpuLimit"]) == ("8", "16")  # 4 / 8 per process x 2
        assert (r["resourceMemoryRequest"], r["resourceMemoryLimit"]) == ("32G", "64G")
        assert k["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi",
                                        "volumeName": "dshm"}]
        assert _env(c)["LF2_NPROC_PER_NODE"] == "2" and "LF2_TRAINJOB" not in _env(c)
    ev, ev_k = comps["comp-evaluate"]  # one process: one GPU, one process's resources
    assert ev["resources"]["accelerator"]["resourceCount"] == "1" and ev["resources"]["resourceCpuRequest"] == "4"
    assert ev_k["emptyDirMounts"][0]["sizeLimit"] == "8Gi" and "LF2_NPROC_PER_NODE" not in _env(ev)
    cl, _ = comps["comp-cluster"]
    assert "accelerator" not in cl["resources"] and "LF2_NPROC_PER_NODE" not in _env(cl)


def test_gpus_2_with_several_rounds_per_task(tmp_path: Path) -> None:
    _, comps, _, _ = _compile(tmp_path, "--gpus", "2", "--rounds-per-task", "2")
    c, k = comps["comp-adapt-rounds"]
    assert c["resources"]["accelerator"]["resourceCount"] == "2" and _env(c)["LF2_NPROC_PER_NODE"] == "2"
    assert k["emptyDirMounts"][0]["sizeLimit"] == "16Gi"


def test_nodes_2_training_tasks_launch_valid_trainjobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-in-the-pipeline-7f3a")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "never-in-the-pipeline-91c2")
    _, comps, kube, text = _compile(tmp_path, "--gpus", "4", "--nodes", "2")
    assert "never-in-the-pipeline" not in text
    for comp in TRAINING:
        c, k = comps[comp]
        assert "accelerator" not in c["resources"] and c["resources"]["resourceCpuRequest"] == "500m"
        assert "emptyDirMounts" not in k and "LF2_NPROC_PER_NODE" not in _env(c)
        secrets = {s["secretName"]: {kv["envVar"] for kv in s["keyToEnv"]} for s in k["secretAsEnv"]}
        assert "AWS_SECRET_ACCESS_KEY" in secrets["lf2-s3"]  # the launcher checks the output in S3
        settings = TrainJobSettings.from_json(_env(c)["LF2_TRAINJOB"])
        assert (settings.nodes, settings.procs_per_node, settings.gpus_per_node) == (2, 4, 4)
        assert settings.image == "registry.example/lf2:test-gpu" and settings.runtime == "torch-distributed"
        assert (settings.cpu_request, settings.memory_limit, settings.shm_size) == ("16", "128G", "32Gi")
        assert (settings.s3_secret, settings.mlflow_secret) == ("lf2-s3", "lf2-mlflow")
    # the TrainJob the finetune task would create validates against the pinned CRD schema
    settings = TrainJobSettings.from_json(_env(comps["comp-finetune"][0])["LF2_TRAINJOB"])
    argv = stage_argv(stage("finetune"), CONFIG_PATH, ["s3://b/d", "s3://b/l", "s3://b/m"], "s3://b/o",
                      {"round_index": 1})
    m = trainjob_manifest("lf2-finetune-0123abcd-a1b2c3", settings, argv, "recipe: demo\n", "finetune")
    jsonschema.validate(m, SCHEMA)
    assert m["spec"]["trainer"]["resourcesPerNode"]["limits"] == {"cpu": "32", "memory": "128G",
                                                                   "nvidia.com/gpu": 4}
    assert "never-in-the-pipeline" not in json.dumps(m)
    ev, _ = comps["comp-evaluate"]  # evaluation stays a one-GPU task of the pipeline
    assert ev["resources"]["accelerator"]["resourceCount"] == "1" and "LF2_TRAINJOB" not in _env(ev)
    cl, _ = comps["comp-cluster"]
    assert "LF2_TRAINJOB" not in _env(cl) and cl["resources"]["resourceCpuRequest"] == "4"


def test_nodes_with_rounds_per_task_clusters_in_the_launcher_pod(tmp_path: Path) -> None:
    _, comps, _, _ = _compile(tmp_path, "--nodes", "3", "--rounds-per-task", "2")
    c, k = comps["comp-adapt-rounds"]
    assert "accelerator" not in c["resources"] and c["resources"]["resourceCpuRequest"] == "4"
    assert TrainJobSettings.from_json(_env(c)["LF2_TRAINJOB"]).nodes == 3


def test_bad_distributed_flags_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["pipeline", "compile", "--out", str(tmp_path / "x.yaml"), "-c", "demo", "--rounds", "1"]
    assert lf2_main(base + ["--target", "local", "--gpus", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("lf2: error: --gpus 2: multi-process training needs --target kubeflow "
                                               "(the local target runs every stage in-process)")
    assert lf2_main(base + ["--target", "local", "--nodes", "2"]) == 2
    assert capsys.readouterr().err.strip().startswith("lf2: error: --nodes 2: multi-process training needs")
    assert not (tmp_path / "x.yaml").exists()
    with pytest.raises(SystemExit):
        lf2_main(base + ["--nodes", "0"])
    assert "argument --nodes: must be >= 1, got 0" in capsys.readouterr().err
    # submit: TrainJob pods write to object storage only; refused before any compile or connection
    assert lf2_main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "-c", "demo", "--nodes", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("lf2: error: --object-prefix: --nodes runs the training stages as "
                                               "TrainJobs, whose pods write their outputs to object storage; give "
                                               "an s3:// prefix")


def test_scale_quantity() -> None:
    assert scale_quantity("8Gi", 2) == "16Gi" and scale_quantity("500m", 3) == "1500m"
    assert scale_quantity("4", 2) == "8" and scale_quantity("1.5", 3) == "4.5" and scale_quantity("16G", 1) == "16G"
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        scale_quantity("lots", 2)
