"""Build (and optionally push) the lf2 images with the docker SDK.

    python docker/build.py [--variant cpu|gpu|all] [--repo ghcr.io/lf2-reid/lf2] [--tag 0.1.0] [--push]
    python docker/build.py --dry-run          # print the plan and the context file list, build nothing

The build context is the repository root, filtered by ``docker/<Dockerfile>.dockerignore`` (the SDK's
classic builder does not read per-Dockerfile ignore files itself, so the context tar is made here).
Tags: ``<repo>:<tag>`` for the CPU image and ``<repo>:<tag>-gpu`` for the GPU image. The tag printed at
the end is what ``lf2 pipeline compile --image`` expects.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

REPO = Path(__file__).resolve().parent.parent
DOCKER_DIR = Path(__file__).resolve().parent
VARIANTS = {"cpu": ("docker/Dockerfile", ""), "gpu": ("docker/Dockerfile.gpu", "-gpu")}
DEFAULT_REPO = "ghcr.io/lf2-reid/lf2"


def project_version() -> str:
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.strip().startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    return "latest"


def ignore_patterns(dockerfile: str) -> list[str]:
    """Patterns of ``<dockerfile>.dockerignore`` (comments and blanks dropped)."""
    path = REPO / f"{dockerfile}.dockerignore"
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def context_files(dockerfile: str) -> list[str]:
    """The files the build context will contain (the docker SDK's own ignore-pattern matching)."""
    from docker.utils.build import exclude_paths

    return sorted(exclude_paths(str(REPO), ignore_patterns(dockerfile), dockerfile=dockerfile))


def plan(variants: list[str], repo: str, tag: str) -> list[dict[str, Any]]:
    return [{"variant": v, "dockerfile": VARIANTS[v][0], "image": f"{repo}:{tag}{VARIANTS[v][1]}"} for v in variants]


def _stream(lines: Iterator[dict[str, Any]]) -> Optional[str]:
    image_id = None
    for chunk in lines:
        if "stream" in chunk:
            sys.stdout.write(chunk["stream"])
        elif "status" in chunk:
            sys.stdout.write(chunk["status"] + (" " + chunk.get("progress", "") if chunk.get("progress") else "") + "\n")
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
        if "error" in chunk:
            raise RuntimeError(chunk["error"].strip())
    return image_id


def build(item: dict[str, Any], pull: bool = True, no_cache: bool = False) -> str:
    """Build one image; returns its id."""
    import docker
    from docker.utils.build import tar

    client = docker.from_env()
    dockerfile = item["dockerfile"]
    context = tar(str(REPO), exclude=ignore_patterns(dockerfile), dockerfile=(dockerfile, None), gzip=True)
    print(f"building {item['image']} from {dockerfile}", flush=True)
    lines = client.api.build(fileobj=context, custom_context=True, encoding="gzip", dockerfile=dockerfile,
                             tag=item["image"], rm=True, pull=pull, nocache=no_cache, decode=True)
    image_id = _stream(lines) or ""
    print(f"built {item['image']} {image_id}")
    return image_id


def push(image: str) -> None:
    import docker

    repo, tag = image.rsplit(":", 1)
    print(f"pushing {image}", flush=True)
    _stream(docker.from_env().api.push(repo, tag=tag, stream=True, decode=True))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="docker/build.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=["cpu", "gpu", "all"], default="all")
    p.add_argument("--repo", default=DEFAULT_REPO)
    p.add_argument("--tag", default=project_version())
    p.add_argument("--push", action="store_true")
    p.add_argument("--no-pull", action="store_true", help="do not pull a newer base image")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the plan and context files as JSON")
    args = p.parse_args(argv)
    variants = ["cpu", "gpu"] if args.variant == "all" else [args.variant]
    items = plan(variants, args.repo, args.tag)
    if args.dry_run:
        for item in items:
            item["context_files"] = context_files(item["dockerfile"])
        print(json.dumps(items, indent=2))
        return 0
    try:
        for item in items:
            build(item, pull=not args.no_pull, no_cache=args.no_cache)
            if args.push:
                push(item["image"])
    except Exception as e:  # docker.errors.DockerException (no daemon), build errors
        print(f"docker/build.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for item in items:
        print(f"image ready: {item['image']}  (lf2 pipeline compile --image {item['image']})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
