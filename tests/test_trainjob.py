"""The Kubeflow Trainer launcher (``components.trainjob``) against a Kubernetes API server on 127.0.0.1
(``tests/fake_kube.py``: create / get / watch / delete of the TrainJob custom resource, bodies checked
against the TrainJob CRD schema of Kubeflow Trainer v2.1.0), and the generated TrainJobs against that
schema."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jsonschema
import pytest

from components.launch import stage_argv
from components.trainjob import (CONFIG_PATH, TrainJobSettings, run_stage_trainjob, run_trainjob,
                                 trainjob_manifest, trainjob_name)
from lf2core import storage
from lf2core.errors import Lf2Error
from lf2core.stages.table import stage
from tests.fake_kube import SCHEMA, FakeKube

NS = "team-a"
CONFIG = "# lf2 code 0123 (lf2 test)\nrecipe: demo\nfinetune:\n  rounds: 2\n"
SETTINGS = TrainJobSettings(nodes=2, procs_per_node=4, image="registry.example/lf2:1-gpu", gpus_per_node=4,
                            env={"PYTHONUNBUFFERED": "1"})


def _manifest(out: str = "s3://bucket/runs/finetune/abc") -> dict:
    st = stage("finetune")
    argv = stage_argv(st, CONFIG_PATH, ["s3://bucket/runs/data/1", "s3://bucket/runs/labels/2",
                                        "s3://bucket/runs/model/3"], out, {"round_index": 3})
    return trainjob_manifest(trainjob_name(st.command, out), SETTINGS, argv, CONFIG, st.name)


def test_generated_trainjob_validates_against_the_pinned_crd_schema() -> None:
    m = _manifest()
    jsonschema.validate(m, SCHEMA)
    tr = m["spec"]["trainer"]
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and m["kind"] == "TrainJob"
    assert m["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                       "kind": "ClusterTrainingRuntime"}
    assert tr["numNodes"] == 2 and tr["numProcPerNode"] == 4 and tr["image"] == "registry.example/lf2:1-gpu"
    assert tr["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    script = tr["command"][2]
    assert tr["command"][:2] == ["sh", "-c"]
    assert script.endswith("exec torchrun -m lf2core.cli finetune --config /tmp/lf2-config.yaml --data "
                           "s3://bucket/runs/data/1 --labels s3://bucket/runs/labels/2 --model s3://bucket/runs/model/3 "
                           "--out s3://bucket/runs/finetune/abc --round 3")
    env = {e["name"]: e for e in tr["env"]}
    assert env["LF2_CONFIG_YAML"]["value"] == CONFIG
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"):  # by reference only
        assert "value" not in env[k] and env[k]["valueFrom"]["secretKeyRef"]["key"] == k
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "lf2-s3"
    over = m["spec"]["podTemplateOverrides"][0]
    assert over["targetJobs"] == [{"name": "node"}]
    assert over["spec"]["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    # the schema does reject what the API server would reject
    bad = _manifest()
    bad["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)
    bad = _manifest()
    bad["spec"]["trainer"]["env"][0] = {"value": "no name"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


def test_settings_travel_as_json() -> None:
    assert TrainJobSettings.from_json(SETTINGS.to_json()) == SETTINGS
    with pytest.raises(Lf2Error, match="unknown key 'gpu'"):
        TrainJobSettings.from_json(json.dumps({"nodes": 1, "procs_per_node": 1, "image": "x", "gpu": 1}))


def _api(url: str):
    from components.trainjob import custom_objects_api

    return custom_objects_api(url)


def _commit(out: Path):
    def hook(obj: dict) -> None:  # what the pods do: commit the stage output
        with storage.output_dir(str(out), "finetune") as d:
            (Path(d) / "model.pt").write_bytes(b"weights")
    return hook


RUNNING = {"jobsStatus": [{"name": "node", "active": 2, "ready": 2}]}


def _done(kind: str, reason: str = "", message: str = "") -> dict:
    return {"conditions": [{"type": kind, "status": "True", "reason": reason or kind, "message": message,
                            "lastTransitionTime": "2026-11-30T00:00:00Z"}],
            "jobsStatus": [{"name": "node", "succeeded" if kind == "Complete" else "failed": 2}]}


def test_launcher_success_watches_fetches_and_deletes_only_its_own(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "finetune-out"
    fake = FakeKube([(0.3, RUNNING, None), (0.4, _done("Complete"), _commit(out))])
    caplog.set_level(logging.INFO, logger="lf2.components.trainjob")
    with fake as url:
        fake.put(NS, {**_manifest(), "metadata": {"name": "someone-elses-job"}})
        m = _manifest(str(out))
        t0 = time.monotonic()
        got = run_trainjob(_api(url), NS, m, str(out), timeout_s=60, watch_s=20)
        seconds = time.monotonic() - t0
    name = m["metadata"]["name"]
    assert got == str(out) and storage.is_complete(str(out))
    assert fake.deleted == [name] and (NS, "someone-elses-job") in fake.objects
    posted = [b for meth, _, _, b in fake.requests if meth == "POST"]
    assert posted == [m]  # what the server stored passed the CRD schema (else 422)
    watches = [q for meth, _, q, _ in fake.requests if meth == "GET" and q.get("watch")]
    assert watches and watches[0]["fieldSelector"] == f"metadata.name={name}"
    delete = [b for meth, _, _, b in fake.requests if meth == "DELETE"][0]
    assert delete["preconditions"]["uid"]  # deletes by uid: never another object of that name
    text = caplog.text
    assert "active 2 ready 2" in text and "Complete=True" in text and f"TrainJob {NS}/{name} deleted" in text
    assert seconds < 10  # events arrive as they happen (0.7 s of script), not at the end of the 20 s watch


def test_launcher_failure_is_one_line_and_deletes(tmp_path: Path) -> None:
    fake = FakeKube([(0.2, RUNNING, None), (0.2, _done("Failed", "BackoffLimitExceeded",
                                                        "node-0 exited with code 2:\nlf2: error: bad"), None)])
    with fake as url:
        m = _manifest(str(tmp_path / "o"))
        with pytest.raises(Lf2Error) as e:
            run_trainjob(_api(url), NS, m, str(tmp_path / "o"), timeout_s=30, watch_s=5)
    msg = str(e.value)
    assert "\n" not in msg and f"TrainJob {NS}/{m['metadata']['name']} failed (BackoffLimitExceeded" in msg
    assert "lf2: error: bad" in msg
    assert fake.deleted == [m["metadata"]["name"]] and not fake.objects


def test_launcher_timeout_is_one_line_and_deletes(tmp_path: Path) -> None:
    fake = FakeKube([(0.1, RUNNING, None)])  # never finishes
    with fake as url:
        m = _manifest(str(tmp_path / "o"))
        t0 = time.monotonic()
        with pytest.raises(Lf2Error, match=r"neither Complete nor Failed after 2 s \(last status: no conditions; "
                                            r"node: active 2 ready 2\); deleting it"):
            run_trainjob(_api(url), NS, m, str(tmp_path / "o"), timeout_s=2, watch_s=1)
        seconds = time.monotonic() - t0
    assert 2 <= seconds < 8
    assert fake.deleted == [m["metadata"]["name"]] and not fake.objects


def test_launcher_complete_without_committed_output_fails(tmp_path: Path) -> None:
    fake = FakeKube([(0.2, _done("Complete"), None)])
    with fake as url:
        m = _manifest(str(tmp_path / "o"))
        with pytest.raises(Lf2Error, match="completed but its output .* is not committed"):
            run_trainjob(_api(url), NS, m, str(tmp_path / "o"), timeout_s=30, watch_s=5)
    assert fake.deleted == [m["metadata"]["name"]]


def test_refused_create_and_dead_api_are_one_line(tmp_path: Path) -> None:
    fake = FakeKube()
    with fake as url:
        m = _manifest()
        m["spec"]["trainer"]["numNodes"] = "two"  # the server validates against the CRD schema: 422
        with pytest.raises(Lf2Error, match=r"the Kubernetes API refused to create it \(422: TrainJob is invalid"):
            run_trainjob(_api(url), NS, m, "s3://b/o", timeout_s=5)
    assert not fake.objects and not fake.deleted
    with pytest.raises(Lf2Error, match="cannot reach the Kubernetes API"):
        run_trainjob(_api(url), NS, _manifest(), "s3://b/o", timeout_s=5)


def test_stage_output_must_be_s3(tmp_path: Path) -> None:
    fake = FakeKube()
    with fake as url:
        with pytest.raises(Lf2Error, match="pipeline parameter 'object_prefix' is empty or not s3://"):
            run_stage_trainjob(SETTINGS, stage("finetune"), CONFIG, ["a", "b", "c"], str(tmp_path / "o"),
                               {"round_index": 0}, api=_api(url))
    assert fake.requests == []  # refused before anything was created


def test_sigterm_to_the_launcher_still_deletes_its_trainjob(tmp_path: Path) -> None:
    """A cancelled KFP run stops the launcher's pod with SIGTERM: the TrainJob must not be left running."""
    import os
    import signal
    import subprocess
    import sys

    fake = FakeKube([(0.1, RUNNING, None)])  # never finishes
    with fake as url:
        code = ("import logging, sys\n"
                "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
                "from tests.test_trainjob import _api, _manifest\n"
                "from components.trainjob import run_trainjob\n"
                f"run_trainjob(_api({url!r}), {NS!r}, _manifest({str(tmp_path / 'o')!r}), {str(tmp_path / 'o')!r}, "
                "timeout_s=60, watch_s=5)\n")
        root = str(Path(__file__).resolve().parent.parent)
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": root})
        deadline = time.monotonic() + 30
        while not fake.objects and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fake.objects, "the launcher did not create its TrainJob"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "terminated (signal 15)" in out
    assert len(fake.deleted) == 1 and not fake.objects and " deleted" in out


def test_finetune_component_in_nodes_mode_runs_as_a_trainjob(tmp_path: Path, s3_env: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The component side end to end: ``_runtime.run_stage`` of a task compiled with ``--nodes`` creates the
    TrainJob (API on 127.0.0.1), the 'pods' (the server's hook) commit the output in S3 (moto on
    127.0.0.1), and the stage's result is read back from there; without an s3:// object_prefix nothing is
    created."""
    import shlex
    from types import SimpleNamespace

    from components import _runtime as rt
    from lf2core.config import load_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prefix = f"s3://{s3_env}/runs"
    config_yaml = load_config("demo").to_yaml()
    seen: dict = {}

    def pods(obj: dict) -> None:  # what the TrainJob's nodes do: run the stage command, commit the output
        script = obj["spec"]["trainer"]["command"][2]
        argv = shlex.split(script.split("exec torchrun -m lf2core.cli ", 1)[1])
        seen["argv"] = argv
        seen["config"] = {e["name"]: e.get("value") for e in obj["spec"]["trainer"]["env"]}["LF2_CONFIG_YAML"]
        with storage.output_dir(argv[argv.index("--out") + 1], "finetune") as d:
            (Path(d) / "metrics.json").write_text(json.dumps({"final": {"loss": 1.25, "steps": 40}}))

    def art(name: str, uri: str = "") -> SimpleNamespace:
        return SimpleNamespace(path=str(tmp_path / name), metadata={"lf2_uri": uri} if uri else {})

    inputs = {"data": art("d", f"{prefix}/prepare-data/k1"), "labels": art("l", f"{prefix}/cluster/k2"),
              "model": art("m", f"{prefix}/pretrain-source/k3")}
    fake = FakeKube([(0.2, RUNNING, None), (0.3, _done("Complete"), pods)])
    with fake as url:
        monkeypatch.setenv("LF2_KUBE_API", url)
        monkeypatch.setenv("LF2_TRAINJOB", TrainJobSettings(nodes=2, procs_per_node=1, image="img", gpus_per_node=0,
                                                            namespace=NS, watch_s=5).to_json())
        _, out, result = rt.run_stage("finetune", config_yaml, prefix, art("finetuned"), inputs, run_id="",
                                      round_index=1)
        assert out.startswith(f"{prefix}/finetune/") and storage.is_complete(out)
        assert result == {"loss": 1.25, "steps": 40}
        assert seen["config"] == config_yaml
        assert seen["argv"] == ["finetune", "--config", "/tmp/lf2-config.yaml", "--data", f"{prefix}/prepare-data/k1",
                                "--labels", f"{prefix}/cluster/k2", "--model", f"{prefix}/pretrain-source/k3",
                                "--out", out, "--round", "1"]
        assert len(fake.deleted) == 1 and not fake.objects
        n_requests = len(fake.requests)
        with pytest.raises(Lf2Error, match="pipeline parameter 'object_prefix' is empty or not s3://"):
            rt.run_stage("finetune", config_yaml, "", art("finetuned2"), inputs, run_id="", round_index=1)
        assert len(fake.requests) == n_requests
