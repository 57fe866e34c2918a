"""Multi-process stages in one pod (``components.launch``): the torchrun command built for a stage, and a
real ``torchrun --standalone`` run of 2 processes (gloo on CPU) through the launcher, streamed, with its
failure turned into one line."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from components import launch
from lf2core.errors import Lf2Error
from lf2core.stages.table import stage

RANK_SCRIPT = '''
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist

out = Path(sys.argv[sys.argv.index("--out") + 1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)  # 1 + 2 = 3 when both ranks take part
print(f"rank {rank} of {world}: sum {t.item():g}", flush=True)
if "--fail-rank" in sys.argv and rank == int(sys.argv[sys.argv.index("--fail-rank") + 1]):
    print("lf2: error: config key 'x': bad on purpose", file=sys.stderr, flush=True)
    sys.exit(2)
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "sum": t.item(),
                                                  "local_rank": int(os.environ["LOCAL_RANK"])}))
dist.destroy_process_group()
'''


def test_stage_argv_follows_the_stage_table() -> None:
    ext = stage("extract-features")
    assert launch.stage_argv(ext, "/tmp/c.yaml", ["s3://b/data", "s3://b/model"], "s3://b/out",
                             {"split": "target_train"}) == [
        "extract", "--config", "/tmp/c.yaml", "--data", "s3://b/data", "--model", "s3://b/model",
        "--out", "s3://b/out", "--split", "target_train"]
    pre = stage("pretrain-source")
    assert launch.stage_argv(pre, "c.yaml", ["d"], "o", {}) == ["pretrain", "--config", "c.yaml", "--data", "d",
                                                                "--out", "o"]
    assert launch.stage_argv(stage("finetune"), "c", ["d", "l", "m"], "o", {"round_index": 4})[-2:] == ["--round", "4"]
    with pytest.raises(ValueError, match="3 inputs expected"):
        launch.stage_argv(stage("finetune"), "c", ["d"], "o", {})


def test_torchrun_command() -> None:
    cmd = launch.torchrun_command(4, ["finetune", "--config", "c.yaml"])
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m",
                   "lf2core.cli", "finetune", "--config", "c.yaml"]
    assert launch.torchrun_command(2, ["x"], torchrun=["torchrun"])[:3] == ["torchrun", "--standalone",
                                                                             "--nproc-per-node=2"]
    with pytest.raises(ValueError):
        launch.torchrun_command(0, [])


def test_launch_mode_from_the_task_environment() -> None:
    assert launch.launch_mode("finetune", {}) == ("in-process", None)
    assert launch.launch_mode("finetune", {launch.NPROC_ENV: "1"}) == ("in-process", None)
    assert launch.launch_mode("finetune", {launch.NPROC_ENV: "2"}) == ("torchrun", 2)
    assert launch.launch_mode("cluster", {launch.NPROC_ENV: "2"}) == ("in-process", None)  # not a training stage
    assert launch.launch_mode("evaluate", {launch.NPROC_ENV: "2"}) == ("in-process", None)
    mode, settings = launch.launch_mode("pretrain-source", {launch.TRAINJOB_ENV: json.dumps(
        {"nodes": 3, "procs_per_node": 2, "image": "img"})})
    assert mode == "trainjob" and settings.nodes == 3 and settings.procs_per_node == 2
    with pytest.raises(Lf2Error, match="LF2_NPROC_PER_NODE: expected an integer, got 'two'"):
        launch.launch_mode("finetune", {launch.NPROC_ENV: "two"})


def _rank_module(tmp_path: Path) -> str:
    (tmp_path / "lf2_rank_probe.py").write_text(RANK_SCRIPT)
    return "lf2_rank_probe"


def test_torchrun_two_processes_stream_and_write(tmp_path: Path) -> None:
    module = _rank_module(tmp_path)
    out = tmp_path / "out"
    cmd = launch.torchrun_command(2, ["--out", str(out)], module=module)
    log = io.StringIO()
    launch.run_streamed(cmd, "probe", env=launch.subprocess_env({"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}),
                        out=log)
    ranks = sorted(json.loads(p.read_text())["rank"] for p in out.glob("rank*.json"))
    assert ranks == [0, 1]
    for p in out.glob("rank*.json"):
        r = json.loads(p.read_text())
        assert r["world"] == 2 and r["sum"] == 3.0 and r["local_rank"] == r["rank"]
    assert "rank 0 of 2: sum 3" in log.getvalue() and "rank 1 of 2: sum 3" in log.getvalue()


def test_torchrun_failure_is_one_line(tmp_path: Path) -> None:
    module = _rank_module(tmp_path)
    cmd = launch.torchrun_command(2, ["--out", str(tmp_path / "o"), "--fail-rank", "1"], module=module)
    with pytest.raises(Lf2Error) as e:
        launch.run_streamed(cmd, "stage finetune: torchrun (2 processes)",
                            env=launch.subprocess_env({"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}),
                            out=io.StringIO())
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("stage finetune: torchrun (2 processes) exited with status 1: ")
    assert msg.endswith("lf2: error: config key 'x': bad on purpose")


def test_subprocess_env_drops_the_launch_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(launch.NPROC_ENV, "2")
    monkeypatch.setenv(launch.TRAINJOB_ENV, "{}")
    env = launch.subprocess_env()
    assert launch.NPROC_ENV not in env and launch.TRAINJOB_ENV not in env  # a rank never relaunches itself
    assert Path(env["PYTHONPATH"].split(":")[0], "lf2core").is_dir()


@pytest.mark.slow
def test_real_extract_stage_under_torchrun_matches_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole launch path with the real ``lf2 extract`` (config written to a temp file, argv from the
    stage table, output claimed and committed by the child, result read back from the output) under torchrun
    with one process, from a single-stage task (``run_stage_function``) and from a several-rounds task's
    runner (``stage_runner``), against the stage function called in this process."""
    import numpy as np
    import torch

    from lf2core.checkpoint import save_checkpoint
    from lf2core.models import SourceModel
    from lf2core.stages.extract import extract_features
    from test_pretrain import make_tiny_data, tiny_cfg

    data = make_tiny_data(tmp_path)
    cfg = tiny_cfg("eval.batch_size=5")
    torch.manual_seed(3)
    src = SourceModel("resnet18_narrow", 6)
    src.train()(torch.randn(8, 3, 32, 16))
    save_checkpoint(str(tmp_path / "pre" / "model.pt"), src, "source", cfg)
    st = stage("extract-features")
    uris = [str(data), str(tmp_path / "pre")]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(launch, "launch_mode", lambda name, environ=None: ("torchrun", 2))
    result = launch.run_stage_function(st, cfg, cfg.to_yaml(), uris, str(tmp_path / "feat-torchrun"),
                                       {"split": "target_train"})
    ref = extract_features(cfg, *uris, str(tmp_path / "feat-ref"))
    assert result["images"] == ref["images"] == 24 and result["dim"] == ref["dim"]
    a, b = np.load(tmp_path / "feat-torchrun" / "features.npz"), np.load(tmp_path / "feat-ref" / "features.npz")
    for k in ("global", "upper", "lower"):
        assert np.allclose(a[k], b[k], atol=1e-5)
    assert a["pids"].tolist() == b["pids"].tolist()
    assert not list(Path("/tmp").glob("lf2-launch-*/config.yaml"))  # the temp config is gone
    # the several-rounds task's runner: launched, then found complete and reported like an in-process stage
    monkeypatch.setattr(launch, "launch_mode", lambda name, environ=None: ("torchrun", 1))
    seen = []
    runner = launch.stage_runner(cfg, cfg.to_yaml(), after=lambda name, r, out: seen.append((name, r, out)))
    out = str(tmp_path / "feat-runner")
    assert runner.run("extract-features", out, *uris, round_index=0) == out
    assert seen == [("extract-features", 0, out)] and runner.seconds["extract"] > 0
    c = np.load(Path(out) / "features.npz")
    assert all(np.allclose(c[k], b[k], atol=1e-5) for k in ("global", "upper", "lower"))
