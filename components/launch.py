"""How a training stage runs inside its component: in-process (default), under ``torchrun`` with N
processes in the pod (``lf2 pipeline compile --gpus N``, N > 1), or as a Kubeflow Trainer TrainJob on M
nodes (``--nodes M``, ``components.trainjob``).

The compiled pipeline tells the component which, through environment variables set on the task:

- ``LF2_NPROC_PER_NODE`` = N: run ``torchrun --standalone --nproc-per-node N -m lf2core.cli <cmd> --config
  <resolved config written to a temp file> --<input> URI ... --out URI [--<param> V]`` as a subprocess, its
  output streamed to the component's log; a non-zero exit fails the task with one line (the last
  ``lf2: error:`` line a rank printed, else the last line);
- ``LF2_TRAINJOB`` = the JSON of ``components.trainjob.TrainJobSettings``: create a TrainJob running the same
  ``lf2 <cmd>`` in the project image and wait for it (``components.trainjob.run_stage_trainjob``).

Only the stages in ``DISTRIBUTED_STAGES`` (pretrain-source, extract-features, finetune) are launched this
way; the others always run in-process. The stage's result (the metrics the component logs) is then read
back from its committed output (``lf2core.stages.rounds.stage_summary``). This module never imports kfp.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from lf2core.errors import Lf2Error

log = logging.getLogger("lf2.components.launch")

NPROC_ENV = "LF2_NPROC_PER_NODE"
TRAINJOB_ENV = "LF2_TRAINJOB"
DISTRIBUTED_STAGES = ("pretrain-source", "extract-features", "finetune")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")  # = the `torchrun` console script of this Python


def stage_argv(stage: Any, config_path: str, uris: Sequence[str], out: str, params: Mapping[str, Any]) -> list[str]:
    """The ``lf2`` arguments that run ``stage`` (a ``lf2core.stages.table.Stage``) like its function call
    ``stage(cfg, *uris, out, **params)``: ``[<cmd>, --config, config_path, --<input> uri ..., --out out,
    <param flag> value ...]``; a param whose value is None is left out (the command's default)."""
    if len(uris) != len(stage.inputs):
        raise ValueError(f"stage {stage.name}: {len(stage.inputs)} inputs expected, got {len(uris)}")
    argv = [stage.command, "--config", config_path]
    for port, uri in zip(stage.inputs, uris):
        argv += [f"--{port.name}", str(uri)]
    if stage.output is not None:
        argv += ["--out", str(out)]
    for p in stage.params:
        if params.get(p.name) is not None:
            argv += [p.flag, str(params[p.name])]
    return argv


def torchrun_command(nproc: int, argv: Sequence[str], module: str = "lf2core.cli",
                     torchrun: Sequence[str] = TORCHRUN) -> list[str]:
    """``torchrun --standalone --nproc-per-node <nproc> -m <module> <argv...>`` (single node, rendezvous on
    a free local port)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    return [*torchrun, "--standalone", f"--nproc-per-node={nproc}", "-m", module, *argv]


def run_streamed(cmd: Sequence[str], what: str, env: Optional[Mapping[str, str]] = None,
                 out: Any = None) -> None:
    """Run ``cmd``, copying its stdout+stderr line by line to ``out`` (default sys.stdout) as it comes.
    Non-zero exit: Lf2Error ``<what> exited with status S: <last 'lf2: error:' line, else the last line>``."""
    out = out or sys.stdout
    tail: deque[str] = deque(maxlen=50)
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=dict(env) if env is not None else None)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if line.strip():
                tail.append(line.rstrip("\n"))
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        errors = [ln for ln in tail if "lf2: error:" in ln]
        last = (errors or list(tail) or ["(no output)"])[-1].strip()
        raise Lf2Error(f"{what} exited with status {rc}: {last[:400]}")


def subprocess_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """This process's environment without the launch switches (a child never relaunches itself), with the
    directory holding ``lf2core`` first on PYTHONPATH (the component's imports work in the child too)."""
    import lf2core

    env = {k: v for k, v in os.environ.items() if k not in (NPROC_ENV, TRAINJOB_ENV)}
    root = str(Path(lf2core.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def run_torchrun(stage: Any, config_yaml: str, uris: Sequence[str], out: str, params: Mapping[str, Any],
                 nproc: int) -> None:
    """Stage ``stage`` under torchrun with ``nproc`` processes; the resolved config goes to a temp file
    (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="lf2-launch-") as tmp:
        config_path = Path(tmp, "config.yaml")
        config_path.write_text(config_yaml)
        cmd = torchrun_command(nproc, stage_argv(stage, str(config_path), uris, out, params))
        log.info("stage %s: torchrun with %d processes: %s", stage.name, nproc, " ".join(cmd))
        run_streamed(cmd, f"stage {stage.name}: torchrun ({nproc} processes)", env=subprocess_env())


def launch_mode(stage_name: str, environ: Optional[Mapping[str, str]] = None) -> tuple[str, Any]:
    """(``"in-process"``, None) | (``"torchrun"``, N) | (``"trainjob"``, TrainJobSettings) for this stage."""
    environ = os.environ if environ is None else environ
    if stage_name not in DISTRIBUTED_STAGES:
        return "in-process", None
    if environ.get(TRAINJOB_ENV):
        from components.trainjob import TrainJobSettings

        return "trainjob", TrainJobSettings.from_json(environ[TRAINJOB_ENV])
    text = environ.get(NPROC_ENV, "")
    if text:
        try:
            n = int(text)
        except ValueError:
            raise Lf2Error(f"environment variable {NPROC_ENV}: expected an integer, got {text!r}") from None
        if n > 1:
            return "torchrun", n
    return "in-process", None


def run_stage_function(stage: Any, cfg: Any, config_yaml: str, uris: Sequence[str], out: str,
                       params: Mapping[str, Any]) -> Any:
    """Run ``stage(cfg, *uris, out, **params)`` the way the task was compiled for (``launch_mode``).
    Returns the stage's result: its return value in-process, else what its committed output reports."""
    mode, arg = launch_mode(stage.name)
    if mode == "in-process":
        return stage(cfg, *uris, *([out] if out else []), **params)
    if mode == "torchrun":
        run_torchrun(stage, config_yaml, uris, out, params, arg)
    else:
        from components.trainjob import run_stage_trainjob

        run_stage_trainjob(arg, stage, config_yaml, uris, out, params)
    from lf2core.stages.rounds import stage_summary

    return stage_summary(stage.name, out)


def stage_runner(cfg: Any, config_yaml: str, after: Any = None) -> Any:
    """A ``lf2core.stages.rounds.StageRunner`` (the several-rounds task's runner) that launches the training
    stages as compiled (``launch_mode``): such a stage's incomplete output is written by torchrun / a
    TrainJob first, then the runner finds it complete and goes on as usual (MLflow logging, timing)."""
    import time

    from lf2core import storage
    from lf2core.stages.rounds import StageRunner
    from lf2core.stages.table import stage as table_stage

    class LaunchingStageRunner(StageRunner):
        def run(self, name: str, out: str, *inputs: str, round_index: Optional[int] = None, **params: Any) -> str:
            mode, arg = launch_mode(name)
            if mode != "in-process" and not storage.is_complete(out):
                st = table_stage(name)
                p = dict(params)
                if round_index is not None and any(q.name == "round_index" for q in st.params):
                    p["round_index"] = round_index
                t0 = time.time()
                if mode == "torchrun":
                    run_torchrun(st, config_yaml, inputs, out, p, arg)
                else:
                    from components.trainjob import run_stage_trainjob

                    run_stage_trainjob(arg, st, config_yaml, inputs, out, p)
                key = name.split("-")[0]
                self.seconds[key] = self.seconds.get(key, 0.0) + time.time() - t0
            return super().run(name, out, *inputs, round_index=round_index, **params)

    return LaunchingStageRunner(cfg, after=after)
