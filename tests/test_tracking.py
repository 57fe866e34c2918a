"""lf2core.tracking and the register stage against a local sqlite store and a real ``mlflow server``
(on 127.0.0.1, artifacts in a moto S3 bucket)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
import torch

from lf2core import tracking
from lf2core.checkpoint import save_checkpoint
from lf2core.config import load_config
from lf2core.models.lf2 import LF2Model
from lf2core.stages.register import register

TINY = ["data.height=32", "data.width=16", "model.arch=resnet18_narrow", "model.weights=none"]


def test_mask_and_flatten() -> None:
    p = tracking.masked_params({
        "aws_secret_access_key": "abc", "tracking.token": "t", "db": "postgresql://bob:hunter2@h:5432/x",
        "url": "https://h/o?X-Amz-Signature=deadbeef&part=1", "lr": 0.1, "milestones": [1, 2], "empty_key": "",
    })
    assert p == {"aws_secret_access_key": "***", "tracking.token": "***", "db": "postgresql://bob:***@h:5432/x",
                 "url": "https://h/o?X-Amz-Signature=***&part=1", "lr": "0.1", "milestones": "[1, 2]",
                 "empty_key": ""}
    flat = tracking.flatten_metrics({"global": {"clusters": 3, "nmi": np.float32(0.5)}, "loss": float("nan"),
                                     "name": "x", "ok": True}, "cluster")
    assert flat == {"cluster/global/clusters": 3.0, "cluster/global/nmi": 0.5, "cluster/ok": 1.0}


def test_disabled_is_noop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LF2_TRACKING", "off")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("demo", TINY)
    assert tracking.create_run(cfg, "x") is None
    assert tracking.log_metrics({"a": 1.0}, step=0, run_id="r") == {}
    with tracking.start_run(cfg) as rid:
        assert rid is None
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlartifacts


def test_local_sqlite_run_params_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LF2_TRACKING", raising=False)
    cfg = load_config("demo", TINY + ["tracking.experiment=unit"])
    run_id = tracking.create_run(cfg, "pipeline-1", {"lf2.pipeline": "test"})
    for rnd, n in enumerate([7, 9, 11]):
        tracking.log_metrics({"global": {"clusters": n, "outlier_ratio": 0.1 * rnd}}, step=rnd, run_id=run_id,
                             prefix="cluster")
    tracking.end_run(run_id)
    assert (tmp_path / "mlflow.db").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "pipeline-1"
    assert run.data.params == tracking.masked_params(cfg.flat())
    assert run.data.params["finetune.rounds"] == str(cfg.finetune.rounds)
    hist = client.get_metric_history(run_id, "cluster/global/clusters")
    assert sorted((m.step, m.value) for m in hist) == [(0, 7.0), (1, 9.0), (2, 11.0)]
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "unit" and exp.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()
    stored = Path(exp.artifact_location[len("file://"):])
    assert any(p.name == "config.yaml" for p in stored.rglob("*"))


# --------------------------------------------------------------------------------------------- registry
def _teacher(tmp: Path, cfg, seed: int, mAP: float) -> tuple[Path, Path, LF2Model]:
    torch.manual_seed(seed)
    net = LF2Model(cfg.model.arch, num_classes=5, num_parts=cfg.model.num_parts).eval()
    mdir, edir = tmp / f"ft{seed}", tmp / f"ev{seed}"
    mdir.mkdir()
    edir.mkdir()
    save_checkpoint(str(mdir / "teacher.pt"), net, "lf2", cfg)
    (edir / "metrics.json").write_text(json.dumps({"mAP": mAP, "R1": mAP + 0.1, "R5": 0.9, "R10": 0.95,
                                                   "mINP": 0.1}))
    return mdir, edir, net


def test_register_and_promotion_gate_on_server(mlflow_server: str, s3_env: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("LF2_TRACKING", raising=False)
    name = f"lf2-reid-{uuid.uuid4().hex[:6]}"
    cfg = load_config("demo", TINY + [f"tracking.registered_model={name}", "tracking.experiment=reg"])
    m1, e1, net1 = _teacher(tmp_path, cfg, 1, 0.40)
    run_id = tracking.create_run(cfg, "pipeline")
    out1 = register(cfg, str(m1), str(e1), run_id=run_id)
    assert out1["version"] == "1" and out1["alias"] == "candidate" and out1["mAP"] == 0.40

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    mv = client.get_model_version(name, "1")
    assert mv.run_id == run_id and mv.tags["metric.mAP"] == "0.4" and mv.tags["lf2.recipe"] == "demo"
    assert client.get_run(run_id).info.status == "FINISHED"
    # the model round-trips through the server's S3 artifact store with its signature
    loaded = mlflow.pytorch.load_model(f"models:/{name}@candidate")
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net1(x), atol=1e-6)
    info = mlflow.models.get_model_info(f"models:/{name}/1")
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 16]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3 * 256]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
    assert any(k.endswith("/MLmodel") for k in keys) and any(k.endswith("input_example.json") for k in keys)

    # promotion: first candidate becomes champion; a floor refuses; a worse model is refused
    assert tracking.promote_main(model_name=name, min_map=0.5) == 1
    assert "below the floor 0.5000" in capsys.readouterr().out
    d = tracking.promote(model_name=name)
    assert d.promoted and d.version == "1" and tracking.describe_aliases(name)["champion"] == "1"
    m2, e2, _ = _teacher(tmp_path, cfg, 2, 0.35)
    assert register(cfg, str(m2), str(e2))["version"] == "2"  # own run
    assert tracking.describe_aliases(name) == {"candidate": "2", "champion": "1"}
    d = tracking.promote(model_name=name)
    assert not d.promoted and d.reason == "version 2 mAP 0.3500 does not beat 'champion' version 1 mAP 0.4000"
    assert tracking.describe_aliases(name)["champion"] == "1"
    d = tracking.promote(version="2", model_name=name, force=True)
    assert d.promoted and d.reason == "forced: 'champion' -> version 2"
    assert tracking.describe_aliases(name) == {"candidate": "2", "champion": "2"}
    # version 1 (0.40) beats the current champion 2 (0.35): the gate lets it through
    assert tracking.promote_main(version="1", model_name=name) == 0
    assert "version 1 mAP 0.4000 beats version 2 mAP 0.3500" in capsys.readouterr().out
    assert tracking.describe_aliases(name) == {"candidate": "2", "champion": "1"}


@pytest.mark.parametrize("metrics, message", [
    ({"mAP": "high", "R1": 0.5}, "metric 'mAP' must be a number in [0, 1], got 'high'"),
    ({"mAP": 1.7}, "metric 'mAP' must be a number in [0, 1], got 1.7"),
    ({"mAP": 0.5, "R1": None, "mINP": True}, "metric 'mINP' must be a number in [0, 1], got True"),
    ({"R1": 0.5}, "no 'mAP' (an evaluate output holds mAP, R1, R5, R10, mINP)"),
])
def test_register_refuses_bad_metrics_before_touching_the_registry(tmp_path: Path, monkeypatch, metrics,
                                                                   message) -> None:
    from lf2core.errors import DataError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("demo", TINY)
    m, e, _ = _teacher(tmp_path, cfg, 3, 0.5)
    (e / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(DataError) as err:
        register(cfg, str(m), str(e))
    assert str(err.value) == f"{e / 'metrics.json'}: {message}"
    assert not (tmp_path / "mlflow.db").exists()  # no run, no version, no alias moved
