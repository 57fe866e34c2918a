"""Dataset formats: tiny fake trees for every format, parsed results vs hand-written expectations,
``check_main`` / ``lf2 data check`` on corrupt and misnamed files, and the manifest round trip."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lf2core import storage
from lf2core.data import datasets, manifest
from lf2core.data.datasets import UNLABELLED, Sample
from lf2core.errors import DataError

REPO = Path(__file__).resolve().parent.parent


def write_image(path: Path, seed: int = 0) -> None:
    """A random 8x4 (HxW) JPEG (or PNG by suffix) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (8, 4, 3), dtype=np.uint8)).save(path)


def write_truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (8, 4, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def make_tree(root: Path, files: dict[str, list[str]]) -> None:
    for i, (folder, names) in enumerate(files.items()):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for j, n in enumerate(names):
            write_image(root / folder / n, seed=100 * i + j)


MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_00.jpg", "0002_c3s1_000551_01.jpg", "0007_c2s1_000100_00.jpg"],
    "query": ["0002_c2s1_000301_00.jpg", "0007_c6s2_000200_00.jpg"],
    "bounding_box_test": ["-1_c1s1_000001_00.jpg", "0000_c3s1_000010_00.jpg", "0002_c4s1_000700_00.jpg",
                          "0007_c1s1_000900_00.jpg"],
}
DUKE = {
    "bounding_box_train": ["0005_c2_f0046985.jpg", "0005_c5_f0051000.jpg", "0010_c8_f0000001.jpg"],
    "query": ["0005_c1_f0046000.jpg"],
    "bounding_box_test": ["0000_c3_f0000010.jpg", "0005_c7_f0060000.jpg", "-1_c2_f0000002.jpg"],
}


def rel(splits: datasets.Splits, which: str, base: Path) -> list[tuple[str, int, int]]:
    return [(os.path.relpath(s.path, base), s.pid, s.camid) for s in splits.split(which)]


# ----------------------------------------------------------------------------------------- market / duke
def test_market1501_parse(tmp_path: Path) -> None:
    make_tree(tmp_path, MARKET)
    (tmp_path / "bounding_box_train" / "Thumbs.db").write_bytes(b"x")  # shipped in the real archive
    s = datasets.load("market1501", tmp_path)
    assert s.name == "market1501" and s.root == str(tmp_path.resolve())
    assert rel(s, "train", tmp_path) == [
        ("bounding_box_train/0002_c1s1_000451_00.jpg", 2, 0),
        ("bounding_box_train/0002_c3s1_000551_01.jpg", 2, 2),
        ("bounding_box_train/0007_c2s1_000100_00.jpg", 7, 1),
    ]
    assert rel(s, "query", tmp_path) == [("query/0002_c2s1_000301_00.jpg", 2, 1), ("query/0007_c6s2_000200_00.jpg", 7, 5)]
    # junk (-1) dropped, distractor (0) kept
    assert rel(s, "gallery", tmp_path) == [
        ("bounding_box_test/0000_c3s1_000010_00.jpg", 0, 2),
        ("bounding_box_test/0002_c4s1_000700_00.jpg", 2, 3),
        ("bounding_box_test/0007_c1s1_000900_00.jpg", 7, 0),
    ]
    assert all(os.path.isabs(x.path) for x in s.train + s.query + s.gallery)
    assert isinstance(s.train[0], Sample) and s.train[0]._fields == ("path", "pid", "camid")
    assert s.stats() == {
        "train": {"identities": 2, "images": 3, "cameras": 3},
        "query": {"identities": 2, "images": 2, "cameras": 2},
        "gallery": {"identities": 3, "images": 3, "cameras": 3},
    }


def test_dukemtmc_parse_in_single_subfolder(tmp_path: Path) -> None:
    make_tree(tmp_path / "DukeMTMC-reID", DUKE)
    (tmp_path / "__MACOSX").mkdir()  # archive debris is not a candidate sub-folder
    s = datasets.load("dukemtmc", tmp_path)
    base = tmp_path / "DukeMTMC-reID"
    assert rel(s, "train", base) == [
        ("bounding_box_train/0005_c2_f0046985.jpg", 5, 1),
        ("bounding_box_train/0005_c5_f0051000.jpg", 5, 4),
        ("bounding_box_train/0010_c8_f0000001.jpg", 10, 7),
    ]
    assert rel(s, "query", base) == [("query/0005_c1_f0046000.jpg", 5, 0)]
    assert rel(s, "gallery", base) == [("bounding_box_test/0000_c3_f0000010.jpg", 0, 2),
                                       ("bounding_box_test/0005_c7_f0060000.jpg", 5, 6)]
    assert s.root == str(tmp_path.resolve())  # root as given; paths under the sub-folder


def test_market_errors_name_the_culprit(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such directory"):
        datasets.load("market1501", tmp_path / "nope")
    make_tree(tmp_path, {"bounding_box_train": ["0002_c1s1_000451_00.jpg"], "query": []})
    with pytest.raises(DataError, match="missing bounding_box_test"):
        datasets.load("market1501", tmp_path)
    make_tree(tmp_path, {"bounding_box_test": ["0002_c1s1_000451_00.jpg", "oops.jpg"]})
    with pytest.raises(DataError, match=r"bounding_box_test/oops\.jpg: unparseable name"):
        datasets.load("market1501", tmp_path)
    # a Duke name is not a Market name, and vice versa
    with pytest.raises(DataError, match=r"0002_c1s1_000451_00\.jpg: unparseable name for dukemtmc"):
        datasets.load("dukemtmc", tmp_path)
    with pytest.raises(DataError, match="unknown dataset format 'cuhk03'"):
        datasets.load("cuhk03", tmp_path)


def test_camera_zero_is_rejected(tmp_path: Path) -> None:
    make_tree(tmp_path, {"bounding_box_train": ["0002_c0s1_000451_00.jpg"], "query": [], "bounding_box_test": []})
    with pytest.raises(DataError, match=r"0002_c0s1_000451_00\.jpg: unparseable name: camera number 0"):
        datasets.load("market1501", tmp_path)


def test_two_candidate_subfolders_is_ambiguous(tmp_path: Path) -> None:
    make_tree(tmp_path / "a", MARKET)
    make_tree(tmp_path / "b", MARKET)
    with pytest.raises(DataError, match="several sub-folders"):
        datasets.load("market1501", tmp_path)


# ----------------------------------------------------------------------------------------- msmt17
def make_msmt(root: Path, dirs: tuple[str, str] = ("train", "test")) -> None:
    train = ["0000/0000_000_01_0303morning_0015_0.jpg", "0000/0000_001_05_0303morning_0016_0.jpg",
             "0001/0001_000_15_0303noon_0001_1.jpg"]
    val = ["0001/0001_001_03_0303noon_0002_0.jpg"]
    query = ["0000/0000_000_02_0303afternoon_0001_0.jpg"]
    gallery = ["0000/0000_001_04_0303afternoon_0002_0.jpg", "0003/0003_000_11_0303morning_0100_0.jpg"]
    for sub, names in ((dirs[0], train + val), (dirs[1], query + gallery)):
        for i, n in enumerate(names):
            write_image(root / sub / n, seed=i)
    for name, names in (("list_train.txt", train), ("list_val.txt", val), ("list_query.txt", query),
                        ("list_gallery.txt", gallery)):
        (root / name).write_text("".join(f"{n} {int(n[:4])}\n" for n in names))


def test_msmt17_parse(tmp_path: Path) -> None:
    make_msmt(tmp_path / "MSMT17_V1")
    s = datasets.load("msmt17", tmp_path)
    base = tmp_path / "MSMT17_V1"
    assert rel(s, "train", base) == [
        ("train/0000/0000_000_01_0303morning_0015_0.jpg", 0, 0),
        ("train/0000/0000_001_05_0303morning_0016_0.jpg", 0, 4),
        ("train/0001/0001_000_15_0303noon_0001_1.jpg", 1, 14),
        ("train/0001/0001_001_03_0303noon_0002_0.jpg", 1, 2),  # list_val is part of train
    ]
    assert rel(s, "query", base) == [("test/0000/0000_000_02_0303afternoon_0001_0.jpg", 0, 1)]
    assert rel(s, "gallery", base) == [("test/0000/0000_001_04_0303afternoon_0002_0.jpg", 0, 3),
                                       ("test/0003/0003_000_11_0303morning_0100_0.jpg", 3, 10)]


def test_msmt17_v2_layout(tmp_path: Path) -> None:
    make_msmt(tmp_path / "MSMT17_V2", ("mask_train_v2", "mask_test_v2"))
    assert datasets.detect_format(tmp_path) == "msmt17"
    s = datasets.load("msmt17", tmp_path)
    base = tmp_path / "MSMT17_V2"
    assert rel(s, "train", base)[3] == ("mask_train_v2/0001/0001_001_03_0303noon_0002_0.jpg", 1, 2)
    assert rel(s, "gallery", base) == [("mask_test_v2/0000/0000_001_04_0303afternoon_0002_0.jpg", 0, 3),
                                       ("mask_test_v2/0003/0003_000_11_0303morning_0100_0.jpg", 3, 10)]
    (base / "list_query.txt").unlink()  # the error speaks of the version that is there
    with pytest.raises(DataError, match=r"not a msmt17 layout, missing list_query.txt$"):
        datasets.load("msmt17", base)


def test_msmt17_errors(tmp_path: Path) -> None:
    make_msmt(tmp_path)
    (tmp_path / "list_val.txt").unlink()
    with pytest.raises(DataError, match="missing list_val.txt"):
        datasets.load("msmt17", tmp_path)
    make_msmt(tmp_path)
    with open(tmp_path / "list_gallery.txt", "a") as f:
        f.write("0009/0009_000_02_x_1_0.jpg 9\n")  # listed, not on disk
        f.write("just-one-field\n")
    with pytest.raises(DataError, match=r"0009_000_02_x_1_0\.jpg \(.*list_gallery\.txt:3\): listed but missing"):
        datasets.load("msmt17", tmp_path)
    assert datasets.check_main(str(tmp_path), "msmt17", open_images=False) == 1


# ----------------------------------------------------------------------------------------- folder
def test_folder_named_identities(tmp_path: Path) -> None:
    make_tree(tmp_path, {
        "train/bob": ["x_c2_1.jpg", "x_c2_2.jpg"],
        "train/alice": ["cam.jpg"],          # no c<digits> token -> camera 0
        "query/carol": ["q-c3.png"],
        "gallery/alice": ["g.c4.jpg"],
        "gallery/carol": ["a1c5.jpg"],       # 'c5' follows a digit: not a token -> camera 0
    })
    s = datasets.load("folder", tmp_path)
    # names are mapped to 0..n-1 in sorted order over all splits: alice 0, bob 1, carol 2
    assert rel(s, "train", tmp_path) == [("train/alice/cam.jpg", 0, 0), ("train/bob/x_c2_1.jpg", 1, 1),
                                         ("train/bob/x_c2_2.jpg", 1, 1)]
    assert rel(s, "query", tmp_path) == [("query/carol/q-c3.png", 2, 2)]
    assert rel(s, "gallery", tmp_path) == [("gallery/alice/g.c4.jpg", 0, 3), ("gallery/carol/a1c5.jpg", 2, 0)]


def test_folder_integer_identities_and_bad_files(tmp_path: Path) -> None:
    make_tree(tmp_path, {
        "train/0012": ["0012_c1s1_000451_00.jpg"],
        "train/-1": ["junk_c1.jpg"],
        "query/0012": ["q_c2.jpg"],
        "gallery/0000": ["d_c3.jpg"],
    })
    s = datasets.load("folder", tmp_path)
    assert rel(s, "train", tmp_path) == [("train/0012/0012_c1s1_000451_00.jpg", 12, 0)]
    assert rel(s, "query", tmp_path) == [("query/0012/q_c2.jpg", 12, 1)]
    assert rel(s, "gallery", tmp_path) == [("gallery/0000/d_c3.jpg", 0, 2)]
    write_image(tmp_path / "gallery" / "loose.jpg")
    with pytest.raises(DataError, match=r"gallery/loose\.jpg: image outside an identity folder"):
        datasets.load("folder", tmp_path)


def test_folder_unlabelled_train_images(tmp_path: Path) -> None:
    make_tree(tmp_path, {
        "train": ["u_c2_0003.jpg", "zz.png", "a_c4.jpg"],  # loose in train/: unlabelled
        "train/bob": ["x_c1_1.jpg"],
        "query/carol": ["q_c3.jpg"],
        "gallery/bob": ["g_c2.jpg"],
        "gallery/carol": ["h_c1.jpg"],
    })
    (tmp_path / "train" / "notes.txt").write_text("not an image")  # skipped, not an unlabelled image
    s = datasets.load("folder", tmp_path)
    assert UNLABELLED == -2
    # entries of train/ in name order; names -> 0..n-1 over the labelled ones only: bob 0, carol 1
    assert rel(s, "train", tmp_path) == [
        ("train/a_c4.jpg", UNLABELLED, 3),
        ("train/bob/x_c1_1.jpg", 0, 0),
        ("train/u_c2_0003.jpg", UNLABELLED, 1),
        ("train/zz.png", UNLABELLED, 0),  # no camera token -> camera 0
    ]
    assert rel(s, "query", tmp_path) == [("query/carol/q_c3.jpg", 1, 2)]
    assert rel(s, "gallery", tmp_path) == [("gallery/bob/g_c2.jpg", 0, 1), ("gallery/carol/h_c1.jpg", 1, 0)]
    # unlabelled images are images, not an identity
    assert s.stats() == {
        "train": {"identities": 1, "images": 4, "cameras": 3, "unlabelled": 3},
        "query": {"identities": 1, "images": 1, "cameras": 1},
        "gallery": {"identities": 2, "images": 2, "cameras": 2},
    }
    with pytest.raises(DataError, match=r"train/a_c4\.jpg: unlabelled image \(pid -2, no identity\)"):
        datasets.relabel(s.train)
    # integer identity folders keep their integer pids next to unlabelled images
    (tmp_path / "int").mkdir()
    make_tree(tmp_path / "int", {"train": ["p.c5.jpg"], "query/0012": ["q_c1.jpg"], "gallery/0012": ["g_c2.jpg"]})
    s = datasets.load("folder", tmp_path / "int")
    assert rel(s, "train", tmp_path / "int") == [("train/p.c5.jpg", UNLABELLED, 4)]
    assert rel(s, "query", tmp_path / "int") == [("query/0012/q_c1.jpg", 12, 0)]
    # the camera rule still applies to loose train images
    write_image(tmp_path / "int" / "train" / "bad_c0.jpg")
    with pytest.raises(DataError, match=r"train/bad_c0\.jpg: unparseable name: camera token c0"):
        datasets.load("folder", tmp_path / "int")


def test_folder_loose_images_in_query_are_an_error(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train": ["u_c1.jpg"], "query/a": ["q_c1.jpg"], "query": ["loose_c2.jpg"],
                         "gallery/a": ["g_c2.jpg"]})
    with pytest.raises(DataError, match=r"query/loose_c2\.jpg: image outside an identity folder "
                                         r"\(expected query/<identity>/<image>; only train/ may hold unlabelled"):
        datasets.load("folder", tmp_path)


def test_folder_csv_unlabelled_train_rows(tmp_path: Path) -> None:
    for n in ("imgs/a.jpg", "imgs/b.jpg", "imgs/c.jpg", "imgs/d.jpg", "imgs/e.jpg"):
        write_image(tmp_path / n)
    (tmp_path / "manifest.csv").write_text(
        "split,path,pid,camid\ntrain,imgs/a.jpg,,4\ntrain,imgs/b.jpg,7,2\ntrain,imgs/e.jpg, ,0\n"
        "query,imgs/c.jpg,7,1\ngallery,imgs/d.jpg,9,0\n"
    )
    s = datasets.load("folder", tmp_path)
    # the empty pids do not stop the integer rule for the others (7 stays 7)
    assert rel(s, "train", tmp_path) == [("imgs/a.jpg", UNLABELLED, 4), ("imgs/b.jpg", 7, 2),
                                         ("imgs/e.jpg", UNLABELLED, 0)]
    assert rel(s, "query", tmp_path) == [("imgs/c.jpg", 7, 1)]
    assert rel(s, "gallery", tmp_path) == [("imgs/d.jpg", 9, 0)]
    # query and gallery rows still need a pid
    (tmp_path / "manifest.csv").write_text(
        "split,path,pid,camid\ntrain,imgs/a.jpg,,0\nquery,imgs/c.jpg,,1\ngallery,imgs/d.jpg,9,0\n"
    )
    with pytest.raises(DataError, match=r"manifest\.csv:3: empty pid \(query images need an identity"):
        datasets.load("folder", tmp_path)
    (tmp_path / "manifest.csv").write_text("split,path,pid,camid\ntrain,,3,0\n")
    with pytest.raises(DataError, match=r"manifest\.csv:2: empty path$"):
        datasets.load("folder", tmp_path)


def test_folder_csv_manifest(tmp_path: Path) -> None:
    for n in ("imgs/a.jpg", "imgs/b.jpg", "imgs/c.jpg", "imgs/d.jpg"):
        write_image(tmp_path / n)
    (tmp_path / "manifest.csv").write_text(
        "split,path,pid,camid\ntrain,imgs/a.jpg,zed,0\ntrain,imgs/b.jpg,amy,3\nquery,imgs/c.jpg,amy,1\n"
        "gallery,imgs/d.jpg,zed,2\n"
    )
    s = datasets.load("folder", tmp_path)
    assert rel(s, "train", tmp_path) == [("imgs/a.jpg", 1, 0), ("imgs/b.jpg", 0, 3)]  # csv order; amy 0, zed 1
    assert rel(s, "query", tmp_path) == [("imgs/c.jpg", 0, 1)]
    assert rel(s, "gallery", tmp_path) == [("imgs/d.jpg", 1, 2)]
    (tmp_path / "manifest.csv").write_text("split,path,pid,camid\nval,imgs/a.jpg,1,0\ntrain,imgs/zz.jpg,1,0\n")
    with pytest.raises(DataError, match=r"manifest\.csv:2: split 'val' is not one of"):
        datasets.load("folder", tmp_path)
    assert datasets.check_main(str(tmp_path), None, open_images=False) == 1
    (tmp_path / "manifest.csv").write_text("split,path,pid\n")
    with pytest.raises(DataError, match="missing column.*camid"):
        datasets.load("folder", tmp_path)


def test_folder_camera_rule() -> None:
    assert datasets.folder_camera("0002_c1s1_000451_00.jpg") == 0
    assert datasets.folder_camera("c12-x.jpg") == 11
    assert datasets.folder_camera("abc3.jpg") == 0  # 'c3' is inside a word: no token
    assert datasets.folder_camera("person.jpg") == 0
    with pytest.raises(ValueError):
        datasets.folder_camera("x_c0.jpg")


# ----------------------------------------------------------------------------------------- relabel, detect
def test_relabel() -> None:
    samples = [Sample("a", 7, 0), Sample("b", 2, 0), Sample("c", 7, 1), Sample("d", 0, 0)]
    assert datasets.relabel(samples).tolist() == [2, 1, 2, 0]
    assert datasets.relabel(samples).dtype == np.int64
    with pytest.raises(DataError, match="negative pid"):
        datasets.relabel([Sample("x", -1, 0)])


def test_detect_format(tmp_path: Path) -> None:
    make_tree(tmp_path / "m", MARKET)
    make_tree(tmp_path / "d" / "DukeMTMC-reID", DUKE)
    make_msmt(tmp_path / "s")
    make_tree(tmp_path / "f", {"train/a": ["1.jpg"], "query/a": ["2.jpg"], "gallery/a": ["3.jpg"]})
    assert datasets.detect_format(tmp_path / "m") == "market1501"
    assert datasets.detect_format(tmp_path / "d") == "dukemtmc"
    assert datasets.detect_format(tmp_path / "s") == "msmt17"
    assert datasets.detect_format(tmp_path / "f") == "folder"
    with pytest.raises(DataError, match="cannot detect the format"):
        datasets.detect_format(tmp_path / "f" / "train")


# ----------------------------------------------------------------------------------------- check
def test_check_main_reports_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tree(tmp_path, MARKET)
    assert datasets.check_main(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "market1501 (detected)" in out
    assert "train             2        3        3" in out and "gallery           3        3        3" in out
    # a truncated jpeg, a non-image with .jpg, two bad names: all four reported, none stops the scan
    write_truncated_jpeg(tmp_path / "query" / "0007_c1s1_000333_00.jpg")
    (tmp_path / "bounding_box_test" / "0002_c5s1_000001_00.jpg").write_text("not an image")
    write_image(tmp_path / "bounding_box_train" / "img001.jpg")
    write_image(tmp_path / "query" / "0002-c1s1.jpg")
    assert datasets.check_main(str(tmp_path), "market1501") == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("PROBLEM")]
    assert len(lines) == 4, lines
    text = "\n".join(lines)
    assert "query/0007_c1s1_000333_00.jpg: unreadable image" in text
    assert "bounding_box_test/0002_c5s1_000001_00.jpg: unreadable image" in text
    assert "bounding_box_train/img001.jpg: unparseable name" in text
    assert "query/0002-c1s1.jpg: unparseable name" in text
    # names only: the corrupt images are not noticed
    assert datasets.check_main(str(tmp_path), "market1501", open_images=False) == 1
    assert sum(ln.startswith("PROBLEM") for ln in capsys.readouterr().out.splitlines()) == 2


def test_check_main_reports_unlabelled_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tree(tmp_path, {"train": ["u1_c1.jpg", "u2_c2.jpg", "u3_c2.jpg"], "train/7": ["x_c1.jpg", "y_c3.jpg"],
                         "query/7": ["q_c2.jpg"], "gallery/7": ["g_c1.jpg"], "gallery/8": ["h_c1.jpg"]})
    assert datasets.check_main(str(tmp_path)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "format: folder (detected)"
    table = lines[lines.index("split    identities   images  cameras unlabelled"):][:4]
    assert table == [
        "split    identities   images  cameras unlabelled",
        "train             1        5        3          3",
        "query             1        1        1          0",
        "gallery           2        2        1          0",
    ]
    assert "opened 8 images, 0 unreadable" in lines and lines[-1] == "ok"
    # an unreadable unlabelled image is reported like any other
    write_truncated_jpeg(tmp_path / "train" / "u4_c1.jpg")
    assert datasets.check_main(str(tmp_path), "folder") == 1
    problems = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("PROBLEM")]
    assert len(problems) == 1 and "train/u4_c1.jpg: unreadable image" in problems[0]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lf2core.cli", "data", "check", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_data_check_exit_codes(tmp_path: Path) -> None:
    make_tree(tmp_path / "good", DUKE)
    r = _cli(str(tmp_path / "good"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dukemtmc (detected)" in r.stdout
    make_tree(tmp_path / "bad", DUKE)
    write_truncated_jpeg(tmp_path / "bad" / "query" / "0010_c3_f0000100.jpg")
    r = _cli(str(tmp_path / "bad"), "--format", "dukemtmc")
    assert r.returncode == 1
    assert "0010_c3_f0000100.jpg: unreadable image" in r.stdout
    r = _cli(str(tmp_path / "missing"))
    assert r.returncode == 2 and "lf2: error:" in r.stderr and "missing" in r.stderr


# ----------------------------------------------------------------------------------------- manifest
def test_manifest_round_trip(tmp_path: Path) -> None:
    make_tree(tmp_path / "market", MARKET)
    make_msmt(tmp_path / "msmt")
    src, tgt = datasets.load("market1501", tmp_path / "market"), datasets.load("msmt17", tmp_path / "msmt")
    out = tmp_path / "out"
    manifest.write_manifest(out, src, tgt)
    data = json.loads((out / "manifest.json").read_text())
    assert data["version"] == 1 and data["source"]["root"] == str((tmp_path / "market").resolve())
    assert data["source"]["gallery"][0] == ["bounding_box_test/0000_c3s1_000010_00.jpg", 0, 2]
    m = manifest.read_manifest(str(out))
    assert m["source"].train == src.train and m["source"].gallery == src.gallery
    assert m["target"].query == tgt.query and m["target"].name == "msmt17"
    assert manifest.split(m, "target_train") == tgt.train
    assert manifest.read_manifest(str(out / "manifest.json"))["source"].query == src.query
    with pytest.raises(DataError, match="unknown split 'target_val'"):
        manifest.split(m, "target_val")


def test_manifest_round_trips_unlabelled_pids(tmp_path: Path) -> None:
    make_tree(tmp_path / "market", MARKET)
    make_tree(tmp_path / "mine", {"train": ["a_c1.jpg", "b_c2.jpg"], "train/5": ["p_c1.jpg"],
                                  "query/5": ["q_c2.jpg"], "gallery/5": ["g_c1.jpg"]})
    src, tgt = datasets.load("market1501", tmp_path / "market"), datasets.load("folder", tmp_path / "mine")
    manifest.write_manifest(tmp_path / "out", src, tgt)
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert data["target"]["train"] == [["train/5/p_c1.jpg", 5, 0], ["train/a_c1.jpg", -2, 0],
                                       ["train/b_c2.jpg", -2, 1]]
    m = manifest.read_manifest(str(tmp_path / "out"))
    assert manifest.split(m, "target_train") == tgt.train
    assert [x.pid for x in m["target"].train] == [5, UNLABELLED, UNLABELLED]
    assert m["target"].stats()["train"] == {"identities": 1, "images": 3, "cameras": 2, "unlabelled": 2}


def test_manifest_relative_root_follows_the_output(tmp_path: Path) -> None:
    make_tree(tmp_path / "out" / "source", MARKET)
    src = datasets.load("market1501", tmp_path / "out" / "source")
    src.root = "source"  # relative to the manifest's directory
    manifest.write_manifest(tmp_path / "out", src, src)
    os.rename(tmp_path / "out", tmp_path / "moved")
    m = manifest.read_manifest(str(tmp_path / "moved"))
    assert [os.path.relpath(s.path, tmp_path / "moved") for s in m["source"].query] == [
        "source/query/0002_c2s1_000301_00.jpg", "source/query/0007_c6s2_000200_00.jpg"]
    assert all(os.path.isfile(s.path) for s in m["target"].train + m["target"].gallery)


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.pop("target"), "target"),
    (lambda d: d.__setitem__("version", 2), "version"),
    (lambda d: d["source"].pop("root"), "source.root"),
    (lambda d: d["source"]["train"].append(["a.jpg", "3", 0]), "source.train[3]"),
    (lambda d: d["target"]["query"].append(["../etc/passwd", 3, 0]), "target.query[2]"),
    (lambda d: d["target"]["gallery"].append(["x.jpg", True, 0]), "target.gallery[3]"),
    (lambda d: d["source"].__setitem__("root", "/nonexistent/lf2"), "source.root"),
])
def test_manifest_validation_names_the_key(tmp_path: Path, mutate, key: str) -> None:
    make_tree(tmp_path / "market", MARKET)
    s = datasets.load("market1501", tmp_path / "market")
    manifest.write_manifest(tmp_path / "out", s, s)
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    mutate(data)
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=re.escape(f"key '{key}'")):
        manifest.read_manifest(str(tmp_path / "out"))


def test_manifest_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        manifest.read_manifest(str(tmp_path))
    with pytest.raises(DataError, match="cannot read"):
        manifest.read_manifest(str(tmp_path / "absent"))


def test_write_manifest_rejects_paths_outside_root(tmp_path: Path) -> None:
    make_tree(tmp_path / "market", MARKET)
    s = datasets.load("market1501", tmp_path / "market")
    s.train.append(Sample(str(tmp_path / "elsewhere.jpg"), 1, 0))
    with pytest.raises(DataError, match="elsewhere.jpg is not under the root"):
        manifest.write_manifest(tmp_path / "out", s, s)


# ----------------------------------------------------------------------------------------- s3
def test_s3_root_and_manifest(tmp_path: Path, s3_env: str) -> None:
    make_tree(tmp_path / "market", MARKET)
    uri = f"s3://{s3_env}/datasets/market"
    storage.copy_tree(str(tmp_path / "market"), uri, "dataset-copy")
    s = datasets.load("market1501", uri)
    assert s.root == uri
    assert rel(s, "gallery", Path(s.local_root)) == rel(datasets.load("market1501", tmp_path / "market"),
                                                       "gallery", tmp_path / "market")
    out = f"s3://{s3_env}/runs/prepare"
    with storage.output_dir(out, "prepare-data") as d:
        manifest.write_manifest(d, s, s)
    m = manifest.read_manifest(out)
    assert m["source"].root == uri
    assert [x[1:] for x in m["target"].train] == [x[1:] for x in s.train]
    assert all(os.path.isfile(x.path) for x in m["source"].train)
    # written straight to an s3:// prefix as well
    manifest.write_manifest(f"s3://{s3_env}/direct", s, s)
    assert manifest.read_manifest(f"s3://{s3_env}/direct/manifest.json")["target"].query == m["target"].query


# ------------------------------------------------------------------------------ data check == prepare's rules
@pytest.mark.parametrize("case", ["ok", "empty_query", "empty_train", "empty_tree", "unlabelled_source"])
@pytest.mark.parametrize("role", ["source", "target"])
def test_data_check_agrees_with_prepare(tmp_path: Path, case: str, role: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``lf2 data check --role R`` reports a problem exactly when prepare-data refuses the data as R."""
    from lf2core.config import load_config
    from lf2core.stages.prepare import prepare_data

    root = tmp_path / "data"
    files = {"train/0001": ["a_c1.jpg", "b_c2.jpg"], "train/0002": ["c_c1.jpg", "d_c2.jpg"],
             "query/0001": ["e_c1.jpg"], "gallery/0001": ["f_c2.jpg"], "gallery/0002": ["g_c2.jpg"]}
    if case == "empty_query":
        files = {k: v for k, v in files.items() if not k.startswith("query")}
        (root / "query").mkdir(parents=True)
    if case == "empty_train":
        files = {k: v for k, v in files.items() if not k.startswith("train")}
        (root / "train").mkdir(parents=True)
    if case == "empty_tree":
        files = {}
        for d in ("train", "query", "gallery"):
            (root / d).mkdir(parents=True)
    if case == "unlabelled_source":
        files["train"] = ["loose_c1.jpg"]
    make_tree(root, files)
    checked = datasets.check_main(str(root), "folder", role=role)
    out = capsys.readouterr().out
    other = "target" if role == "source" else "source"
    cfg = load_config("demo", [f"data.{role}.name=folder", f"data.{role}.root={root}",
                               f"data.{other}.name=folder", f"data.{other}.root={tmp_path / 'other'}"])
    make_tree(tmp_path / "other", {"train/0001": ["a_c1.jpg", "b_c2.jpg"], "train/0002": ["c_c1.jpg"],
                                   "query/0001": ["e_c1.jpg"], "gallery/0001": ["f_c2.jpg"]})
    try:
        prepare_data(cfg, str(tmp_path / "prep"))
        refused = None
    except DataError as e:
        refused = str(e)
    assert (checked == 1) == (refused is not None), (out, refused)
    if refused:
        reason = refused.split(": ", 1)[1]
        assert f"PROBLEM as a {role} domain: {reason}" in out
