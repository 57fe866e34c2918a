"""Reproducibility across storage locations and across code versions.

- The data-dependent stages give bit-identical results whether their inputs and outputs are local or on
  S3 (a moto server): prepare-data (manifest rows, order and image bytes), pretrain-source (loss history
  and weights), extract-features (features.npz), including mixed local/S3 inputs.
- The pipeline's cache cannot serve outputs computed by other code or another recipe file: the resolved
  config text carries a fingerprint of the code, and ``resolve-config`` itself is never cached.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lf2core import storage
from lf2core.config import config_from_yaml, load_config
from lf2core.data.manifest import read_manifest
from lf2core.stages.extract import extract_features
from lf2core.stages.prepare import prepare_data
from lf2core.stages.pretrain import pretrain_source

# cluster.eps=auto: on these few ids the demo's eps 0.6 can put every image in one cluster
TINY = [
    "cluster.eps=auto", "data.synth.ids=6", "data.synth.test_ids=4", "data.synth.height=64", "data.synth.width=32",
    "data.height=32", "data.width=16", "data.num_workers=0", "pretrain.epochs=1", "pretrain.iters_per_epoch=2",
    "pretrain.batch_size=8", "pretrain.num_instances=2", "pretrain.warmup_epochs=0", "pretrain.milestones=[]",
    "pretrain.eval_every=0", "eval.batch_size=64", "device=cpu",
]
TIMING_KEYS = ("epoch_seconds", "train_seconds")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _rows(splits) -> list[tuple[str, int, int]]:
    """(path relative to the dataset's local root, pid, camid) of every sample, in manifest order."""
    return [(Path(os.path.relpath(s.path, splits.local_root)).as_posix(), s.pid, s.camid)
            for split in ("train", "query", "gallery") for s in splits.split(split)]


def _state(location: str) -> dict[str, torch.Tensor]:
    ck = torch.load(storage.local_path(storage.join(location, "model.pt")), weights_only=True)
    return ck["state_dict"]


def _history(location: str) -> list[dict]:
    m = json.loads(storage.read_bytes(storage.join(location, "metrics.json")))
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in m["history"]]


def _features(location: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(storage.join(location, "features.npz")))) as z:
        return {k: z[k] for k in z.files}


def test_local_and_s3_stages_give_identical_results(s3_env: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LF2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LF2_WORK_DIR", raising=False)
    monkeypatch.setenv("LF2_PROGRESS", "0")
    cfg = load_config("demo", TINY)
    loc, rem = str(tmp_path / "local"), f"s3://{s3_env}/runs"

    # prepare-data: same samples in the same order, same bytes; the synthetic data lies inside each output
    m_local = prepare_data(cfg, f"{loc}/data")
    m_s3 = prepare_data(cfg, f"{rem}/data")
    assert m_local == m_s3
    man_l, man_r = read_manifest(f"{loc}/data"), read_manifest(f"{rem}/data")
    for side in ("source", "target"):
        assert man_r[side].root == f"{rem}/data/{side}"  # recorded relative, resolved under the S3 output
        rows_l, rows_r = _rows(man_l[side]), _rows(man_r[side])
        assert rows_l == rows_r and len(rows_l) > 20
        samples_l = man_l[side].train + man_l[side].query + man_l[side].gallery
        samples_r = man_r[side].train + man_r[side].query + man_r[side].gallery
        assert all(Path(a.path).read_bytes() == Path(b.path).read_bytes() for a, b in zip(samples_l, samples_r))
        assert samples_l[0].path != samples_r[0].path  # really two copies (the S3 one downloaded)

    # pretrain-source: the same loss history and bit-identical weights
    r_local = pretrain_source(cfg, f"{loc}/data", f"{loc}/model")
    r_s3 = pretrain_source(cfg, f"{rem}/data", f"{rem}/model")
    assert {k: v for k, v in r_local.items() if k not in TIMING_KEYS} == \
        {k: v for k, v in r_s3.items() if k not in TIMING_KEYS}
    assert _history(f"{loc}/model") == _history(f"{rem}/model")
    s_local, s_s3 = _state(f"{loc}/model"), _state(f"{rem}/model")
    assert s_local.keys() == s_s3.keys()
    assert all(torch.equal(s_local[k], s_s3[k]) for k in s_local)

    # extract-features: identical arrays for every combination of data / model locations
    extract_features(cfg, f"{loc}/data", f"{loc}/model", f"{loc}/features")
    extract_features(cfg, f"{rem}/data", f"{rem}/model", f"{rem}/features")
    extract_features(cfg, f"{rem}/data", f"{loc}/model", f"{loc}/features-mixed")
    ref = _features(f"{loc}/features")
    assert ref["global"].shape[0] == len(man_l["target"].train)
    for other in (f"{rem}/features", f"{loc}/features-mixed"):
        got = _features(other)
        assert got.keys() == ref.keys()
        assert all(np.array_equal(got[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------ cache vs code
def test_resolved_config_carries_the_code_fingerprint() -> None:
    from components._runtime import CODE_HEADER, code_fingerprint, resolve_config

    text = resolve_config("demo", '["finetune.rounds=2"]', "", "", "", 2)
    first, rest = text.split("\n", 1)
    assert first.startswith(CODE_HEADER + code_fingerprint() + " ")
    # the header is a comment: the config is unchanged
    assert config_from_yaml(text).to_dict() == load_config("demo", ["finetune.rounds=2"]).to_dict()
    assert yaml.safe_load(text) == yaml.safe_load(rest)


def test_code_fingerprint_follows_the_code(tmp_path: Path) -> None:
    from components._runtime import code_fingerprint

    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    base = code_fingerprint([pkg])
    assert code_fingerprint([pkg]) == base and len(base) == 16
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.py").write_text("junk")  # caches and other files do not count
    (pkg / "notes.txt").write_text("text")
    assert code_fingerprint([pkg]) == base
    (pkg / "sub" / "b.py").write_text("y = 3\n")  # one byte of one file
    changed = code_fingerprint([pkg])
    assert changed != base
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    assert code_fingerprint([pkg]) == base
    shutil.move(pkg / "sub" / "b.py", pkg / "b.py")  # same bytes, another module
    assert code_fingerprint([pkg]) != base
    # the real packages: lf2core and components both count
    import components
    import lf2core

    real = code_fingerprint()
    assert real == code_fingerprint([Path(lf2core.__file__).parent, Path(components.__file__).parent])
    assert real != code_fingerprint([Path(lf2core.__file__).parent])


def test_resolve_config_task_is_never_cached(tmp_path: Path) -> None:
    """With caching on, a cached resolve-config would hand every later task the config of an old recipe
    file (its inputs are the recipe's name, not its content) -- and so stale cached stage outputs."""
    from pipelines.lf2_uda import compile_pipeline

    out = tmp_path / "p.yaml"
    compile_pipeline(str(out), 1, target="local")
    tasks = yaml.safe_load(out.read_text())["root"]["dag"]["tasks"]
    caching = {t["taskInfo"]["name"]: t.get("cachingOptions", {}) for t in tasks.values()}
    assert caching["resolve-config"].get("enableCache") is not True
    assert caching["prepare-data"] == {"enableCache": True} and caching["pretrain-source"] == {"enableCache": True}
    # every cached stage takes the resolved config text (with its code line) as an input
    for t in tasks.values():
        if t["taskInfo"]["name"] not in ("resolve-config",):
            src = t["inputs"]["parameters"].get("config", {}).get("taskOutputParameter", {})
            assert src.get("producerTask") == "resolve-config", t["taskInfo"]["name"]
