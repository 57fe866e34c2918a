"""Several rounds per pipeline task (``--rounds-per-task K``): the compiled tasks, the same results and
MLflow metrics as one task per stage (real kfp.local runs), and resume of a failed several-rounds task."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml

from lf2core import storage
from lf2core.config import load_config
from lf2core.stages.table import CLUSTER, EXTRACT, FINETUNE, PREPARE, PRETRAIN, stage

# cluster.eps=auto: on these few ids the demo's eps 0.6 can put every image in one cluster
TINY = [
    "cluster.eps=auto", "data.synth.ids=8", "data.synth.test_ids=6", "data.synth.height=64", "data.synth.width=32",
    "data.height=32", "data.width=16", "pretrain.epochs=1", "pretrain.iters_per_epoch=2", "pretrain.batch_size=16",
    "pretrain.warmup_epochs=0", "pretrain.milestones=[]", "pretrain.eval_every=0", "cluster.num_clusters=4",
    "cluster.kmeans_init_size=40", "finetune.iters_per_epoch=2", "finetune.batch_size=16", "eval.batch_size=64",
]
# wall-clock figures: the only metrics allowed to differ between two runs of the same config
TIMING = ("_s", "images_per_s")  # round/time/*_s, round/extract/images_per_s (catalogue keys)


def art_in(path: str) -> SimpleNamespace:
    """An input artifact as the KFP executor hands it over (a local path, no metadata)."""
    return SimpleNamespace(path=path, metadata={})


def test_compiled_tasks_group_k_rounds_on_a_gpu(tmp_path: Path) -> None:
    from pipelines.cli import main as pipeline_main

    out = tmp_path / "k2.yaml"
    assert pipeline_main(["compile", "--out", str(out), "--target", "kubeflow", "--gpus", "2", "-c", "demo",
                          "--rounds", "5", "--rounds-per-task", "2"]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    names = {t["taskInfo"]["name"]: t for t in tasks.values()}
    groups = [n for n in names if n.startswith("rounds-")]
    assert sorted(groups) == ["rounds-r0-r1", "rounds-r2-r3", "rounds-r4-r4"]
    assert not [n for n in names if n.startswith(("extract-features", "cluster", "finetune"))]
    params = {n: {k: v["runtimeValue"]["constant"] for k, v in names[n]["inputs"]["parameters"].items()
                  if k in ("first_round", "num_rounds")} for n in groups}
    assert params == {"rounds-r0-r1": {"first_round": 0, "num_rounds": 2},
                      "rounds-r2-r3": {"first_round": 2, "num_rounds": 2},
                      "rounds-r4-r4": {"first_round": 4, "num_rounds": 1}}
    # chained: each group starts from the model of the group before; evaluate takes the last one
    key_of = {t["taskInfo"]["name"]: k for k, t in tasks.items()}
    model_from = names["rounds-r2-r3"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
    assert model_from == {"producerTask": key_of["rounds-r0-r1"], "outputArtifactKey": "finetuned"}
    assert names["evaluate"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == \
        key_of["rounds-r4-r4"]
    ex = spec["deploymentSpec"]["executors"][spec["components"]["comp-adapt-rounds"]["executorLabel"]]["container"]
    assert int(ex["resources"]["accelerator"]["resourceCount"]) == 2
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert kube[spec["components"]["comp-adapt-rounds"]["executorLabel"]]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"


def _histories(client: mlflow.MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = [k for k in client.get_run(run_id).data.metrics if not k.endswith(TIMING) and not k.startswith("system/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


@pytest.mark.slow
def test_k_rounds_per_task_equal_one_task_per_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kfp.local, 2 rounds: K=1 (6 round tasks) and K=2 (1 task) give the same final metrics, the same
    MLflow metric histories (every key, step and value but wall-clock times) and the same artifacts."""
    from pipelines.cli import run_pipeline_local

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LF2_MLFLOW_ARTIFACTS", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("LF2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LF2_TRACKING", raising=False)
    res = {k: run_pipeline_local("demo", TINY + ["finetune.rounds=2"], str(tmp_path / f"k{k}"), experiment="rpt",
                                 run_name=f"k{k}", cache=False, rounds_per_task=k) for k in (1, 2)}
    assert res[1]["metrics"] == res[2]["metrics"] and 0 <= res[1]["metrics"]["mAP"] <= 1
    client = mlflow.MlflowClient(tracking_uri=uri)
    h1, h2 = (_histories(client, res[k]["run_id"]) for k in (1, 2))
    assert h1 == h2
    assert [s for s, _ in h1["round/cluster/global/num_clusters"]] == [0, 1]
    assert {s for s, _ in h1["round/finetune/loss"]} == {0, 1}
    assert [s for s, _ in h1["round/target/mAP"]] == [0, 1, 2]  # source model, after round 0, final
    arts = [{a.path for r in ("round_00", "round_01") for a in client.list_artifacts(res[k]["run_id"], r)}
            for k in (1, 2)]
    assert arts[0] == arts[1] and "round_01/stats.json" in arts[0]
    # the K=2 task's rounds artifact lists where each round's outputs are
    index = next((tmp_path / "k2" / "kfp").rglob("adapt-rounds/rounds/rounds.json"))
    rounds = json.loads(index.read_text())
    assert sorted(rounds) == ["00", "01"] and set(rounds["00"]) == {EXTRACT, CLUSTER, FINETUNE}
    assert all(storage.is_complete(loc) for r in rounds.values() for loc in r.values())


def test_failed_several_rounds_task_resumes_with_the_first_unfinished_stage(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """finetune fails in round 1 of a 2-round task; the retried task runs only that finetune (round 0's
    three outputs and round 1's extract/cluster are complete and skipped) and ends as an unbroken task."""
    from components import _runtime as rt
    from lf2core.stages import finetune as finetune_module

    monkeypatch.setenv("LF2_TRACKING", "off")
    config_yaml = load_config("demo", TINY + ["finetune.rounds=2"]).to_yaml()
    cfg = rt.load_config(config_yaml)
    data, src = str(tmp_path / "data"), str(tmp_path / "pretrain")
    stage(PREPARE)(cfg, data)
    stage(PRETRAIN)(cfg, data, src)

    calls: list[tuple[str, int]] = []
    real = {name: stage(name).function for name in (EXTRACT, CLUSTER, FINETUNE)}

    def spy(name: str, fail_round: int = -1):
        def wrapped(*args, **kw):
            r = kw.get("round_index", 0)
            calls.append((name, r))
            if r == fail_round:
                raise RuntimeError("pod evicted")
            return real[name](*args, **kw)
        return wrapped

    from lf2core.stages import cluster as cluster_module, extract as extract_module

    monkeypatch.setattr(extract_module, "extract_features", spy(EXTRACT))
    monkeypatch.setattr(cluster_module, "cluster", spy(CLUSTER))
    monkeypatch.setattr(finetune_module, "finetune", spy(FINETUNE, fail_round=1))

    def art(name: str) -> SimpleNamespace:
        return SimpleNamespace(path=str(tmp_path / "task" / name), metadata={})

    args = (config_yaml, "", "", 0, 2, art_in(data), art_in(src), art("rounds"), art("finetuned"))
    with pytest.raises(RuntimeError, match="pod evicted"):
        rt.run_rounds(*args)
    first = list(calls)
    assert [n for n, _ in first] == [EXTRACT, CLUSTER, FINETUNE, EXTRACT, CLUSTER, FINETUNE]
    calls.clear()
    monkeypatch.setattr(finetune_module, "finetune", spy(FINETUNE))
    location, entries = rt.run_rounds(*args)
    assert calls == [(FINETUNE, 1)]
    assert location == str(tmp_path / "task" / "finetuned") and storage.is_complete(location)
    assert [e["round"] for e in entries] == [0, 1] and entries[1]["finetune"]["round"] == 1
    index = json.loads((tmp_path / "task" / "rounds" / rt.ROUNDS_INDEX).read_text())
    assert index["01"][FINETUNE] == location and index["00"][FINETUNE].endswith("round_00/finetune")


def test_networks_handed_over_in_memory_equal_the_files_and_follow_them(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside ``models_in_memory`` the finetuned MeanTeacher handed to the next stage equals the one read
    from its files (every tensor, parameter flags, digests) and is a copy; a rewritten file is read anew."""
    import hashlib

    import torch

    from lf2core import artifacts, kept_models

    monkeypatch.setenv("LF2_TRACKING", "off")
    cfg = load_config("demo", TINY + ["finetune.rounds=1"])
    data, src, feats, labels, ft = (str(tmp_path / n) for n in ("data", "src", "feats", "labels", "ft"))
    stage(PREPARE)(cfg, data)
    stage(PRETRAIN)(cfg, data, src)
    stage(EXTRACT)(cfg, data, src, feats)
    stage(CLUSTER)(cfg, feats, labels)
    with kept_models.models_in_memory():
        stage(FINETUNE)(cfg, data, labels, src, ft, round_index=0)
        handed = artifacts.read_model(cfg, ft).mean_teacher()
        again = artifacts.read_model(cfg, ft).mean_teacher()
        digests = artifacts.model_digests(ft)
    read = artifacts.read_model(cfg, ft).mean_teacher()  # outside: from the files
    assert handed is not again
    a, b = handed.state_dict(), read.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.requires_grad for p in handed.parameters()] == [p.requires_grad for p in read.parameters()]
    assert all(p.grad is None for p in handed.parameters())
    assert digests == [(n, hashlib.sha256((Path(ft) / n).read_bytes()).hexdigest())
                       for n in artifacts.MODEL_FILES if (Path(ft) / n).is_file()]
    with kept_models.models_in_memory():
        stage(FINETUNE)(cfg, data, labels, src, str(tmp_path / "ft2"), round_index=0)
        torch.manual_seed(0)
        with torch.no_grad():
            next(handed.student.parameters()).add_(1.0)
        artifacts.write_mean_teacher(tmp_path / "ft2", handed, cfg)  # the files change under the kept model
        reread = artifacts.read_model(cfg, str(tmp_path / "ft2")).mean_teacher()
    assert torch.equal(next(reread.student.parameters()), next(handed.student.parameters()))
