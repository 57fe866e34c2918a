"""``lf2 export --format onnx``: the file is valid ONNX (checker, opset, dynamic batch), onnxruntime gives
the embeddings ``evaluate`` computes (reference: tests/serving_world.py, PyTorch), the ranking metrics
agree, the report is attached to the registered version, and a version whose parity failed is refused
by ``lf2 promote`` unless forced (recorded as a tag)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest

import serving_world
from lf2core import tracking
from lf2core.cli import main
from lf2core.evaluation import evaluate_features
from lf2core.serving import onnx_export
from lf2core.serving.embedder import OnnxEmbedder

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("onnx")
    mp = serving_world.local_registry(root)
    w = serving_world.build(root)
    w.name = f"lf2-reid-onnx-{uuid.uuid4().hex[:6]}"
    serving_world.register_champion(w, w.name)
    yield w
    mp.undo()


@pytest.fixture(scope="module")
def exported(world):
    out = world.root / "export"
    rc = main(["export", "--format", "onnx", "--model", world.registered, "--data", world.data, "--out", str(out)])
    assert rc == 0
    return out


def test_compare_tolerance() -> None:
    ref = np.array([[0.6, 0.8], [1.0, 0.0]], np.float32)
    ok = onnx_export.compare(ref, ref + 1e-5 + 0.9e-3 * np.abs(ref))
    assert ok["allclose"] and ok["min_cosine"] > 0.9999
    bad = onnx_export.compare(ref, ref + np.array([[0, 2e-3], [0, 0]], np.float32))
    assert not bad["allclose"] and bad["elements_out_of_tolerance"] == 1 and bad["max_abs_diff"] == pytest.approx(2e-3, rel=1e-4)
    assert not onnx_export.compare(ref, np.full_like(ref, np.nan))["allclose"]
    assert not onnx_export.compare(ref, ref[:1])["allclose"]


def test_export_onnx_file_valid_dynamic_and_equal_to_evaluated(world, exported: Path) -> None:
    model = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [onnx_export.OPSET]
    (inp,), (outp,) = model.graph.input, model.graph.output
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "images" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 16]
    assert outp.name == "embeddings" and outp.type.tensor_type.shape.dim[0].dim_param
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["lf2.height"] == "32" and meta["lf2.width"] == "16" and meta["lf2.flip"] == "true"

    # onnxruntime on the same files as evaluate, in odd batch sizes: the evaluated embeddings
    emb = OnnxEmbedder(str(exported / "model.onnx"))
    q = emb.embed_files([s.path for s in world.query], batch_size=5)
    g = emb.embed_files([s.path for s in world.gallery], batch_size=64)
    np.testing.assert_allclose(q, world.q_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(g, world.g_ref, atol=1e-5, rtol=0)
    m = evaluate_features(q, g, np.array([s.pid for s in world.query]), np.array([s.pid for s in world.gallery]),
                     np.array([s.camid for s in world.query]), np.array([s.camid for s in world.gallery]))
    assert abs(m["mAP"] - world.evaluated["mAP"]) * 100 <= 0.1 and abs(m["R1"] - world.evaluated["R1"]) * 100 <= 0.1


def test_parity_report_and_registry(world, exported: Path) -> None:
    rep = json.loads((exported / "parity.json").read_text())
    assert rep["passed"] and rep["failures"] == [] and rep["opset"] == onnx_export.OPSET
    assert rep["fixed_set"]["batches"] == [1, 31] and rep["fixed_set"]["allclose"]
    s = rep["test_split"]
    assert s["images"] == len(world.query) + len(world.gallery)
    assert s["max_abs_diff"] <= 1e-5 and s["min_cosine"] >= 1 - 1e-6
    assert s["pytorch"]["mAP"] == pytest.approx(world.evaluated["mAP"], abs=1e-6)  # PyTorch side = evaluate
    assert s["mAP_diff_points"] <= 0.1 and s["R1_diff_points"] <= 0.1
    assert rep["export_seconds"] > 0 and rep["registered_version"] == f"{world.name}/1"

    client = mlflow.MlflowClient()
    mv = client.get_model_version(world.name, "1")
    assert mv.tags["lf2.onnx.parity"] == "passed" and mv.tags["lf2.onnx.opset"] == str(onnx_export.OPSET)
    assert float(mv.tags["lf2.onnx.max_abs_diff"]) <= 1e-5
    logged = {a.path for a in client.list_artifacts(mv.run_id, "onnx/v1")}
    assert logged == {"onnx/v1/model.onnx", "onnx/v1/parity.json"}
    assert mv.tags["lf2.onnx.artifacts"] == f"runs:/{mv.run_id}/onnx/v1"


def test_export_bad_inputs_one_line(world, tmp_path: Path, capsys) -> None:
    assert main(["export", "--model", str(tmp_path / "nothing"), "--data", world.data, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lf2: error: model ") and "nothing" in err[0]
    assert main(["export", "--model", "models:/no-such-model@champion", "--data", world.data,
                 "--out", str(tmp_path / "o2")]) == 2
    assert "models:/no-such-model@champion" in capsys.readouterr().err


@pytest.mark.slow
def test_failed_parity_is_recorded_and_blocks_promotion(world, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """An exporter that silently drops the flip averaging (a graph that runs and returns plausible unit
    vectors, just not the evaluated ones): parity fails, the version is tagged, promote refuses it."""
    from lf2core.config import load_config
    from lf2core.stages.register import register

    cfg = load_config("demo", serving_world.TINY + [f"tracking.registered_model={world.name}",
                                                    "tracking.experiment=serving"])
    version = register(cfg, world.model, world.metrics)["version"]
    real = onnx_export.export_onnx

    def no_flip(module, *a, **k):
        module.flip = False
        try:
            return real(module, *a, **k)
        finally:
            module.flip = True

    monkeypatch.setattr(onnx_export, "export_onnx", no_flip)
    uri = f"models:/{world.name}/{version}"
    assert main(["export", "--model", uri, "--data", world.data, "--out", str(world.root / "bad")]) == 1
    out = capsys.readouterr().out
    assert "parity: FAILED" in out and "outside rtol 0.001 / atol 1e-05" in out
    rep = json.loads((world.root / "bad" / "parity.json").read_text())
    assert not rep["passed"] and rep["test_split"]["max_abs_diff"] > 1e-3
    client = mlflow.MlflowClient()
    assert client.get_model_version(world.name, version).tags["lf2.onnx.parity"] == "failed"

    assert main(["promote", "--version", version, "--model-name", world.name]) == 1
    out = capsys.readouterr().out
    assert "not promoted: version %s failed its ONNX export parity check" % version in out
    assert tracking.describe_aliases(world.name)["champion"] == "1"
    assert main(["promote", "--version", version, "--model-name", world.name, "--force"]) == 0
    tags = client.get_model_version(world.name, version).tags
    assert tags["lf2.promoted_to_champion"] == "forced" and tags["lf2.forced_over"] == "lf2.onnx.parity=failed"
    assert tracking.describe_aliases(world.name)["champion"] == version


def test_search_with_onnx_file_and_registered_model(world, exported: Path, tmp_path: Path) -> None:
    from lf2core.serving.search import search

    q = [world.query[0].path, world.query[2].path]
    runs = {m: search(m, world.data, q, 5, split="target_gallery", png=None, cache_dir=str(tmp_path))
            for m in (world.model, str(exported / "model.onnx"), world.registered)}
    base = runs[world.model]["results"]
    for m, res in runs.items():
        for a, b in zip(base, res["results"]):
            assert [x["gallery"] for x in a["matches"]] == [x["gallery"] for x in b["matches"]], m
            np.testing.assert_allclose([x["distance"] for x in a["matches"]], [x["distance"] for x in b["matches"]],
                                       atol=1e-5)
    # the registered pyfunc holds the same weights and preprocessing as the stage output: same cache entry
    assert runs[world.registered]["cache_hit"] and not runs[str(exported / "model.onnx")]["cache_hit"]
