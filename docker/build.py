"""Build the lf2 images with the docker SDK: base image, wheelhouse, CPU and GPU variants.

    python docker/build.py images [--variant cpu|gpu|all] [--base IMAGE] [--repo lf2] [--push]   (make images)
    python docker/build.py base                     # Debian bookworm + python3 from Debian packages (make base-image)
    python docker/build.py wheelhouse [--variant ...]   # every locked wheel under build/wheelhouse (pip, on the host)
    python docker/build.py lock                     # rewrite docker/requirements-{cpu,gpu}.lock from pyproject.toml
    python docker/build.py plan [--variant ...]     # the tags and the build-context file list as JSON; builds nothing

Tags: ``<repo>:<version>-<git sha>`` (CPU) and ``<repo>:<version>-<git sha>-gpu``, what ``lf2 pipeline
compile`` uses by default (``components/image.py``). Without ``--base``, the base is ``lf2-base:bookworm``,
made here with debootstrap when the engine does not have it (no registry needed). The wheels come from
the wheelhouse, served on 127.0.0.1 while the image builds with host networking, so they never enter a
layer; ``--no-wheelhouse`` installs from the package index instead (a site with a registry and the index).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components.image import IMAGE_REPO, git_sha, image_tag, version  # noqa: E402

DOCKERFILE = "docker/Dockerfile"
VARIANTS = ("cpu", "gpu")
LOCKS = {v: REPO / "docker" / f"requirements-{v}.lock" for v in VARIANTS}
# the GPU image swaps faiss-cpu for the CUDA build of the same release (it bundles no CUDA runtime of its
# own: pip brings nvidia-*-cu12 wheels); torch/torchvision are the same wheels in both variants (see lock())
GPU_SWAP = {"faiss-cpu": "faiss-gpu"}
BUILD_REQUIREMENTS = ("setuptools>=77",)  # pyproject's build backend, for installing the project offline
WHEELHOUSE = REPO / "build" / "wheelhouse"
BASE_TAG = "lf2-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
LF2_UID = 10001


class BuildError(Exception):
    """A failure worth one line to the user."""


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def client():
    """A docker SDK client whose engine answers; BuildError (one line) otherwise."""
    try:
        import docker
    except ImportError:
        raise BuildError("the docker SDK is not installed (pip install docker)") from None
    try:
        c = docker.from_env(timeout=600)
        c.ping()
        return c
    except Exception as e:  # DockerException: no socket, permission denied, engine down
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BuildError(f"no Docker engine answers at {docker_host()} ({msg[:160]}); start one "
                         "(docker/engine.sh start, as root) or set DOCKER_HOST") from None


# ---------------------------------------------------------------------------------------------- context
def ignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def context_files() -> list[str]:
    """The files the build context holds (the docker SDK's own .dockerignore matching)."""
    from docker.utils.build import exclude_paths

    return sorted(exclude_paths(str(REPO), ignore_patterns(), dockerfile=DOCKERFILE))


def plan(variants: list[str], repo: str, sha: Optional[str] = None) -> list[dict[str, Any]]:
    return [{"variant": v, "dockerfile": DOCKERFILE, "lock": str(LOCKS[v].relative_to(REPO)),
             "image": image_tag(v, repo, sha)} for v in variants]


# ---------------------------------------------------------------------------------------------- lock
def _pyproject_dependencies() -> list[str]:
    import tomllib

    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


def _requirement_name(req: str) -> str:
    import re

    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower()


def lock(constraints: Optional[Path] = None) -> dict[str, int]:
    """Resolve pyproject's runtime dependencies (CPU) and the GPU swap into exact pins, one file each.

    ``constraints`` (default: ``pip freeze`` of this interpreter's environment, i.e. the developer venv
    made by ``make install``) keeps the images on the very versions the tests ran with."""
    pip = [sys.executable, "-m", "pip"]
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        if constraints is None:
            constraints = Path(tmp, "constraints.txt")
            frozen = subprocess.run(pip + ["freeze", "--exclude-editable"], capture_output=True, text=True,
                                    check=True).stdout
            constraints.write_text("\n".join(ln for ln in frozen.splitlines() if not ln.startswith("-e ")) + "\n")
        for variant in VARIANTS:
            reqs = []
            for r in _pyproject_dependencies():
                name = _requirement_name(r)
                if variant == "gpu" and name in GPU_SWAP:
                    r = GPU_SWAP[name] + r[len(name):]
                reqs.append(r)
            report = Path(tmp, f"report-{variant}.json")
            cmd = pip + ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                         "-c", str(constraints)]
            if variant == "gpu":  # faiss-gpu is not in the venv: drop faiss-cpu's pin from the constraints
                gpu_c = Path(tmp, "constraints-gpu.txt")
                gpu_c.write_text("".join(ln + "\n" for ln in constraints.read_text().splitlines()
                                         if _requirement_name(ln) not in GPU_SWAP))
                cmd[-1] = str(gpu_c)
            r = subprocess.run(cmd + reqs, capture_output=True, text=True)
            if r.returncode != 0:
                raise BuildError(f"pip could not resolve the {variant} requirements: {r.stderr.strip()[-600:]}")
            items = json.loads(report.read_text())["install"]
            pins = sorted(f"{i['metadata']['name'].lower()}=={i['metadata']['version']}" for i in items)
            header = (f"# lf2 {variant} image: every runtime package, exact versions (python 3.11, linux x86_64).\n"
                      f"# Generated by `python docker/build.py lock` from pyproject.toml"
                      f"{' (faiss-cpu -> faiss-gpu)' if variant == 'gpu' else ''}, pinned to the venv of `make install`.\n"
                      "# Installed with --no-deps: this list is the whole closure.\n")
            LOCKS[variant].write_text(header + "\n".join(pins) + "\n")
            counts[variant] = len(pins)
            log(f"wrote {LOCKS[variant].relative_to(REPO)} ({len(pins)} packages)")
    return counts


def locked(variant: str) -> list[str]:
    return [ln.strip() for ln in LOCKS[variant].read_text().splitlines() if ln.strip() and not ln.startswith("#")]


# ---------------------------------------------------------------------------------------------- wheelhouse
def wheelhouse(variants: list[str], dest: Path = WHEELHOUSE) -> dict[str, Any]:
    """Every wheel the images install, under ``dest`` (sdists such as kfp-server-api are built into wheels)."""
    import hashlib

    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pins = sorted({p for v in variants for p in locked(v)})
    text = "\n".join(pins + list(BUILD_REQUIREMENTS)) + "\n"
    stamp = dest / f".complete-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    if stamp.is_file():
        wheels = list(dest.glob("*.whl"))
        log(f"wheelhouse up to date: {len(wheels)} wheels in {dest.relative_to(REPO)} (for {'+'.join(variants)})")
        return {"wheels": len(wheels), "bytes": sum(w.stat().st_size for w in wheels), "seconds": 0.0,
                "cached": True}
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp, "requirements.txt")
        reqs.write_text(text)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dest), "-r", str(reqs)]
        log(f"wheelhouse: {len(pins)} packages for {'+'.join(variants)} -> {dest.relative_to(REPO)}")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"pip wheel failed: {r.stderr.strip()[-600:]}")
    stamp.write_text(text)
    wheels = list(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    res = {"wheels": len(wheels), "bytes": size, "seconds": round(time.time() - t0, 1), "cached": False}
    log(f"wheelhouse ready: {len(wheels)} wheels, {size / 1e9:.2f} GB, {res['seconds']} s")
    return res


WHEELHOUSE_PORT = int(os.environ.get("LF2_WHEELHOUSE_PORT", "48765"))


@contextlib.contextmanager
def serve(directory: Path, port: int = WHEELHOUSE_PORT) -> Iterator[str]:
    """Serve ``directory`` read-only over HTTP on 127.0.0.1 for the build; yields the URL.

    The port is fixed (``$LF2_WHEELHOUSE_PORT``, default 48765) because the URL is a build argument of the
    dependency layer: another URL would invalidate that cached layer. A busy port falls back to a free one."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    try:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as e:
        log(f"warning: 127.0.0.1:{port} is busy ({e.strerror}): serving the wheelhouse on a free port, so the "
            "cached dependency layer cannot be reused")
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass


# ---------------------------------------------------------------------------------------------- base image
def base_image(tag: str = BASE_TAG, mirror: str = DEBIAN_MIRROR) -> dict[str, Any]:
    """Debian bookworm minbase + python3/venv from Debian packages (debootstrap), imported as ``tag``."""
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed (apt-get install -y debootstrap), or pass --base IMAGE")
    if os.geteuid() != 0:
        raise BuildError("making the base image needs root (debootstrap), or pass --base IMAGE")
    c = client()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="lf2-base-", dir=REPO / "build" if (REPO / "build").is_dir() else None) as tmp:
        rootfs = Path(tmp, "rootfs")
        log(f"debootstrap bookworm ({', '.join(BASE_PACKAGES)}) from {mirror}")
        r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm",
                            str(rootfs), mirror], capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"debootstrap failed: {(r.stdout + r.stderr).strip()[-400:]}")
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / sub).glob("*"):
                if p.is_file():
                    p.unlink()
        shutil.rmtree(rootfs / "var/log", ignore_errors=True)
        (rootfs / "var/log").mkdir()
        tarball = Path(tmp, "rootfs.tar")
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        repo, _, t = tag.partition(":")
        changes = ["ENV LANG=C.UTF-8", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   'CMD ["python3"]', 'LABEL org.opencontainers.image.description="Debian bookworm minbase + python3 '
                   '(debootstrap)"']
        c.api.import_image_from_file(str(tarball), repository=repo, tag=t or "latest", changes=changes)
    size = c.images.get(tag).attrs["Size"]
    res = {"image": tag, "bytes": size, "seconds": round(time.time() - t0, 1)}
    log(f"base image {tag}: {size / 1e6:.0f} MB in {res['seconds']} s")
    return res


# ---------------------------------------------------------------------------------------------- images
def _stream(lines: Iterator[dict[str, Any]], quiet: bool = False) -> Optional[str]:
    image_id = None
    for chunk in lines:
        if "stream" in chunk and not quiet:
            sys.stdout.write(chunk["stream"])
            sys.stdout.flush()
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
        if "error" in chunk:
            raise BuildError(chunk["error"].strip().splitlines()[-1])
    return image_id


def build_image(c, item: dict[str, Any], base: str, wheelhouse_url: str = "", no_cache: bool = False,
                quiet: bool = False) -> dict[str, Any]:
    """Build one variant; returns ``{"image", "id", "bytes", "seconds"}``."""
    from docker.utils.build import tar

    t0 = time.time()
    sha = item["image"].rsplit(":", 1)[1]
    context = tar(str(REPO), exclude=ignore_patterns(), dockerfile=(DOCKERFILE, None), gzip=True)
    args = {"BASE_IMAGE": base, "VARIANT": item["variant"], "WHEELHOUSE_URL": wheelhouse_url,
            "LF2_UID": str(LF2_UID), "VERSION": version(), "VCS_REF": git_sha() or "unknown",
            "IMAGE_TAG": item["image"], "NVIDIA_VISIBLE_DEVICES": "all" if item["variant"] == "gpu" else ""}
    log(f"building {item['image']} ({item['variant']}) FROM {base}"
        f"{' with the wheelhouse at ' + wheelhouse_url if wheelhouse_url else ' from the package index'}")
    lines = c.api.build(fileobj=context, custom_context=True, encoding="gzip", dockerfile=DOCKERFILE,
                        tag=item["image"], buildargs=args, network_mode="host", rm=True, forcerm=True,
                        pull=False, nocache=no_cache, decode=True)
    image_id = _stream(lines, quiet=quiet) or ""
    size = c.images.get(item["image"]).attrs["Size"]
    res = {"image": item["image"], "id": image_id, "bytes": size, "seconds": round(time.time() - t0, 1),
           "tag_sha": sha}
    log(f"built {item['image']}: {size / 1e9:.2f} GB in {res['seconds']} s")
    return res


def push(c, image: str) -> None:
    repo, tag = image.rsplit(":", 1)
    log(f"pushing {image}")
    for chunk in c.api.push(repo, tag=tag, stream=True, decode=True):
        if "error" in chunk:
            raise BuildError(f"push of {image} failed: {chunk['error'].strip()}")


def images(variants: list[str], repo: str = IMAGE_REPO, base: Optional[str] = None, use_wheelhouse: bool = True,
           push_images: bool = False, no_cache: bool = False, quiet: bool = False) -> dict[str, Any]:
    c = client()
    report: dict[str, Any] = {"variants": variants}
    if base is None:
        base = BASE_TAG
        if not c.images.list(name=BASE_TAG):
            report["base"] = base_image(BASE_TAG)
        else:
            log(f"base image {BASE_TAG} present (rebuild: make base-image)")
    if git_sha() is None:
        log("warning: not a git checkout: the tags carry the version only")
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        log("warning: uncommitted changes are built into images tagged with the last commit")
    with contextlib.ExitStack() as stack:
        url = ""
        if use_wheelhouse:
            report["wheelhouse"] = wheelhouse(variants)
            url = stack.enter_context(serve(WHEELHOUSE))
        report["images"] = []
        for item in plan(variants, repo):
            report["images"].append(build_image(c, item, base, url, no_cache=no_cache, quiet=quiet))
            if push_images:
                push(c, item["image"])
    print("\nimage                                     size")
    for r in report["images"]:
        print(f"  {r['image']:<40} {r['bytes'] / 1e9:.2f} GB  ({r['seconds']:.0f} s)")
    print(f"\nlf2 pipeline compile uses {report['images'][0]['image']} by default (--image to change)")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="docker/build.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def variant_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--variant", choices=["cpu", "gpu", "all"], default="all")

    q = sub.add_parser("images", help="build the images (base and wheelhouse as needed)")
    variant_arg(q)
    q.add_argument("--base", default=None, help=f"base image (default: {BASE_TAG}, made with debootstrap if absent)")
    q.add_argument("--repo", default=IMAGE_REPO, help="image repository, e.g. registry.example.com/ml/lf2")
    q.add_argument("--push", action="store_true")
    q.add_argument("--no-wheelhouse", action="store_true", help="pip installs from the package index in the build")
    q.add_argument("--no-cache", action="store_true")
    q.add_argument("--quiet", action="store_true", help="do not echo the build steps")
    q.add_argument("--report", default=None, help="write the figures (sizes, seconds) as JSON here")
    q = sub.add_parser("base", help=f"make {BASE_TAG} from Debian packages (debootstrap; root)")
    q.add_argument("--tag", default=BASE_TAG)
    q.add_argument("--mirror", default=DEBIAN_MIRROR)
    q = sub.add_parser("wheelhouse", help=f"download/build the locked wheels into {WHEELHOUSE.relative_to(REPO)}")
    variant_arg(q)
    sub.add_parser("lock", help="re-resolve docker/requirements-{cpu,gpu}.lock")
    q = sub.add_parser("plan", help="print tags and build-context files as JSON")
    variant_arg(q)
    q.add_argument("--repo", default=IMAGE_REPO)
    args = p.parse_args(argv)
    variants = list(VARIANTS) if getattr(args, "variant", "all") == "all" else [args.variant]
    try:
        if args.cmd == "plan":
            items = plan(variants, args.repo)
            for item in items:
                item["context_files"] = context_files()
            print(json.dumps(items, indent=2))
        elif args.cmd == "lock":
            lock()
        elif args.cmd == "wheelhouse":
            wheelhouse(variants)
        elif args.cmd == "base":
            base_image(args.tag, args.mirror)
        else:
            report = images(variants, args.repo, args.base, not args.no_wheelhouse, args.push, args.no_cache,
                            args.quiet)
            if args.report:
                Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    except BuildError as e:
        print(f"docker/build.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
