"""What a run logs to MLflow (lf2core.run_log + lf2core.tracking.catalog/lineage/compare), checked through
the REST API of a real ``mlflow server`` on 127.0.0.1 against the stage outputs on disk: the adaptation
curve's steps and values, the summary metrics, lineage tags, dataset inputs, the logged model's metrics,
``lf2 compare``. Two tiny ``run_local --mlflow`` runs (2 rounds, k-means with 4 vs 3 clusters)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from lf2core import __version__
from lf2core.tracking import catalog
from test_pretrain import make_tiny_data, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py
REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["finetune.batch_size=8", "finetune.num_instances=2", "finetune.iters_per_epoch=2", "finetune.rounds=2",
            "cluster.method=kmeans", "cluster.kmeans_init_size=12", "tracking.experiment=curves"]


def rest(server: str, api: str, **query: str) -> dict:
    """GET ``server/api/2.0/mlflow/<api>?query`` -> JSON."""
    url = f"{server}/api/2.0/mlflow/{api}?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def history(server: str, run_id: str, key: str) -> list[tuple[int, float]]:
    got = rest(server, "metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
    return sorted((int(m.get("step", 0)), float(m["value"])) for m in got)


@pytest.fixture(scope="module")
def runs(mlflow_server, tmp_path_factory):
    """Two tiny run_local runs logged to the server: ``{name: (summary, out dir, cfg)}`` + data dir."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    mp.delenv("LF2_TRACKING", raising=False)
    from lf2core.stages.run_local import run_local

    tmp = tmp_path_factory.mktemp("tracked")
    data = make_tiny_data(tmp)
    mp.setenv("LF2_GIT_COMMIT", "")  # the checkout's commit, as recorded before the runs
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {}
    for name, k in (("k4", 4), ("k3", 3)):
        cfg = tiny_cfg(*TINY_RUN, f"cluster.num_clusters={k}")
        out[name] = (run_local(cfg, str(tmp / name), data=str(data), eval_every=1, mlflow=True, run_name=name),
                     tmp / name, cfg)
    yield out, data, head
    mp.undo()


def test_catalogue_rounds_rejects_unknown_and_docs_list_it() -> None:
    assert catalog.design({"round/target/mAP": 0.123456789, "round/cluster/upper/num_clusters": 41.0}) == \
        {"round/target/mAP": 0.1235, "round/cluster/upper/num_clusters": 41.0}
    with pytest.raises(ValueError, match="round/finetune/loss/x, summary/whatever"):
        catalog.design({"summary/whatever": 1.0, "round/finetune/loss/x": 2.0})
    # counters are the step, never metrics; alpha is renamed and described; timing leaves the loss namespace
    got = catalog.finetune_round({"round": 3, "global_step": 160, "num_classes": 99, "loss": 5.4123456,
                                  "alpha": 0.99612, "round_seconds": 12.345678, "epoch_seconds": 12.0})
    assert got == {"round/finetune/loss": 5.412, "round/finetune/ema_alpha": 0.9961, "round/time/finetune_s": 12.35}
    assert "ramps up" in catalog.describe("round/finetune/ema_alpha").description
    assert "CAMERA" in catalog.describe("round/cluster/upper/nmi_camera").description
    doc = (REPO / "docs" / "tracking.md").read_text()
    assert catalog.catalogue_markdown() in doc, "docs/tracking.md: paste catalog.catalogue_markdown() again"


@pytest.mark.slow  # two tiny tracked runs (~60 s) + the servers
def test_curve_summary_and_clustering_match_the_stage_outputs(runs, mlflow_server) -> None:
    by_name, data, head = runs
    summary, out, cfg = by_name["k4"]
    rid = summary["run_id"]
    pre = json.loads((out / "pretrain" / "metrics.json").read_text())["final"]
    evals = [json.loads((out / f"round_{r:02d}" / "eval" / "metrics.json").read_text()) for r in (0, 1)]
    # the curve: step 0 = source model on the target, then after each round (eval.every_rounds = 1)
    for metric in catalog.RETRIEVAL:
        want = [(0, pre[f"target_{metric}"]), (1, evals[0][metric]), (2, evals[1][metric])]
        got = history(mlflow_server, rid, f"round/target/{metric}")
        assert [s for s, _ in got] == [0, 1, 2]
        assert [v for _, v in got] == pytest.approx([catalog.rounded(v) for _, v in want], abs=1e-12)
    metrics = {m["key"]: m["value"] for m in rest(mlflow_server, "runs/get", run_id=rid)["run"]["data"]["metrics"]}
    assert metrics["summary/target_mAP"] == catalog.rounded(evals[1]["mAP"]) == catalog.rounded(summary["metrics"]["mAP"])
    assert metrics["summary/gain_mAP"] == pytest.approx(
        catalog.rounded(catalog.rounded(evals[1]["mAP"]) - catalog.rounded(pre["target_mAP"])), abs=1e-12)
    for r in (0, 1):
        stats = json.loads((out / f"round_{r:02d}" / "labels" / "stats.json").read_text())
        for s in ("global", "upper", "lower"):
            assert dict(history(mlflow_server, rid, f"round/cluster/{s}/num_clusters"))[r] == stats[s]["num_clusters"] == 4
            assert dict(history(mlflow_server, rid, f"round/cluster/{s}/nmi"))[r] == catalog.rounded(stats[s]["nmi"])
    # every key is in the catalogue, no counter is a metric, values are rounded
    own = {k: v for k, v in metrics.items() if not k.startswith("system/")}
    assert all(catalog.describe(k) for k in own), [k for k in own if not catalog.describe(k)]
    assert not [k for k in own if k.rsplit("/", 1)[-1] in catalog.COUNTERS]
    assert all(len(repr(v)) <= 12 for v in own.values())
    assert any(k.startswith("system/cpu") for k in metrics)  # system metrics of the training process
    arts = {a["path"] for a in rest(mlflow_server, "artifacts/list", run_id=rid, path="report")["files"]}
    assert {f"report/{f}" for f in ("clustering.png", "target_curve.png", "run_summary.png", "ranklist.png",
                                    "summary.md", "summary.html")} <= arts


@pytest.mark.slow  # two tiny tracked runs (~60 s) + the servers
def test_lineage_tags_and_dataset_inputs(runs, mlflow_server) -> None:
    by_name, data, head = runs
    summary, out, cfg = by_name["k4"]
    run = rest(mlflow_server, "runs/get", run_id=summary["run_id"])["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["lf2.version"] == __version__ and tags["lf2.git_commit"].split("-")[0] == head
    assert tags["lf2.recipe"] == "demo" and tags["lf2.runner"] == "run-local"
    assert tags["lf2.data"] == Path(data).resolve().as_uri() + "/manifest.json"
    assert tags["lf2.source_model"] == (out / "pretrain").resolve().as_uri()
    assert tags["lf2.source_model.digest"] == hashlib.sha256(
        b"model.pt\0" + (out / "pretrain" / "model.pt").read_bytes()).hexdigest()[:16]
    manifest = json.loads((Path(data) / "manifest.json").read_text())
    assert tags["lf2.data.target_train_images"] == str(len(manifest["target"]["train"]))
    inputs = run["inputs"]["dataset_inputs"]
    by_role = {(i["dataset"]["name"].split(":")[0], [t["value"] for t in i["tags"]][0]): i["dataset"] for i in inputs}
    assert set(by_role) == {("source-train", "training"), ("target-train", "training"),
                            ("target-query+gallery", "evaluation")}
    tgt = manifest["target"]
    want = hashlib.sha256(json.dumps([tgt["root"], {"query": tgt["query"], "gallery": tgt["gallery"]}],
                                     sort_keys=True).encode()).hexdigest()[:16]
    assert by_role[("target-query+gallery", "evaluation")]["digest"] == want
    prof = json.loads(by_role[("source-train", "training")]["profile"])
    assert prof["train"]["images"] == len(manifest["source"]["train"])
    assert prof["train"]["identities"] == len({r[1] for r in manifest["source"]["train"]})
    exp = rest(mlflow_server, "experiments/get", experiment_id=run["info"]["experiment_id"])["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in exp["tags"]


@pytest.mark.slow  # two tiny tracked runs (~60 s) + the servers
def test_logged_model_carries_the_final_evaluation(runs, mlflow_server, s3_env, monkeypatch) -> None:
    from lf2core.stages.register import register

    by_name, _, _ = runs
    summary, out, cfg = by_name["k4"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    final_eval = out / "round_01" / "eval"
    res = register(cfg, str(out / "round_01" / "model"), str(final_eval), run_id=summary["run_id"])
    model = rest(mlflow_server, f"logged-models/{res['model_id']}")["model"]
    got = {m["key"]: m["value"] for m in model["data"]["metrics"]}
    ev = json.loads((final_eval / "metrics.json").read_text())
    assert got == {f"summary/target_{k}": catalog.rounded(ev[k]) for k in catalog.RETRIEVAL}
    assert {m.get("step", 0) for m in model["data"]["metrics"]} == {cfg.finetune.rounds}


@pytest.mark.slow  # two tiny tracked runs (~60 s) + the servers
def test_compare_table_png_and_errors(runs, mlflow_server, tmp_path, capsys, monkeypatch) -> None:
    from lf2core.cli import main

    by_name, _, _ = runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    ids = [by_name[n][0]["run_id"] for n in ("k4", "k3")]
    png = tmp_path / "cmp.png"
    assert main(["compare", ids[0], "k3", "--experiment", "curves", "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    rows = {ln.split("  ")[0].strip(): ln for ln in printed.splitlines()}
    assert rows["cluster.num_clusters"].split()[1:] == ["4", "3"]
    assert "finetune.rounds" not in rows  # equal in both: not a difference
    for name, rid in zip(("k4", "k3"), ids):
        final = by_name[name][0]["metrics"]["mAP"]
        assert f"{100 * catalog.rounded(final):.1f}%" in rows["summary/target_mAP"]
    assert rows["curve points (rounds)"].split()[-2:] == ["0,1,2", "0,1,2"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"compare-runs?runs=%5B%22{ids[0]}%22%2C%22{ids[1]}%22%5D" in printed
    assert main(["compare", "no-such-run", "--experiment", "curves"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lf2: error: lf2 compare: no-such-run: no such run id or run name in experiment 'curves'"]


def test_run_links() -> None:
    from lf2core.tracking.compare import ui_base

    assert ui_base("http://user:pw@127.0.0.1:5123/") == "http://127.0.0.1:5123"
    assert ui_base("sqlite:////tmp/x.db") == "http://127.0.0.1:5000"
