"""The registered model is an MLflow pyfunc that takes images: in process (the loader module MLflow calls)
and behind a real ``mlflow models serve --env-manager local`` on 127.0.0.1. Reference: the embeddings
``evaluate`` computes for the same files (tests/serving_world.py), and evaluate's own mAP."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import serving_world
from lf2core import tracking
from lf2core.evaluation import evaluate_features
from lf2core.serving.embedder import find_model_dir
from lf2core.serving.pyfunc import _load_pyfunc
from pipelines.local_servers import model_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve")
    mp = serving_world.local_registry(root)
    w = serving_world.build(root)
    serving_world.register_champion(w, f"lf2-reid-serve-{uuid.uuid4().hex[:6]}")
    yield w
    mp.undo()


def _pyfunc(world):
    return _load_pyfunc(str(find_model_dir(tracking.download_model(world.registered))))


def test_registered_pyfunc_signature_and_example(world) -> None:
    info = mlflow.models.get_model_info(world.registered)
    assert info.flavors["python_function"]["loader_module"] == "lf2core.serving.pyfunc"
    assert info.signature.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    out = info.signature.outputs.to_dict()[0]["tensor-spec"]
    assert out["dtype"] == "float32" and list(out["shape"]) == [-1, world.q_ref.shape[1]]
    assert info.saved_input_example_info["type"] == "dataframe"
    meta = _pyfunc(world).meta
    assert (meta["height"], meta["width"], meta["flip"]) == (32, 16, True)


def test_pyfunc_bytes_and_arrays_equal_evaluated_embeddings(world) -> None:
    model = _pyfunc(world)
    files = [s.path for s in world.query]
    encoded = [Path(p).read_bytes() for p in files]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    from_bytes = model.predict(pd.DataFrame({"image": encoded}))
    from_arrays = model.predict(pd.DataFrame({"image": arrays}))
    assert from_bytes.dtype == np.float32 and from_bytes.shape == world.q_ref.shape
    np.testing.assert_allclose(from_bytes, world.q_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(from_arrays, world.q_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(from_bytes, axis=1), 1.0, atol=1e-5)
    # other layouts of the same batch: a list of bytes, a dict, an [N, H, W, 3] uint8 array (same-size crops)
    np.testing.assert_allclose(model.predict(encoded[:2]), world.q_ref[:2], atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.predict({"image": encoded[:1]}), world.q_ref[:1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.predict(np.stack(arrays[:3])), world.q_ref[:3], atol=1e-5, rtol=0)
    png = io.BytesIO()
    Image.open(files[0]).save(png, format="PNG")  # lossless re-encoding: the same pixels, the same embedding
    np.testing.assert_allclose(model.predict([png.getvalue()]), world.q_ref[:1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad, message", [
    (pd.DataFrame({"image": [b"not an image"]}), "image 0: 12 bytes that are not an image"),
    (pd.DataFrame({"image": [np.zeros((4, 4), np.uint8)]}), "image 0: expected encoded bytes or a uint8 array"),
    (pd.DataFrame({"image": [np.full((8, 4, 3), 300, np.int64)]}), "values outside uint8"),
    (pd.DataFrame({"img": [b"x"]}), "expected one column 'image'"),
    ([], "no images given"),
])
def test_pyfunc_bad_input_is_a_400_with_the_reason(world, bad, message) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as e:
        _pyfunc(world).predict(bad)
    assert message in e.value.message and e.value.get_http_status_code() == 400


def _post(url: str, payload: object, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/invocations", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _b64(paths: list[str]) -> list[str]:
    return [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]


@pytest.mark.slow
def test_serve_champion_with_mlflow_models_serve(world) -> None:
    with model_server(world.registered, world.root / "server") as url:
        deadline = time.time() + 300  # every request below is bounded, and so is the whole conversation
        q_paths = [s.path for s in world.query]
        status, body = _post(url, {"dataframe_split": {"columns": ["image"], "data": [[b] for b in _b64(q_paths)]}})
        assert status == 200, body
        served_q = np.asarray(body["predictions"], dtype=np.float32)
        np.testing.assert_allclose(served_q, world.q_ref, atol=1e-5, rtol=0)
        # batch of one, in the "dataframe_records" layout
        status, body = _post(url, {"dataframe_records": [{"image": b} for b in _b64(q_paths[:1])]})
        assert status == 200, body
        assert np.abs(np.asarray(body["predictions"]) - world.q_ref[:1]).max() <= 1e-5
        # the gallery in batches of 16: the served embeddings rank exactly as evaluate measured
        g_paths = [s.path for s in world.gallery]
        chunks = []
        for i in range(0, len(g_paths), 16):
            assert time.time() < deadline
            status, body = _post(url, {"dataframe_split": {"columns": ["image"],
                                                           "data": [[b] for b in _b64(g_paths[i:i + 16])]}})
            assert status == 200, body
            chunks.append(np.asarray(body["predictions"], dtype=np.float32))
        served_g = np.concatenate(chunks)
        np.testing.assert_allclose(served_g, world.g_ref, atol=1e-5, rtol=0)
        m = evaluate_features(served_q, served_g, np.array([s.pid for s in world.query]),
                         np.array([s.pid for s in world.gallery]), np.array([s.camid for s in world.query]),
                         np.array([s.camid for s in world.gallery]))
        assert m["mAP"] == pytest.approx(world.evaluated["mAP"], abs=1e-6)
        assert m["R1"] == pytest.approx(world.evaluated["R1"], abs=1e-6)

        # bad payloads: 4xx naming the problem, and the server keeps serving
        status, body = _post(url, {"dataframe_split": {"columns": ["image"],
                                                       "data": [[base64.b64encode(b"hello").decode()]]}})
        assert status == 400 and "image 0: 5 bytes that are not an image PIL can read" in body["message"]
        status, body = _post(url, {"dataframe_split": {"columns": ["photo"], "data": [["aGk="]]}})
        assert status == 400 and "missing inputs ['image']" in body["message"]
        status, body = _post(url, {"dataframe_split": {"columns": ["image"], "data": [[b] for b in _b64(q_paths[:2])]}})
        assert status == 200 and len(body["predictions"]) == 2
