"""``lf2 search``: faiss top-k equals a brute-force ranking of the embeddings ``evaluate`` computes, for a
gallery folder, a dataset split and an s3:// prefix (moto on 127.0.0.1); the on-disk cache is keyed by
model and files; the rank-list PNG is written; bad input is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import numpy as np
import pytest

import serving_world
from lf2core.cli import main
from lf2core.serving import search as search_mod
from lf2core.serving.embedder import Embedder

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LF2_PROGRESS", "0")
    w = serving_world.build(tmp_path_factory.mktemp("search"))
    # a plain folder gallery: the manifest's target gallery files (junk/-1 already dropped)
    w.folder = w.root / "gallery"
    w.folder.mkdir()
    for i, s in enumerate(w.gallery):
        (w.folder / f"{i:03d}_{Path(s.path).name}").write_bytes(Path(s.path).read_bytes())
    yield w
    mp.undo()


def _brute_force(world, qi: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    q = world.q_ref[qi].astype(np.float64)
    g = world.g_ref.astype(np.float64)
    d = (q ** 2).sum(1)[:, None] + (g ** 2).sum(1)[None] - 2 * q @ g.T
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


def test_search_folder_matches_brute_force_and_caches(world, tmp_path: Path, monkeypatch, capsys) -> None:
    qi, k = [0, 3], 5
    queries = [world.query[i].path for i in qi]
    png = tmp_path / "ranks.png"
    cache = tmp_path / "cache"
    rc = main(["search", "--model", world.model, "--gallery", str(world.folder), "--query", *queries,
               "-k", str(k), "--png", str(png), "--cache-dir", str(cache), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "r.json").read_text())
    dist, order = _brute_force(world, qi, k)
    names = sorted(world.folder.iterdir())
    for r, row in enumerate(res["results"]):
        got = [m["gallery"] for m in row["matches"]]
        assert got == [str(names[j]) for j in order[r]]
        np.testing.assert_allclose([m["distance"] for m in row["matches"]], dist[r], atol=1e-5)
    assert f"query {queries[0]}" in out and "rank  distance  gallery" in out and f"rank list: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not res["cache_hit"]
    from PIL import Image

    with Image.open(png) as im:
        assert im.width >= 6 * 64 and im.height >= 2 * 128  # 2 rows of query + 5 results
    assert len(list(cache.glob("*.npz"))) == 1

    # second search: the gallery embeddings come from the cache (no gallery is embedded again)
    calls = []
    real = Embedder.embed_files
    monkeypatch.setattr(Embedder, "embed_files", lambda self, paths, **kw: calls.append(len(paths)) or real(self, paths, **kw))
    again = search_mod.search(world.model, str(world.folder), queries, k, png=None, cache_dir=str(cache))
    assert again["cache_hit"] and calls == [len(queries)]
    assert again["results"] == res["results"]
    # a changed gallery file, or another preprocessing of the same weights: a new cache entry
    touched = names[0]
    touched.write_bytes(touched.read_bytes())
    import os

    os.utime(touched, ns=(1, 1))
    assert not search_mod.search(world.model, str(world.folder), queries, k, png=None, cache_dir=str(cache))["cache_hit"]
    from lf2core.config import load_config

    other = load_config("demo", serving_world.TINY + ["eval.flip=false"])
    assert not search_mod.search(world.model, str(world.folder), queries, k, png=None, cache_dir=str(cache),
                                 cfg=other)["cache_hit"]
    assert len(list(cache.glob("*.npz"))) == 3


def test_search_dataset_split_and_s3_prefix(world, s3_env: str, tmp_path: Path) -> None:
    q = [world.query[1].path]
    by_split = search_mod.search(world.model, world.data, q, 4, split="target_gallery", png=None,
                                 cache_dir=str(tmp_path / "c"))
    _, order = _brute_force(world, [1], 4)
    assert [m["gallery"] for m in by_split["results"][0]["matches"]] == [world.gallery[j].path for j in order[0]]
    s3 = boto3.client("s3")
    for f in sorted(world.folder.iterdir()):
        s3.put_object(Bucket=s3_env, Key=f"cams/day1/{f.name}", Body=f.read_bytes())
    by_s3 = search_mod.search(world.model, f"s3://{s3_env}/cams/day1", q, 4, png=str(tmp_path / "s3.png"),
                              cache_dir=str(tmp_path / "c"))
    names = sorted(world.folder.iterdir())
    assert [m["gallery"] for m in by_s3["results"][0]["matches"]] == \
        [f"s3://{s3_env}/cams/day1/{names[j].name}" for j in order[0]]
    assert [m["distance"] for m in by_s3["results"][0]["matches"]] == \
        pytest.approx([m["distance"] for m in by_split["results"][0]["matches"]], abs=1e-6)
    assert (tmp_path / "s3.png").is_file()


def test_search_bad_input_one_line(world, tmp_path: Path, capsys) -> None:
    q = world.query[0].path
    cases = [
        (["--gallery", str(world.folder), "--query", str(tmp_path / "missing.jpg")], "missing.jpg"),
        (["--gallery", str(tmp_path / "nogallery"), "--query", q], "nogallery"),
        (["--gallery", str(tmp_path), "--query", q], "no images"),
        (["--gallery", world.data, "--split", "bogus", "--query", q], "unknown split 'bogus'"),
    ]
    (tmp_path / "x.txt").write_text("not an image")
    for args, needle in cases:
        assert main(["search", "--model", world.model, "--png", "", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lf2: error: ") and needle in err[0], err
    assert main(["search", "--model", str(tmp_path / "m.onnx"), "--gallery", str(world.folder), "--query", q]) == 2
    assert "m.onnx: no such ONNX file" in capsys.readouterr().err
