"""End to end, as production runs: the whole KFP pipeline (kfp.local, real stage functions, tiny config)
against a moto S3 server and an ``mlflow server`` (artifacts in S3), both on 127.0.0.1."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import mlflow
import pytest

from lf2core import storage, tracking
from lf2core.config import load_config
from lf2core.stages.register import register
from pipelines.cli import run_pipeline_local

# cluster.eps=auto: on these few ids the demo's eps 0.6 can put every image in one cluster
TINY = [
    "cluster.eps=auto", "data.synth.ids=8", "data.synth.test_ids=6", "data.synth.height=64", "data.synth.width=32",
    "data.height=32", "data.width=16", "pretrain.epochs=1", "pretrain.iters_per_epoch=2", "pretrain.batch_size=16",
    "pretrain.warmup_epochs=0", "pretrain.milestones=[]", "pretrain.eval_every=0", "cluster.num_clusters=4",
    "cluster.kmeans_init_size=40", "finetune.rounds=1", "finetune.iters_per_epoch=2", "finetune.batch_size=16",
    "eval.batch_size=64",
]
STAGES = ("prepare-data", "pretrain-source", "extract-features", "cluster", "finetune", "evaluate")


SECRETS = {"AWS_SECRET_ACCESS_KEY": "lf2SecretAwsKey0123456789", "AWS_SESSION_TOKEN": "lf2SecretSessionToken42",
           "MLFLOW_TRACKING_PASSWORD": "lf2SecretMlflowPw77", "MLFLOW_TRACKING_TOKEN": "lf2SecretMlflowToken99"}


def _leaks(blob: bytes, where: str) -> list[str]:
    return [f"{name} in {where}" for name, value in SECRETS.items() if value.encode() in blob]


@pytest.mark.slow
def test_pipeline_end_to_end_s3_and_mlflow_server(mlflow_server: str, s3_env: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture) -> None:
    # recognisable credentials (moto and this mlflow server accept any): none may show up anywhere below
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "lf2user")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("LF2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LF2_TRACKING", raising=False)
    name = f"lf2-reid-e2e-{uuid.uuid4().hex[:6]}"
    overrides = TINY + [f"tracking.registered_model={name}"]
    prefix = f"s3://{s3_env}/runs"
    res = run_pipeline_local("demo", overrides, str(tmp_path / "p"), object_prefix=prefix, experiment="e2e",
                    run_name="e2e", cache=False)

    # --- stage outputs are in the bucket, each committed with _COMPLETE last
    keys = [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=s3_env)
            for o in page.get("Contents", [])]
    assert not [k for k in keys if ".partial/" in k]  # resumable training state is deleted once committed
    for stage in STAGES:
        outs = {k.split("/")[2] for k in keys if k.startswith(f"runs/{stage}/")}
        assert len(outs) == 1, (stage, outs)
        assert storage.is_complete(f"{prefix}/{stage}/{outs.pop()}")
    assert any(k.endswith("/teacher.pt") for k in keys) and any(k.endswith("/labels.npz") for k in keys)
    assert any(k.endswith("/manifest.json") for k in keys) and any(k.endswith("/features.npz") for k in keys)

    # --- evaluation figures: the KFP Metrics artifact equals the stage's metrics.json in S3
    ev_key = next(k for k in keys if k.startswith("runs/evaluate/") and k.endswith("/metrics.json"))
    ev = json.loads(storage.read_bytes(f"s3://{s3_env}/{ev_key}"))
    assert 0.0 <= ev["mAP"] <= 1.0 and 0.0 <= ev["R1"] <= 1.0
    assert res["metrics"]["mAP"] == pytest.approx(ev["mAP"])

    # --- one MLflow run with params, per-round metrics and artifacts
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(res["run_id"])
    cfg = load_config("demo", overrides + ["tracking.experiment=e2e"])
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    assert run.data.params == tracking.masked_params(cfg.flat())
    assert client.get_experiment(run.info.experiment_id).name == "e2e"
    m = run.data.metrics
    # adaptation curve: step 0 = the source model (pretrain's target report), step 1 = the final teacher
    assert m["summary/target_mAP"] == pytest.approx(ev["mAP"], rel=1e-3, abs=1e-9)
    assert int(run.data.tags["lf2.data.target_train_images"]) > 0
    # the KFP run that made it: its job name is the folder kfp.local gave the run under the pipeline root
    job = run.data.tags["lf2.pipeline_run.name"]
    assert job.startswith("lf2-uda-") and (tmp_path / "p" / "kfp" / job / "start-run").is_dir()
    assert run.data.tags["lf2.pipeline_run.id"].isdigit()  # kfp.local: a random integer (Kubeflow: a uuid)
    assert [h.step for h in client.get_metric_history(res["run_id"], "round/target/mAP")] == [0, 1]
    cluster_metrics = [k for k in m if k.startswith("round/cluster/")]
    assert cluster_metrics and all(h.step == 0 for h in client.get_metric_history(res["run_id"], cluster_metrics[0]))
    assert any(k.startswith("round/finetune/") for k in m) and any(k.startswith("epoch/pretrain/") for k in m)
    arts = {a.path for a in client.list_artifacts(res["run_id"])}
    assert {"config.yaml", "round_00", "eval", "pretrain", "report"} <= arts
    assert {a.path for a in client.list_artifacts(res["run_id"], "eval")} >= {"eval/metrics.json", "eval/ranklist.png"}
    assert "round_00/stats.json" in {a.path for a in client.list_artifacts(res["run_id"], "round_00")}
    assert "report/run_summary.png" in {a.path for a in client.list_artifacts(res["run_id"], "report")}
    art_keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
    assert any(res["run_id"] in k and k.endswith("config.yaml") for k in art_keys)

    # --- registered with alias candidate; promotion gate
    assert res["version"] == "1"
    assert tracking.describe_aliases(name) == {"candidate": "1"}
    mv = client.get_model_version(name, "1")
    assert mv.run_id == res["run_id"] and float(mv.tags["metric.mAP"]) == pytest.approx(ev["mAP"], abs=1e-5)
    assert tracking.promote(model_name=name).promoted
    # a worse candidate: the same teacher with a lower recorded mAP is refused
    worse = tmp_path / "worse"
    worse.mkdir()
    (worse / "metrics.json").write_text(json.dumps({**ev, "mAP": ev["mAP"] - 0.01}))
    teacher_dir = "/".join(next(k for k in keys if k.endswith("/teacher.pt")).split("/")[:-1])
    assert register(cfg, f"s3://{s3_env}/{teacher_dir}", str(worse))["version"] == "2"
    d = tracking.promote(model_name=name)
    assert not d.promoted and "does not beat 'champion' version 1" in d.reason
    assert tracking.describe_aliases(name) == {"candidate": "2", "champion": "1"}

    # --- secrets: not in any log line, MLflow param/tag/artifact, compiled pipeline, stage output or file
    leaks: list[str] = []
    out, err = capfd.readouterr()
    leaks += _leaks((out + err).encode(), "the logs")
    for rid in {res["run_id"], client.get_model_version(name, "2").run_id}:
        r = client.get_run(rid)
        leaks += _leaks(json.dumps([r.data.params, r.data.tags]).encode(), f"run {rid} params/tags")
        for p in Path(mlflow.artifacts.download_artifacts(run_id=rid, dst_path=str(tmp_path / "arts" / rid))).rglob("*"):
            if p.is_file():
                leaks += _leaks(p.read_bytes(), f"MLflow artifact {p}")
    for v in ("1", "2"):
        leaks += _leaks(json.dumps(client.get_model_version(name, v).tags).encode(), f"version {v} tags")
    s3 = boto3.client("s3")
    for bucket in (s3_env, "mlflow-artifacts"):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                leaks += _leaks(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read(), f"s3://{bucket}/{o['Key']}")
    from pipelines.lf2_uda import compile_pipeline

    for target in ("local", "kubeflow"):
        leaks += _leaks(Path(compile_pipeline(str(tmp_path / f"{target}.yaml"), 2, target=target)).read_bytes(),
                        f"the compiled {target} pipeline")
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "arts" not in p.parts]
    assert len(files) > 20  # the kfp pipeline root, executor outputs, the cache
    for p in files:
        leaks += _leaks(p.read_bytes(), str(p))
    assert leaks == []
