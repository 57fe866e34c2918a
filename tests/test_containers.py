"""The real images, on a real engine (``make test-containers``; skipped unless ``LF2_CONTAINER_TESTS=1``).

The image is ``$LF2_IMAGE`` (the CPU image ``make test-containers`` has just built). A tiny pipeline runs
through ``kfp.local.DockerRunner`` in it against a moto S3 server and an ``mlflow server`` on 127.0.0.1
(host networking), and then the same recipe as subprocesses of this venv: the registered models' metrics
must be equal, and neither the image nor anything the run wrote holds the S3 secret it was given.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

if os.environ.get("LF2_CONTAINER_TESTS") != "1":
    pytest.skip("container tests run under `make test-containers` (LF2_CONTAINER_TESTS=1)", allow_module_level=True)

import boto3  # noqa: E402
import docker  # noqa: E402
import mlflow  # noqa: E402

from lf2core import tracking  # noqa: E402
from pipelines.cli import run_pipeline_local  # noqa: E402
from tests.test_pipeline_e2e import STAGES, TINY  # noqa: E402

IMAGE = os.environ.get("LF2_IMAGE", "")
GPU_IMAGE = IMAGE + "-gpu"
EXPECTED_UID = 10001


@pytest.fixture(scope="module")
def engine() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except docker.errors.DockerException as e:
        pytest.fail(f"LF2_CONTAINER_TESTS=1 but no Docker engine answers: {e}")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {IMAGE!r} is not built (make images VARIANT=cpu)")
    yield client
    client.close()


def _run(client: docker.DockerClient, image: str, cmd: list[str], **kw: Any) -> str:
    out = client.containers.run(image, cmd, remove=True, network_mode="none", stdout=True, stderr=True, **kw)
    return out.decode().strip()


def test_image_runs_as_fixed_non_root_user_with_writable_dirs(engine: docker.DockerClient) -> None:
    assert _run(engine, IMAGE, ["id", "-u"]) == str(EXPECTED_UID)
    assert _run(engine, IMAGE, ["id", "-g"]) == str(EXPECTED_UID)
    script = ("set -e; for d in /gcs /minio /s3 \"$HOME\" \"$LF2_CACHE_DIR\" \"$TORCH_HOME\" \"$MPLCONFIGDIR\"; do "
              "touch \"$d/.w\" && rm \"$d/.w\"; done; echo ok; echo $HOME; touch /opt/venv/x 2>/dev/null || echo ro")
    assert _run(engine, IMAGE, ["sh", "-c", script]).split() == ["ok", "/home/lf2", "ro"]
    attrs = engine.images.get(IMAGE).attrs
    assert attrs["Config"]["User"] == f"{EXPECTED_UID}:{EXPECTED_UID}"
    labels = attrs["Config"]["Labels"]
    assert labels["io.lf2.variant"] == "cpu" and labels["org.opencontainers.image.revision"] in IMAGE
    assert dict(e.split("=", 1) for e in attrs["Config"]["Env"])["LF2_IMAGE"] == IMAGE


def test_cpu_image_software(engine: docker.DockerClient) -> None:
    """The image's stack imports and computes on the CPU; the lf2 CLI is there; the code is the checkout's."""
    from components._runtime import code_fingerprint

    code = ("import json, torch, torchvision, faiss, numpy as np, kfp, mlflow\n"
            "from components._runtime import code_fingerprint\n"
            "x = np.random.default_rng(0).standard_normal((64, 8)).astype('float32')\n"
            "d, i = faiss.knn(x, x, 3)\n"
            "print(json.dumps({'torch': torch.__version__, 'tv': torchvision.__version__, 'cuda': torch.cuda.is_available(),"
            " 'self_nn': bool((i[:, 0] == np.arange(64)).all()), 'fp': code_fingerprint(), 'kfp': kfp.__version__,"
            " 'mlflow': mlflow.__version__}))")
    got = json.loads(_run(engine, IMAGE, ["python", "-c", code]).splitlines()[-1])
    import kfp as host_kfp
    import torch as host_torch
    import torchvision as host_tv

    assert got["torch"] == host_torch.__version__ and got["tv"] == host_tv.__version__
    assert got["kfp"] == host_kfp.__version__ and got["mlflow"] == mlflow.__version__
    assert got["cuda"] is False and got["self_nn"] is True
    assert got["fp"] == code_fingerprint()  # the image carries exactly this checkout's lf2core + components
    assert "usage: lf2" in _run(engine, IMAGE, ["lf2", "--help"])


def test_no_credentials_in_the_image(engine: docker.DockerClient) -> None:
    img = engine.images.get(IMAGE)
    env_names = [e.split("=", 1)[0] for e in img.attrs["Config"]["Env"]]
    assert not [n for n in env_names if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", n)], env_names
    history = " ".join((h.get("CreatedBy") or "") for h in img.history())
    assert not re.search(r"AWS_|SECRET|PASSWORD|TOKEN|MLFLOW_TRACKING", history, re.I), history[:2000]
    assert ".whl" not in history.replace("requirements.lock", "")  # wheels were served, never copied in
    listing = _run(engine, IMAGE, ["sh", "-c", "find / -xdev \\( -name credentials -o -name .netrc -o -name "
                                   "'.git-credentials' -o -path '*/.docker/config.json' -o -path '*/.aws/*' "
                                   "-o -name '*.whl' -o -name pip.conf \\) -print 2>/dev/null | sort"])
    # (the base's own /usr/share/python-wheels, pip+setuptools for `python3 -m venv`, are Debian's, not ours)
    found = [p for p in listing.splitlines() if p and "/site-packages/" not in p and
             not p.startswith("/usr/share/python-wheels/")]
    assert found == [], found


def test_gpu_image_runs_its_cpu_paths_without_a_gpu(engine: docker.DockerClient) -> None:
    try:
        engine.images.get(GPU_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"{GPU_IMAGE} not built (make images VARIANT=gpu); CI builds the CPU image only")
    assert _run(engine, GPU_IMAGE, ["id", "-u"]) == str(EXPECTED_UID)
    code = ("import json, torch, faiss, numpy as np\n"
            "x = np.random.default_rng(0).standard_normal((64, 8)).astype('float32')\n"
            "d, i = faiss.knn(x, x, 3)\n"
            "from lf2core.cluster import pseudo_labels\n"
            "lab = pseudo_labels(x, method='kmeans', num_clusters=4)\n"
            "print(json.dumps({'cuda_build': torch.version.cuda, 'gpus': faiss.get_num_gpus(), "
            "'has_gpu_faiss': hasattr(faiss, 'StandardGpuResources'), 'cuda': torch.cuda.is_available(), "
            "'self_nn': bool((i[:, 0] == np.arange(64)).all()), 'labels': len(set(lab.tolist()))}))")
    got = json.loads(_run(engine, GPU_IMAGE, ["python", "-c", code]).splitlines()[-1])
    assert got["cuda_build"] and got["has_gpu_faiss"] and got["gpus"] == 0 and got["cuda"] is False
    assert got["self_nn"] is True and got["labels"] == 4
    assert engine.images.get(GPU_IMAGE).attrs["Config"]["Labels"]["io.lf2.variant"] == "gpu"


def _keys(bucket: str) -> list[str]:
    return [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]


def test_pipeline_in_containers_equals_the_subprocess_run(engine: docker.DockerClient, mlflow_server: str,
                                                          s3_env: str, tmp_path: Path, capfd: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"lf2-test-secret-{uuid.uuid4().hex}"  # moto takes any key: a unique one to look for afterwards
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("LF2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LF2_TRACKING", raising=False)
    name = f"lf2-reid-ct-{uuid.uuid4().hex[:6]}"
    overrides = TINY + [f"tracking.registered_model={name}"]
    results = {}
    for runner in ("docker", "subprocess"):
        prefix = f"s3://{s3_env}/{runner}"
        results[runner] = run_pipeline_local("demo", overrides, str(tmp_path / runner), object_prefix=prefix,
                                             experiment=f"ct-{runner}", run_name=f"ct-{runner}", cache=False,
                                             runner=runner, image=IMAGE)
    dock, sub = results["docker"], results["subprocess"]
    printed = capfd.readouterr()
    assert dock["runner"] == "docker" and dock["image"] == IMAGE
    # the components really ran in the image: its launcher printed the image check for every task
    assert printed.out.count(f"Found image {IMAGE!r}") >= 9

    # --- every stage's output is in the bucket, written from inside the containers
    keys = _keys(s3_env)
    for stage in STAGES:
        assert [k for k in keys if k.startswith(f"docker/{stage}/") and k.endswith("_COMPLETE")], stage
    # --- the MLflow run of the containers: finished, with metrics; registered as version 1, alias candidate
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(dock["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "ct-docker"
    assert run.data.tags.get("lf2.image") == IMAGE
    assert dock["version"] == "1" and sub["version"] == "2"
    mv = client.get_model_version(name, "1")
    assert mv.run_id == dock["run_id"]
    assert tracking.describe_aliases(name, mlflow_server) == {"candidate": "2"}
    # --- the same recipe, same numbers: registered metrics and the evaluation figures are identical
    assert dock["metrics"] and dock["metrics"] == sub["metrics"]
    m_dock = {k: v for k, v in run.data.metrics.items() if k.startswith(("round/", "epoch/", "summary/"))}
    m_sub = {k: v for k, v in client.get_run(sub["run_id"]).data.metrics.items() if k in m_dock}
    timing = re.compile(r"seconds|_s$|time|throughput|per_s", re.I)
    assert "summary/target_mAP" in m_dock and any(k.startswith("round/finetune/") for k in m_dock)
    assert {k: v for k, v in m_dock.items() if not timing.search(k)} == \
        {k: v for k, v in m_sub.items() if not timing.search(k)}
    assert client.get_model_version(name, "2").tags["metric.mAP"] == mv.tags["metric.mAP"]

    # --- the secret reached the containers (they wrote to S3) but no log line or output file holds it
    assert secret not in printed.out and secret not in printed.err
    for p in (tmp_path / "docker").rglob("*"):
        if p.is_file() and p.stat().st_size < 5_000_000:
            assert secret.encode() not in p.read_bytes(), p
