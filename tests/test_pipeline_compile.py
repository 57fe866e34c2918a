"""The compiled pipeline IR: stage components, unrolled rounds, Kubernetes settings (kubeflow target)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main as pipeline_main
from pipelines.lf2_uda import STAGE_COMPONENTS

REPO = Path(__file__).resolve().parent.parent


def _load(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


def _tasks(spec: dict) -> dict:
    return spec["root"]["dag"]["tasks"]


def test_kubeflow_yaml_has_stages_gpus_and_secrets(tmp_path: Path) -> None:
    out = tmp_path / "lf2.yaml"
    assert pipeline_main(["compile", "--out", str(out), "--target", "kubeflow", "--gpus", "1", "--image",
                          "registry.example/lf2:test", "-c", "demo", "--rounds", "3"]) == 0
    spec, platform = _load(out)
    tasks = _tasks(spec)
    # every stage component is present; the rounds are unrolled
    comp_names = {t["componentRef"]["name"] for t in tasks.values()}
    for stage in STAGE_COMPONENTS:
        assert f"comp-{stage}" in comp_names
    names = {t["taskInfo"]["name"] for t in tasks.values()}
    for r in range(3):
        assert {f"extract-features-r{r}", f"cluster-r{r}", f"finetune-r{r}"} <= names
    assert "finetune-r3" not in names
    assert len(tasks) == 3 * 3 + 6  # resolve-config, prepare, pretrain, start-run, evaluate, register
    # start-run gets the KFP run's job name and uuid (tagged on the MLflow run: lineage)
    params = tasks["start-run"]["inputs"]["parameters"]
    assert params["pipeline_job_name"]["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}"
    assert params["pipeline_job_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    # chaining: round r extracts with the model of round r-1
    by_name = {t["taskInfo"]["name"]: t for t in tasks.values()}
    assert by_name["extract-features-r1"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == \
        [k for k, t in tasks.items() if t["taskInfo"]["name"] == "finetune-r0"][0]
    assert by_name["start-run"]["cachingOptions"] == {} and by_name["register"]["cachingOptions"] == {}
    assert by_name["cluster-r0"]["cachingOptions"] == {"enableCache": True}
    assert by_name["finetune-r2"]["retryPolicy"]["maxRetryCount"] == 2
    # image and no kfp install at run time
    execs = spec["deploymentSpec"]["executors"]
    for ex in execs.values():
        c = ex["container"]
        assert c["image"] == "registry.example/lf2:test"
        assert "pip install" not in " ".join(c["command"])
    gpu_execs = [ex["container"] for ex in execs.values() if "accelerator" in ex["container"].get("resources", {})]
    assert len(gpu_execs) == 3 * 2 + 2  # extract + finetune per round, pretrain, evaluate
    for c in gpu_execs:
        acc = c["resources"]["accelerator"]
        assert acc["resourceType"] == "nvidia.com/gpu" and int(acc["resourceCount"]) == 1
        assert c["resources"]["resourceCpuRequest"] == "4" and c["resources"]["resourceMemoryRequest"] == "16G"
    cluster_exec = execs[spec["components"]["comp-cluster"]["executorLabel"]]["container"]
    assert "accelerator" not in cluster_exec["resources"]
    # Kubernetes platform config: secrets as env, /dev/shm emptyDir (Memory), pull policy
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(kube) == set(execs)
    for label, cfg in kube.items():
        secrets = {s["secretName"]: {kv["envVar"] for kv in s["keyToEnv"]} for s in cfg["secretAsEnv"]}
        assert secrets["lf2-s3"] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
        assert "MLFLOW_TRACKING_URI" in secrets["lf2-mlflow"]
        assert cfg["imagePullPolicy"] == "IfNotPresent"
    shm = kube[spec["components"]["comp-finetune"]["executorLabel"]]["emptyDirMounts"][0]
    assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
    # parameters a user sets
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"recipe", "overrides", "source_root", "target_root", "mlflow_experiment", "object_prefix"} <= set(params)


def test_local_target_has_no_kubernetes_config(tmp_path: Path) -> None:
    out = tmp_path / "local.yaml"
    assert pipeline_main(["compile", "--out", str(out), "--target", "local", "-c", "demo",
                          "--set", "finetune.rounds=1"]) == 0
    docs = _load(out)
    assert len(docs) == 1  # no platform spec
    assert len(_tasks(docs[0])) == 3 + 6
    assert all("retryPolicy" not in t for t in _tasks(docs[0]).values())


def test_lf2_cli_dispatches_to_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "pipeline", "compile", "--out", str(out),
                        "--set", "finetune.rounds=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 rounds" in r.stdout and out.is_file()


def test_rounds_mismatch_is_refused() -> None:
    from components._runtime import resolve_config
    from lf2core.config import ConfigError

    text = resolve_config("demo", '["finetune.rounds=2"]', "s3://b/src", "", "exp", 2)
    cfg = yaml.safe_load(text)
    assert cfg["data"]["source"]["root"] == "s3://b/src" and cfg["tracking"]["experiment"] == "exp"
    with pytest.raises(ConfigError, match="compiled for 3 rounds but the config asks for 2"):
        resolve_config("demo", '["finetune.rounds=2"]', "", "", "", 3)
    with pytest.raises(ConfigError, match="pipeline parameter 'overrides'"):
        resolve_config("demo", "finetune.rounds=2", "", "", "", -1)


def test_failed_stage_marks_mlflow_run_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from components._runtime import failure_marks_run
    from lf2core import tracking
    from lf2core.config import load_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LF2_TRACKING", raising=False)
    run_id = tracking.create_run(load_config("demo"), "p")
    with pytest.raises(ValueError, match="stage broke"):
        with failure_marks_run(run_id):
            raise ValueError("stage broke")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FAILED"
    with failure_marks_run(run_id):  # success leaves the status alone
        pass
    assert client.get_run(run_id).info.status == "FAILED"


def test_components_follow_the_stage_table() -> None:
    """Each stage of the table has a component of the same function name taking its inputs (and
    producing its output) as KFP artifacts of the table's types, and its parameters."""
    import inspect
    import typing

    from components import stages as comps
    from lf2core.stages.table import STAGES

    for st in STAGES:
        params = inspect.signature(getattr(comps, st.func)).parameters
        ports = [*st.inputs, *([st.output] if st.output is not None else [])]
        for port in ports:
            assert typing.get_args(params[port.name].annotation)[0].__name__ == port.artifact, (st.name, port.name)
        for prm in st.params:
            assert prm.name in params or prm.name == "split", (st.name, prm.name)
