"""The run report without a server: figures built from a metric history, the curve schedule, the lineage
URIs and the summary table (lf2core.curves, lf2core.run_log, lf2core.tracking.lineage)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lf2core import curves, run_log
from lf2core.config import load_config
from lf2core.tracking import lineage

HISTORY = {
    "round/target/mAP": [(0, 0.31), (1, 0.378), (2, 0.387), (3, 0.386)],
    "round/target/R1": [(0, 0.45), (3, 0.535)],
    "round/cluster/global/num_clusters": [(0, 200.0), (1, 199.0), (2, 199.0)],
    "round/cluster/global/nmi": [(0, 0.70), (1, 0.75), (2, 0.76)],
    "round/cluster/upper/num_clusters": [(0, 180.0), (2, 190.0)],
    "round/finetune/loss": [(0, 9.2), (1, 5.4)],
}


def test_stats_per_round_regroups_the_cluster_keys() -> None:
    stats = curves.stats_per_round(HISTORY)
    assert stats == [{"round": 0, "global": {"num_clusters": 200.0, "nmi": 0.70}, "upper": {"num_clusters": 180.0}},
                     {"round": 1, "global": {"num_clusters": 199.0, "nmi": 0.75}},
                     {"round": 2, "global": {"num_clusters": 199.0, "nmi": 0.76}, "upper": {"num_clusters": 190.0}}]
    assert curves.stats_per_round({"round/finetune/loss": [(0, 1.0)]}) == []


def test_curve_figure_one_line_per_run_in_percent_with_distinct_styles() -> None:
    other = {"round/target/mAP": [(0, 0.31), (2, 0.40)], "round/target/R1": [(2, 0.5)]}
    fig = curves.curve_figure({"a": HISTORY, "b": other})
    ax_map, ax_r1 = fig.axes
    lines = {ln.get_label(): ln for ln in ax_map.lines}
    assert list(lines["a"].get_xdata()) == [0, 1, 2, 3]
    assert list(lines["a"].get_ydata()) == pytest.approx([31.0, 37.8, 38.7, 38.6])
    assert list(lines["b"].get_xdata()) == [0, 2]
    assert (lines["a"].get_linestyle(), lines["a"].get_marker()) != (lines["b"].get_linestyle(), lines["b"].get_marker())
    assert [list(ln.get_xdata()) for ln in ax_r1.lines] == [[0, 3], [2]]
    with pytest.raises(ValueError, match="no runs"):
        curves.curve_figure({})


def test_run_summary_figure_panels() -> None:
    fig = curves.run_summary_figure(HISTORY, "t", {"global": [[2, 10], [3, 4]]})
    curve, count, quality, hist = fig.axes[:4]
    assert [ln.get_label() for ln in curve.lines] == ["mAP", "R1"]
    assert {ln.get_label() for ln in count.lines} == {"global clusters", "upper clusters"}
    assert [ln.get_label() for ln in quality.lines] == ["nmi"]
    assert sorted(p.get_height() for p in hist.patches) == [4, 10]


@pytest.mark.parametrize("every,rounds,due", [(1, 4, [0, 1, 2]), (2, 6, [1, 3]), (0, 4, []), (5, 4, []),
                                              (1, 1, [])])
def test_curve_schedule_never_duplicates_the_final_evaluation(every, rounds, due) -> None:
    assert [r for r in range(rounds) if run_log.curve_due(every, r, rounds)] == due


def test_lineage_uris_and_data_location_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "a b" / "data"
    assert lineage.as_uri(str(d)) == d.resolve().as_uri()
    assert lineage.as_uri("s3://bucket/x?X-Amz-Signature=abc") == "s3://bucket/x?X-Amz-Signature=***"
    cfg = load_config("demo", [])
    tags = lineage.lineage_tags(cfg, str(d), str(tmp_path / "pre"))
    assert run_log.data_location(tags["lf2.data"]) == str(d.resolve())
    assert run_log.data_location("s3://b/runs/prep/manifest.json") == "s3://b/runs/prep"
    assert tags["lf2.target.name"] == "synthetic-b (ids 200, test ids 100, seed 0)"
    assert tags["lf2.target.uri"] == d.resolve().as_uri() + "/manifest.json#target"
    real = load_config("demo", ["data.target.name=market1501", "data.target.root=s3://data/market"])
    assert lineage.lineage_tags(real)["lf2.target.uri"] == "s3://data/market"


def test_summary_markdown_rows() -> None:
    cfg = load_config("demo", [])
    md = run_log.summary_markdown(cfg, {"mlflow.runName": "r", "lf2.git_commit": "abc"}, HISTORY)
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| step")]
    assert rows[0] == "| 0 | 31 | 45 | 200 | 0.7 |  |"
    assert rows[3] == "| 3 | 38.6 | 53.5 |  |  |  |"
    assert "commit `abc`" in md


def test_run_links_open_the_training_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lf2core import tracking
    from lf2core.tracking.compare import run_links

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LF2_TRACKING", raising=False)
    cfg = load_config("demo", ["tracking.experiment=links"])
    rid = tracking.create_run(cfg, "r")
    exp = tracking.store.client().get_run(rid).info.experiment_id
    links = run_links(rid, "lf2-reid", "3")
    base = f"http://127.0.0.1:5000/#/experiments/{exp}/runs"
    assert links == {
        "MLflow run": f"{base}/{rid}?workflowType=machine_learning",
        "run charts": f"{base}/{rid}/model-metrics?workflowType=machine_learning",
        "experiment runs (sorted by final target mAP)":
            f"{base}?workflowType=machine_learning&orderByKey=metrics.%60summary/target_mAP%60&orderByAsc=false",
        "model version": "http://127.0.0.1:5000/#/models/lf2-reid/versions/3"}
    assert tracking.store.client().get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"


def test_git_commit_inside_an_image_comes_from_its_tag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LF2_GIT_COMMIT", raising=False)
    monkeypatch.setattr(lineage, "__file__", str(tmp_path / "a" / "b" / "lineage.py"))  # no .git above
    monkeypatch.setenv("LF2_IMAGE", "registry.local:5000/lf2:0.1.0-0123456789ab-gpu")
    assert lineage.git_commit() == "0123456789ab"
    monkeypatch.setenv("LF2_IMAGE", "")
    assert lineage.git_commit() == "unknown"
    monkeypatch.setenv("LF2_GIT_COMMIT", "feedbeef")
    assert lineage.git_commit() == "feedbeef"


def test_compare_without_runs_is_one_error_line_and_touches_no_store(tmp_path: Path, monkeypatch, capsys) -> None:
    from lf2core.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LF2_TRACKING", raising=False)
    assert main(["compare"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["lf2: error: lf2 compare: give RUN_ID... or --experiment NAME"]
    assert list(tmp_path.iterdir()) == []
