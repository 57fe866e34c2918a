"""A training stage as a Kubeflow Trainer TrainJob on M nodes (``lf2 pipeline compile --nodes M``).

Pinned API: Kubeflow Trainer **v2.1.0**, ``trainer.kubeflow.org/v1alpha1`` ``TrainJob``, run by the
``torch-distributed`` ``ClusterTrainingRuntime`` that release installs (its schema is kept in
``tests/schemas/trainjob-v2.1.0.schema.yaml``). That runtime's torch plugin sets ``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` in every node's
container, which ``torchrun`` reads: the TrainJob's command is the same ``torchrun -m lf2core.cli <cmd> ...``
as in a multi-GPU pod, in the project image.

The launcher (``run_trainjob``: kubernetes Python client, ``CustomObjectsApi``) creates the TrainJob,
watches it until its ``Complete`` or ``Failed`` condition is True (one progress line per change and per
quiet watch period), fails with one line after ``timeout_s``, checks that the stage's output was
committed (``_COMPLETE``) and returns its location, and deletes the TrainJob it created -- by name with
its uid as precondition, so nothing else is ever deleted -- whatever happened.

How things reach the pods:

- the resolved config (YAML text, the same string the pipeline passes between its tasks; it holds no
  secret) in the environment variable ``LF2_CONFIG_YAML``, written to ``/tmp/lf2-config.yaml`` by the
  container's ``sh -c`` before ``exec torchrun``;
- S3 and MLflow credentials by reference (``valueFrom.secretKeyRef`` of the Kubernetes secrets named in
  ``TrainJobSettings``): no secret value is ever in the TrainJob;
- stage inputs and the output as s3:// URIs: TrainJob pods cannot write the KFP artifact path, so the
  pipeline parameter ``object_prefix`` must be an s3:// prefix (``check_output_location``).

The Kubernetes API: the pod's service account (in-cluster config), else ~/.kube/config; the URL in
``LF2_KUBE_API`` instead when set (tests). This module never imports kfp.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets as _secrets
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from lf2core.errors import Lf2Error

log = logging.getLogger("lf2.components.trainjob")

TRAINER_RELEASE = "v2.1.0"
GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
DEFAULT_RUNTIME = "torch-distributed"
NODE_JOB = "node"  # the replicated job (and container) of the torch-distributed runtime
CONFIG_ENV = "LF2_CONFIG_YAML"
CONFIG_PATH = "/tmp/lf2-config.yaml"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
MANAGED_BY = {"app.kubernetes.io/managed-by": "lf2"}


@dataclass
class TrainJobSettings:
    """What the compiled pipeline fixes for the TrainJobs of its training stages (JSON in ``LF2_TRAINJOB``;
    names of secrets only, never values)."""

    nodes: int
    procs_per_node: int
    image: str
    runtime: str = DEFAULT_RUNTIME
    gpus_per_node: int = 1
    accelerator: str = "nvidia.com/gpu"
    cpu_request: str = "4"
    cpu_limit: str = "8"
    memory_request: str = "16G"
    memory_limit: str = "32G"
    shm_size: str = "8Gi"
    s3_secret: str = "lf2-s3"
    s3_secret_keys: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
    mlflow_secret: str = "lf2-mlflow"
    mlflow_secret_keys: tuple[str, ...] = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                           "MLFLOW_TRACKING_PASSWORD")
    env: dict[str, str] = field(default_factory=dict)
    namespace: str = ""  # "" = the namespace of the launcher's pod
    timeout_s: float = 7 * 24 * 3600.0
    watch_s: int = 60  # one watch request lasts at most this long (then a progress line)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainJobSettings":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise Lf2Error(f"environment variable LF2_TRAINJOB: not JSON ({e})") from None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise Lf2Error(f"environment variable LF2_TRAINJOB: unknown key {unknown[0]!r}")
        for k in ("s3_secret_keys", "mlflow_secret_keys"):
            if k in data:
                data[k] = tuple(data[k])
        return cls(**data)


def check_output_location(out: str, stage_name: str) -> None:
    """TrainJob pods write the stage output themselves: it must be an s3:// location."""
    if not str(out).startswith("s3://"):
        raise Lf2Error(f"pipeline parameter 'object_prefix' is empty or not s3:// (stage {stage_name} would write "
                       f"{out}): with --nodes the training stages run as TrainJobs, whose pods cannot write the "
                       "KFP artifact path; set object_prefix=s3://bucket/prefix")


def trainjob_name(stage_command: str, out: str) -> str:
    """``lf2-<cmd>-<8 hex of the output location>-<6 random hex>`` (<= 40 characters, DNS-1035)."""
    return f"lf2-{stage_command}-{hashlib.sha256(out.encode()).hexdigest()[:8]}-{_secrets.token_hex(3)}"


def _secret_env(secret: str, keys: Sequence[str], optional: bool) -> list[dict[str, Any]]:
    return [{"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k, "optional": optional}}}
            for k in keys]


def trainjob_manifest(name: str, settings: TrainJobSettings, argv: Sequence[str], config_yaml: str,
                      stage_name: str = "") -> dict[str, Any]:
    """The TrainJob (a dict for ``CustomObjectsApi``) running ``torchrun -m lf2core.cli <argv>`` on
    ``settings.nodes`` nodes x ``settings.procs_per_node`` processes. ``argv`` must name ``CONFIG_PATH`` as
    its ``--config``; ``config_yaml`` travels in ``LF2_CONFIG_YAML``."""
    script = (f'printf "%s\\n" "${CONFIG_ENV}" > {CONFIG_PATH} && exec torchrun -m lf2core.cli '
              + shlex.join(str(a) for a in argv))
    limits: dict[str, Any] = {"cpu": settings.cpu_limit, "memory": settings.memory_limit}
    if settings.gpus_per_node > 0:
        limits[settings.accelerator] = settings.gpus_per_node
    env = [{"name": k, "value": v} for k, v in sorted({**settings.env, "LF2_IMAGE": settings.image}.items())]
    env.append({"name": CONFIG_ENV, "value": config_yaml})
    env += _secret_env(settings.s3_secret, settings.s3_secret_keys, optional=False)
    env += _secret_env(settings.mlflow_secret, settings.mlflow_secret_keys, optional=True)
    labels = {**MANAGED_BY, **({"lf2/stage": stage_name} if stage_name else {})}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "runtimeRef": {"name": settings.runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": settings.image,
                "command": ["sh", "-c", script],
                "numNodes": settings.nodes,
                "numProcPerNode": settings.procs_per_node,
                "resourcesPerNode": {"requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
                                     "limits": limits},
                "env": env,
            },
            "podTemplateOverrides": [{
                "targetJobs": [{"name": NODE_JOB}],
                "spec": {
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}}],
                    "containers": [{"name": NODE_JOB, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
                },
            }],
        },
    }


def custom_objects_api(host: Optional[str] = None) -> Any:
    """A ``CustomObjectsApi``: at ``host`` when given (tests), else the in-cluster service account, else
    ~/.kube/config."""
    from kubernetes import client, config

    if host:
        conf = client.Configuration()
        conf.host = host
        return client.CustomObjectsApi(client.ApiClient(conf))
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def default_namespace(settings: TrainJobSettings) -> str:
    if settings.namespace:
        return settings.namespace
    p = Path(SA_NAMESPACE_FILE)
    if p.is_file():
        return p.read_text().strip()
    raise Lf2Error(f"TrainJob namespace: not set in LF2_TRAINJOB and no {SA_NAMESPACE_FILE} (not in a pod)")


def condition(obj: Mapping[str, Any], kind: str) -> Optional[dict[str, Any]]:
    """The status condition of type ``kind`` ("Complete", "Failed") when its status is "True", else None."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and str(c.get("status")) == "True":
            return c
    return None


def progress(obj: Mapping[str, Any]) -> str:
    """A one-line summary of a TrainJob's status: its conditions and the pods of its jobs."""
    st = obj.get("status") or {}
    conds = ", ".join(f"{c.get('type')}={c.get('status')}" for c in st.get("conditions") or []) or "no conditions"
    jobs = "; ".join(f"{j.get('name')}: " + " ".join(f"{k} {j[k]}" for k in ("active", "ready", "succeeded",
                                                                             "failed", "suspended") if j.get(k))
                     for j in st.get("jobsStatus") or [])
    return conds + (f"; {jobs}" if jobs else "")


def _one_line(e: BaseException) -> str:
    body = getattr(e, "body", None)
    if body:
        try:
            return str(json.loads(body).get("message", body))[:300]
        except (ValueError, AttributeError):
            return str(body)[:300]
    return (" ".join(str(e).split()) or type(e).__name__)[:300]


def run_trainjob(api: Any, namespace: str, manifest: dict[str, Any], output: str, timeout_s: float,
                 watch_s: int = 60) -> str:
    """Create ``manifest``, watch it until Complete/Failed or ``timeout_s``, delete it; returns ``output``
    once the TrainJob completed and the output is committed. Lf2Error (one line) on a failed, timed-out or
    refused TrainJob, or a completed one whose output is not committed."""
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    from lf2core import storage

    name = manifest["metadata"]["name"]
    where = f"TrainJob {namespace}/{name}"
    t0 = time.monotonic()
    try:
        created = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    except ApiException as e:
        raise Lf2Error(f"{where}: the Kubernetes API refused to create it ({e.status}: {_one_line(e)})") from None
    except Exception as e:  # connection refused, DNS, TLS
        raise Lf2Error(f"{where}: cannot reach the Kubernetes API ({type(e).__name__}: {_one_line(e)})") from None
    uid = created["metadata"].get("uid", "")
    restore = _exit_on_sigterm()  # a cancelled run (SIGTERM to the pod) still deletes the TrainJob below
    log.info("%s created (%s nodes x %s processes, runtime %s)", where, manifest["spec"]["trainer"]["numNodes"],
             manifest["spec"]["trainer"]["numProcPerNode"], manifest["spec"]["runtimeRef"]["name"])
    try:
        obj, rv, last = created, created["metadata"].get("resourceVersion", ""), ""
        while True:
            failed = condition(obj, "Failed")
            if failed:
                message = " ".join(str(failed.get("message", "")).split())[:300]
                raise Lf2Error(f"{where} failed ({failed.get('reason', '')}: {message})")
            if condition(obj, "Complete"):
                break
            left = timeout_s - (time.monotonic() - t0)
            if left <= 0:
                raise Lf2Error(f"{where}: neither Complete nor Failed after {timeout_s:g} s (last status: "
                               f"{progress(obj)}); deleting it")
            w = watch.Watch()
            period = max(1, int(min(watch_s, left + 0.999)))
            seen = False
            for ev in w.stream(api.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                               field_selector=f"metadata.name={name}", resource_version=rv,
                               timeout_seconds=period, _request_timeout=period + 30):
                o = ev.get("object") or {}
                if ev.get("type") == "ERROR":
                    rv = ""  # e.g. 410 Gone: start again from a fresh GET
                    break
                if ev.get("type") == "DELETED":
                    raise Lf2Error(f"{where}: deleted by someone else before it finished")
                obj, rv = o, (o.get("metadata") or {}).get("resourceVersion", rv)
                seen = True
                line = progress(obj)
                if line != last:
                    log.info("%s: %s (%.0f s)", where, line, time.monotonic() - t0)
                    last = line
                if condition(obj, "Complete") or condition(obj, "Failed"):
                    w.stop()
                    break
            if not seen:  # a quiet period: read it again (also catches a missed event)
                try:
                    obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
                except ApiException as e:
                    if e.status == 404:
                        raise Lf2Error(f"{where}: deleted by someone else before it finished") from None
                    raise
                rv = obj["metadata"].get("resourceVersion", "")
                log.info("%s: %s (%.0f s)", where, progress(obj), time.monotonic() - t0)
        log.info("%s complete after %.0f s", where, time.monotonic() - t0)
        if not storage.is_complete(output):
            raise Lf2Error(f"{where} completed but its output {output} is not committed (no _COMPLETE marker)")
        return output
    finally:
        _delete(api, namespace, name, uid, where)
        restore()


def _exit_on_sigterm() -> Any:
    """Turn SIGTERM into SystemExit (so ``finally`` blocks run) until the returned function is called;
    a no-op outside the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(f"TrainJob launcher: terminated (signal {signum})")

    old = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, old)


def _delete(api: Any, namespace: str, name: str, uid: str, where: str) -> None:
    """Delete the TrainJob this launcher created (uid precondition: never another object of that name)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    body = client.V1DeleteOptions(propagation_policy="Foreground",
                                  preconditions=client.V1Preconditions(uid=uid) if uid else None)
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body=body)
        log.info("%s deleted", where)
    except ApiException as e:
        if e.status != 404:
            log.warning("%s: could not delete it (%s: %s); delete it by hand", where, e.status, _one_line(e))
    except Exception as e:  # never hide the stage's own outcome
        log.warning("%s: could not delete it (%s); delete it by hand", where, _one_line(e))


def run_stage_trainjob(settings: TrainJobSettings, stage: Any, config_yaml: str, uris: Sequence[str], out: str,
                       params: Mapping[str, Any], api: Any = None) -> str:
    """Stage ``stage`` as a TrainJob writing ``out`` (an s3:// location); returns ``out``."""
    from components.launch import stage_argv

    check_output_location(out, stage.name)
    argv = stage_argv(stage, CONFIG_PATH, uris, out, params)
    manifest = trainjob_manifest(trainjob_name(stage.command, out), settings, argv, config_yaml, stage.name)
    api = api or custom_objects_api(os.environ.get("LF2_KUBE_API") or None)
    return run_trainjob(api, default_namespace(settings), manifest, out, settings.timeout_s, settings.watch_s)
