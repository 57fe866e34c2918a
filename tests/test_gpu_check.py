"""bench/gpu_check.py: the CPU ``--tiny`` run goes through every section (results or an explicit skip reason,
the equivalence and agreement checks pass, DDP runs on gloo), the equivalence check fails a fast step with
a real bug, and the time budget / a failing section are recorded instead of aborting the run."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402  (bench/gpu_check.py)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def test_tiny_cpu_run_covers_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LF2_PROGRESS": "0"}
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out), "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    sec = doc["sections"]
    assert list(sec) == list(gpu_check.SECTIONS)
    assert doc["tiny"] and doc["total_seconds"] < 60  # the brief: under a minute on this machine
    env_ = doc["environment"]
    assert env_["torch"] and env_["device"] == "cpu" and {"matmul_allow_tf32", "cudnn_allow_tf32"} <= set(env_["tf32"])
    for name, r in sec.items():
        assert "error" not in r and "skipped" not in r, (name, r)
        assert _positive(r["seconds"]) and _positive(r["peak_memory"]["process_peak_rss_mib"]), name

    pre = sec["pretrain"]
    for k in ("fp32", "bf16_cl"):
        assert pre[k]["n"] == gpu_check.TINY.iters
        assert _positive(pre[k]["it_per_s"]) and _positive(pre[k]["images_per_s"])
    assert "CUDA-only" in pre["fp16_cl_scaler"]["skipped"]

    ft = sec["finetune"]
    for k in gpu_check.FINETUNE_VARIANTS:
        assert ft[k]["n"] == gpu_check.TINY.finetune_reps and _positive(ft[k]["it_per_s"])
        assert ft[k]["same_math_as_reference"] == ("amp" not in k)
    assert ft["reference"]["speedup_vs_reference"] == 1.0
    assert ft["goal"]["default_variant"] == "fast" and _positive(ft["goal"]["speedup"]) and ft["goal"]["target"] == 1.5
    assert _positive(ft["round_amp_cl"]["speedup_vs_reference"])

    eq = sec["equivalence"]
    assert eq["passed"] and eq["autocast_dtype"] == "bfloat16" and eq["steps"] == 2
    for mode in ("fp32_cl", "autocast_cl"):
        m = eq[mode]
        assert m["passed"] and all(m["checks"].values()), (mode, m["checks"])
        assert set(gpu_check.ERROR_METRICS) <= set(m["checks"])
        assert m["fast_step"]["bn_counters_equal"] and m["fast_step"]["alphas_equal"]
        assert m["fast_step"]["ema_residual_rel"] <= gpu_check.EMA_REL_TOL
    # the same math in float32: far closer to the reference than the bfloat16 step is
    assert eq["fp32_cl"]["fast_step"]["grad_rel_l2"] < 0.1 * eq["autocast_cl"]["fast_step"]["grad_rel_l2"]
    assert eq["fp32_cl"]["fast_step"]["loss_rel"] < 1e-3

    ex = sec["extraction"]
    assert _positive(ex["fp32"]["images_per_s"]) and _positive(ex["bf16_cl"]["images_per_s"])
    assert ex["bf16_cl"]["min_cosine_to_fp32"] > 0.99
    assert "CUDA-only" in ex["fp16_cl"]["skipped"]

    kn = sec["knn"]
    if env_.get("faiss_gpus", 0) == 0:
        assert kn["faiss_gpu"]["skipped"].startswith("faiss has no GPU")
    assert kn["passed"] and kn["agreement"]["mean_set_overlap"] >= 0.99 and kn["agreement"]["self_first"]
    assert kn["agreement"]["max_abs_similarity_diff"] <= 1e-4
    assert _positive(kn["torch_cpu"]["seconds"]) and (kn["n"], kn["k"]) == (gpu_check.TINY.knn_n, 30)

    dd = sec["ddp"]
    assert dd["backend"] == "gloo" and dd["world_size"] == 2 and dd["passed"]
    assert dd["replica_max_abs_diff"] == 0.0 and _positive(dd["it_per_s"]) and len(dd["peak_memory_per_rank"]) == 2

    assert "| section | item | result |" in proc.stdout
    for name in gpu_check.SECTIONS:
        assert f"| {name} |" in proc.stdout
    assert "every check passed" in proc.stdout


def test_equivalence_fails_a_fast_step_without_ghost_batchnorm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real bug (the three sub-batches normalised together, BN statistics updated once) fails both modes."""
    import lf2core.training.step as step_mod

    sz = gpu_check.TINY
    case = gpu_check.fts.build_case(sz.arch, sz.height, sz.width, sz.batch, sz.target_classes, "cpu", seed=5)
    case.batches = gpu_check.identity_batches(sz, case.device, seed=6)
    monkeypatch.setattr(step_mod, "ghost_batchnorm", lambda modules, sizes: contextlib.nullcontext())
    res = gpu_check.run_equivalence(case, 2)
    assert not res["passed"]
    fp32 = res["fp32_cl"]["checks"]
    assert not fp32["bn_counters"] and not fp32["grad_rel_l2"] and not fp32["bn_mean_rel_l2"] and not fp32["loss_rel"]
    amp = res["autocast_cl"]["checks"]
    assert not amp["bn_counters"] and not amp["bn_var_rel_l2"]


def test_budget_skips_and_errors_are_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "budget.json"
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--sections", "knn", "ddp", "--budget-s", "0"])
    sec = json.loads(out.read_text())["sections"]
    assert rc == 0 and all("time budget of 0 s used up" in sec[k]["skipped"] for k in ("knn", "ddp"))

    def boom(ctx: object) -> dict:
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "section_knn", boom)
    out = tmp_path / "error.json"
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--sections", "knn"])
    knn = json.loads(out.read_text())["sections"]["knn"]
    assert rc == 1 and knn["error"] == "RuntimeError: boom" and "peak_memory" in knn


def test_adam_bound() -> None:
    """One Adam step moves a parameter by at most lr (|m_hat / sqrt(v_hat)| = 1 at step 1), so two runs end
    at most 2 lr apart; later steps can move slightly more than lr (bias correction)."""
    assert gpu_check.adam_bound(1, 1e-3) == pytest.approx(2e-3)
    b2 = gpu_check.adam_bound(2, 1e-3)
    assert 4e-3 < b2 < 4.1e-3
