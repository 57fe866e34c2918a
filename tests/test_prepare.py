"""Stage prepare-data: synthetic domains (inside the output and at a given root, reuse and refusal to
overwrite), real formats from fake trees, the manifest it writes, s3:// output, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lf2core import storage
from lf2core.config import load_config
from lf2core.data import manifest, synthetic
from lf2core.errors import DataError
from lf2core.stages.prepare import SYNTH_MARKER, prepare_data

REPO = Path(__file__).resolve().parent.parent
SMALL = ["data.synth.ids=5", "data.synth.test_ids=3", "data.synth.height=32", "data.synth.width=16",
         "data.synth.seed=4"]


def tree(root: Path, files: dict[str, list[str]]) -> None:
    for folder, names in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(names):
            Image.fromarray(np.full((8, 4, 3), i * 20, dtype=np.uint8)).save(root / folder / n)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def relpaths(samples, base: Path) -> list[str]:
    return [os.path.relpath(s.path, base) for s in samples]


def test_synthetic_inside_the_output(tmp_path: Path) -> None:
    cfg = load_config("demo", SMALL)
    out = tmp_path / "prep"
    metrics = prepare_data(cfg, str(out))
    assert storage.is_complete(str(out))
    # independent reference: the generator called directly with the documented arguments
    ref = {}
    for side, dom, seed in (("source", "a", 4), ("target", "b", 5)):
        ref[side] = synthetic.write_domain(dom, tmp_path / f"ref_{side}", ids=5, test_ids=3, seed=seed,
                                           height=32, width=16)
    m = manifest.read_manifest(str(out))
    for side in ("source", "target"):
        base, refdir = out / side, tmp_path / f"ref_{side}"
        s = m[side]
        assert s.name == "synthetic"
        for split, folder in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test")):
            on_disk = sorted(p.name for p in (refdir / folder).iterdir() if not p.name.startswith("-1_"))
            assert [os.path.basename(p) for p in relpaths(s.split(split), base)] == on_disk
            assert all(digest(Path(x.path)) == digest(refdir / folder / os.path.basename(x.path))
                       for x in s.split(split)[:5])
            want_images = ref[side][split]["images"] - (ref[side]["gallery"]["junk"] if split == "gallery" else 0)
            assert metrics[f"{side}_{split}_images"] == want_images == len(s.split(split))
            assert metrics[f"{side}_{split}_cameras"] == ref[side][split]["cameras"]
        assert metrics[f"{side}_train_ids"] == ref[side]["train"]["identities"] == 5
        # the gallery counts the distractor identity 0 as well
        assert metrics[f"{side}_gallery_ids"] == ref[side]["gallery"]["identities"] + 1
    assert metrics["synthetic_generator_version"] == synthetic.GENERATOR_VERSION
    assert json.loads((out / "stats.json").read_text()) == metrics
    data = json.loads((out / "manifest.json").read_text())
    assert (data["source"]["root"], data["target"]["root"]) == ("source", "target")
    # the output can be moved: roots are relative to the manifest
    os.rename(out, tmp_path / "moved")
    m2 = manifest.read_manifest(str(tmp_path / "moved"))
    assert all(os.path.isfile(x.path) for x in m2["target"].gallery)


def test_synthetic_at_a_root_is_generated_once(tmp_path: Path) -> None:
    root = tmp_path / "synth_src"
    cfg = load_config("demo", SMALL + [f"data.source.root={root}"])
    prepare_data(cfg, str(tmp_path / "p1"))
    marker = json.loads((root / SYNTH_MARKER).read_text())
    assert marker["params"]["domain"] == "a" and marker["params"]["seed"] == 4
    probe = next((root / "query").iterdir())
    stamp = probe.stat().st_mtime_ns, probe.stat().st_ino
    m = manifest.read_manifest(str(tmp_path / "p1"))
    assert m["source"].root == str(root)
    assert m["target"].root == str((tmp_path / "p1" / "target").resolve())
    assert not (tmp_path / "p1" / "source").exists()  # the source data lives at its root, not in the output
    # same parameters: reused untouched
    prepare_data(cfg, str(tmp_path / "p2"))
    assert (probe.stat().st_mtime_ns, probe.stat().st_ino) == stamp
    # different seed: regenerated (it is lf2's own data)
    cfg2 = load_config("demo", SMALL + [f"data.source.root={root}", "data.synth.seed=9"])
    prepare_data(cfg2, str(tmp_path / "p3"))
    assert json.loads((root / SYNTH_MARKER).read_text())["params"]["seed"] == 9
    # a generation whose files changed since is not reused
    victim = sorted((root / "bounding_box_train").iterdir())[0]
    victim.unlink()
    prepare_data(cfg2, str(tmp_path / "p4"))
    assert victim.exists()


def test_synthetic_root_not_ours_is_never_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "precious"
    root.mkdir()
    (root / "thesis.txt").write_text("keep me")
    cfg = load_config("demo", SMALL + [f"data.target.root={root}"])
    with pytest.raises(DataError, match=r"data.target.root.*refusing to overwrite"):
        prepare_data(cfg, str(tmp_path / "out"))
    assert (root / "thesis.txt").read_text() == "keep me"
    assert not (tmp_path / "out").exists()


def test_real_formats(tmp_path: Path) -> None:
    tree(tmp_path / "duke", {
        "bounding_box_train": ["0005_c2_f0046985.jpg", "0005_c5_f0051000.jpg", "0010_c8_f0000001.jpg"],
        "query": ["0005_c1_f0046000.jpg"],
        "bounding_box_test": ["0000_c3_f0000010.jpg", "0005_c7_f0060000.jpg", "-1_c2_f0000002.jpg"],
    })
    tree(tmp_path / "market" / "Market-1501-v15.09.15", {
        "bounding_box_train": ["0002_c1s1_000451_00.jpg", "0007_c2s1_000100_00.jpg"],
        "query": ["0002_c2s1_000301_00.jpg"],
        "bounding_box_test": ["0002_c4s1_000700_00.jpg", "-1_c1s1_000001_00.jpg"],
    })
    cfg = load_config("demo", ["data.source.name=dukemtmc", f"data.source.root={tmp_path / 'duke'}",
                               "data.target.name=market1501", f"data.target.root={tmp_path / 'market'}"])
    metrics = prepare_data(cfg, str(tmp_path / "out"))
    assert metrics == {
        "source_train_images": 3, "source_train_ids": 2, "source_train_cameras": 3,
        "source_query_images": 1, "source_query_ids": 1, "source_query_cameras": 1,
        "source_gallery_images": 2, "source_gallery_ids": 2, "source_gallery_cameras": 2,
        "target_train_images": 2, "target_train_ids": 2, "target_train_cameras": 2,
        "target_query_images": 1, "target_query_ids": 1, "target_query_cameras": 1,
        "target_gallery_images": 1, "target_gallery_ids": 1, "target_gallery_cameras": 1,
    }
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert data["target"]["root"] == str(tmp_path / "market")
    assert data["target"]["train"] == [["Market-1501-v15.09.15/bounding_box_train/0002_c1s1_000451_00.jpg", 2, 0],
                                       ["Market-1501-v15.09.15/bounding_box_train/0007_c2s1_000100_00.jpg", 7, 1]]
    assert data["source"]["gallery"] == [["bounding_box_test/0000_c3_f0000010.jpg", 0, 2],
                                         ["bounding_box_test/0005_c7_f0060000.jpg", 5, 6]]
    assert manifest.split(manifest.read_manifest(str(tmp_path / "out")), "source_query")[0].camid == 0


def test_real_format_errors(tmp_path: Path) -> None:
    cfg = load_config("demo", ["data.source.name=market1501", "data.source.root="])
    with pytest.raises(DataError, match=r"data.source.root': empty"):
        prepare_data(cfg, str(tmp_path / "out"))
    tree(tmp_path / "m", {"bounding_box_train": ["0002_c1s1_000451_00.jpg"], "query": [], "bounding_box_test": []})
    cfg = load_config("demo", SMALL + ["data.target.name=market1501", f"data.target.root={tmp_path / 'm'}"])
    with pytest.raises(DataError, match="split 'query' is empty"):
        prepare_data(cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_s3_output(tmp_path: Path, s3_env: str) -> None:
    out = f"s3://{s3_env}/runs/prep"
    metrics = prepare_data(load_config("demo", SMALL), out)
    assert storage.is_complete(out)
    m = manifest.read_manifest(out)  # relative roots resolved under the s3 output, then downloaded
    assert m["source"].root == f"{out}/source"
    assert len(m["target"].train) == metrics["target_train_images"]
    assert all(os.path.isfile(x.path) for x in m["source"].query + m["target"].train)


def test_cli_prepare(tmp_path: Path) -> None:
    tree(tmp_path / "m", {"bounding_box_train": ["0002_c1s1_000451_00.jpg", "0003_c2s1_000451_00.jpg"],
                          "query": ["0002_c2s1_000301_00.jpg"], "bounding_box_test": ["0002_c4s1_000700_00.jpg"]})
    args = ["--set", "data.source.name=market1501", "--set", f"data.source.root={tmp_path / 'm'}",
            "--set", "data.target.name=market1501", "--set", f"data.target.root={tmp_path / 'm'}"]
    r = subprocess.run([sys.executable, "-m", "lf2core.cli", "prepare", *args, "--out", str(tmp_path / "out")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source_train_ids"] == 2
    r = subprocess.run([sys.executable, "-m", "lf2core.cli", "prepare", *args[:2], "--set",
                        f"data.source.root={tmp_path / 'none'}", "--out", str(tmp_path / "o2")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "lf2: error:" in r.stderr and str(tmp_path / "none") in r.stderr


def test_unlabelled_target_train_is_accepted(tmp_path: Path) -> None:
    tree(tmp_path / "duke", {"bounding_box_train": ["0005_c2_f0046985.jpg", "0010_c8_f0000001.jpg"],
                             "query": ["0005_c1_f0046000.jpg"], "bounding_box_test": ["0005_c7_f0060000.jpg"]})
    tree(tmp_path / "cams", {"train": ["a_c1.jpg", "b_c2.jpg", "c_c2.jpg"], "query/p1": ["q_c1.jpg"],
                             "gallery/p1": ["g_c2.jpg"], "gallery/p2": ["h_c1.jpg"]})
    cfg = load_config("demo", ["data.source.name=dukemtmc", f"data.source.root={tmp_path / 'duke'}",
                               "data.target.name=folder", f"data.target.root={tmp_path / 'cams'}"])
    metrics = prepare_data(cfg, str(tmp_path / "out"))
    assert metrics["target_train_images"] == metrics["target_train_unlabelled"] == 3
    assert metrics["target_train_ids"] == 0  # unlabelled images are not an identity
    assert metrics["target_train_cameras"] == 2 and metrics["target_gallery_ids"] == 2
    assert not any(k.startswith("source_") and k.endswith("_unlabelled") for k in metrics)
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert data["target"]["train"] == [["train/a_c1.jpg", -2, 0], ["train/b_c2.jpg", -2, 1], ["train/c_c2.jpg", -2, 1]]


def test_unlabelled_source_train_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    tree(src, {"train": ["a_c1.jpg", "b_c2.jpg"], "train/7": ["x_c1.jpg"], "query/7": ["q_c1.jpg"],
               "gallery/7": ["g_c2.jpg"]})
    tree(tmp_path / "m", {"bounding_box_train": ["0002_c1s1_000451_00.jpg"], "query": ["0002_c2s1_000301_00.jpg"],
                          "bounding_box_test": ["0002_c4s1_000700_00.jpg"]})
    cfg = load_config("demo", ["data.source.name=folder", f"data.source.root={src}",
                               "data.target.name=market1501", f"data.target.root={tmp_path / 'm'}"])
    with pytest.raises(DataError) as e:
        prepare_data(cfg, str(tmp_path / "out"))
    first = src / "train" / "a_c1.jpg"
    assert str(e.value).startswith(f"source dataset {src}: 2 unlabelled train image(s) (e.g. {first})")
    assert "must be labelled" in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
    # the same tree is fine as the target
    cfg = load_config("demo", ["data.source.name=market1501", f"data.source.root={tmp_path / 'm'}",
                               "data.target.name=folder", f"data.target.root={src}"])
    assert prepare_data(cfg, str(tmp_path / "ok"))["target_train_unlabelled"] == 2


def test_pretrain_refuses_an_unlabelled_source_manifest(tmp_path: Path) -> None:
    """A hand-made manifest can still carry an unlabelled source: pretraining names it, before any training."""
    from lf2core.data import datasets
    from lf2core.stages.pretrain import pretrain_source

    tree(tmp_path / "cams", {"train": ["a_c1.jpg", "b_c2.jpg", "c_c3.jpg"], "train/4": ["x_c1.jpg"],
                             "query/4": ["q_c1.jpg"], "gallery/4": ["g_c2.jpg"]})
    s = datasets.load("folder", tmp_path / "cams")
    manifest.write_manifest(tmp_path / "prep", s, s)
    with pytest.raises(DataError, match=r"prep: the source train split has 3 unlabelled image\(s\) \(no identity\)"):
        pretrain_source(load_config("demo", []), str(tmp_path / "prep"), str(tmp_path / "pre"))
    assert not (tmp_path / "pre").exists()
