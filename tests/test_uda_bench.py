"""bench/uda_synthetic.py: the README results block is written from the benchmark JSON (mean ± std over
seeds, gap closed), between its markers only; the task graph keeps whole seeds together."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import uda_synthetic as bench  # noqa: E402  (bench/uda_synthetic.py)


def _js() -> dict:
    per_seed = {"1": {"source_only": {"mAP": 0.30, "R1": 0.40}, "lf2_dbscan": {"mAP": 0.60, "R1": 0.70},
                      "oracle": {"mAP": 0.80, "R1": 0.90}},
                "2": {"source_only": {"mAP": 0.20, "R1": 0.30}, "lf2_dbscan": {"mAP": 0.50, "R1": 0.62},
                      "oracle": {"mAP": 0.76, "R1": 0.88}}}
    gap = {"lf2_dbscan": (0.55 - 0.25) / (0.78 - 0.25), "source_only": 0.0, "oracle": 1.0}
    js = {m: {"mAP": 0.0, "R1": 0.0} for m in ("source_only", "lf2_dbscan", "oracle")}
    js["details"] = {"per_seed": per_seed, "gap_closed": gap, "generator_version": ["1.2"], "seeds": [1, 2]}
    return js


def test_readme_block_is_written_from_the_json(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.README_START}\nold table\n{bench.README_END}\noutro\n")
    bench.update_readme(readme, _js())
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{bench.README_END}\noutro\n") and "old table" not in text
    row = next(line for line in text.splitlines() if line.startswith("| LF² + DBSCAN, eps=auto"))
    # mean ± population std of (60, 50) and (70, 62); gap closed (55 - 25) / (78 - 25) = 57 %
    assert row == (f"| LF² + DBSCAN, eps=auto | 55.0 ± {np.std([60, 50]):.1f} | 66.0 ± {np.std([70, 62]):.1f} "
                   "| 57% |")
    assert "| source-only | 25.0 ± 5.0 | 35.0 ± 5.0 |  |" in text
    assert "generator 1.2, seeds 1, 2" in text


def test_readme_without_markers_is_refused_untouched(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="README.md: needs exactly one"):
        bench.update_readme(readme, _js())
    assert readme.read_text() == "no markers here\n"


def test_seed_tasks_skip_and_fusion() -> None:
    tasks = bench.seed_tasks(skip=("lf2_camera_proxy",))
    assert "lf2_camera_proxy" not in tasks and "lf2_kmeans_fusion" not in tasks
    assert "lf2_camera_norm_eps06_24r" not in tasks and "lf2_camera_norm_eps06_24r" in bench.seed_tasks(("long",))
    assert tasks["mt_global"] == ["pretrain"] and tasks["oracle_eval"] == ["oracle_pretrain"]
    assert "lf2_kmeans_fusion" in bench.seed_tasks(("fusion",))
    # mt_global uses exactly lf2_dbscan's clustering
    assert [o for o in bench.RUNS["mt_global"] if o.startswith("cluster.")] == bench.RUNS["lf2_dbscan"]
