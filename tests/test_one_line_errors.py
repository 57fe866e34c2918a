"""Filesystem, image and worker errors reach the user as one ``lf2: error:`` line naming the file, with a
non-zero exit and nothing partial left behind (real files, a real DataLoader worker process)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
import torch

from lf2core.cli import main as lf2_main, one_line
from lf2core.data.datasets import Sample
from lf2core.data.loaders import ImageDataset, load_image
from lf2core.errors import DataError


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A real 1x1 PNG whose IHDR (with a valid CRC) declares ``width`` x ``height``."""
    from PIL import Image

    Image.new("RGB", (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("side, message", [
    (10_000, "image header declares 10000x10000 pixels, over the limit"),  # lf2's own limit
    (50_000, r"cannot read image \(Image size \(2500000000 pixels\) exceeds limit"),  # PIL's bomb guard
])
def test_huge_header_refused_before_decoding(tmp_path: Path, side: int, message: str) -> None:
    p = tmp_path / "0001_c1s1_000001_00.png"
    _png_declaring(p, side, side)
    with pytest.raises(DataError, match=rf"{p}: {message}"):
        load_image(str(p))


def test_error_in_dataloader_worker_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "0002_c1s1_000001_00.jpg"
    bad.write_bytes(b"not a jpeg at all")
    ds = ImageDataset([Sample(str(bad), 2, 0)])
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert "Original Traceback" in str(e.value)  # what torch hands back from the worker ...
    line = one_line(e.value)  # ... and what the user sees
    assert line.startswith(f"{bad}: cannot read image (") and "\n" not in line and "Traceback" not in line


def test_out_under_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    rc = lf2_main(["data", "synth", "--domain", "a", "--out", str(f / "sub"), "--ids", "2", "--test-ids", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"lf2: error: {f / 'sub'}: cannot create the output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and f.read_text() == "x"


def test_read_only_location_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ro = Path("/proc/lf2-out")  # a virtual file system nobody can write to, root included
    rc = lf2_main(["data", "synth", "--domain", "a", "--out", str(ro), "--ids", "2", "--test-ids", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("lf2: error: /proc/lf2-out: ")


class _Payload:
    """A class a pickle would instantiate on load: a weights-only reader must refuse it."""

    def __reduce__(self):
        return (print, ("payload ran",))


def test_pickle_payloads_are_refused_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import numpy as np

    from lf2core import storage
    from lf2core.checkpoint import load_checkpoint
    from lf2core.errors import CheckpointError

    ck = tmp_path / "model.pt"
    torch.save({"format": "lf2-checkpoint/1", "state_dict": {}, "x": _Payload()}, ck)
    with pytest.raises(CheckpointError, match=rf"{ck}: corrupt or not a weights-only torch file"):
        load_checkpoint(str(ck))
    feats = tmp_path / "features.npz"
    np.savez(feats, global_=np.array([_Payload()], dtype=object))
    with pytest.raises(DataError, match=rf"{feats}: not a valid .npz file"):
        storage.read_npz(str(feats), "features")
    assert "payload ran" not in capsys.readouterr().out


def test_config_arch_differing_from_the_checkpoint_is_refused(tmp_path: Path) -> None:
    from lf2core import artifacts
    from lf2core.checkpoint import save_checkpoint
    from lf2core.config import load_config
    from lf2core.errors import CheckpointError
    from lf2core.models import SourceModel

    tiny = ["data.height=32", "data.width=16", "model.weights=none"]
    cfg = load_config("demo", tiny + ["model.arch=resnet18_narrow"])
    (tmp_path / "pre").mkdir()
    save_checkpoint(str(tmp_path / "pre" / "model.pt"), SourceModel("resnet18_narrow", num_classes=3), "source", cfg)
    assert artifacts.read_model(cfg, str(tmp_path / "pre")).eval_network()[2]["arch"] == "resnet18_narrow"
    other = load_config("demo", tiny + ["model.arch=resnet18"])
    for view in ("eval_network", "mean_teacher"):
        with pytest.raises(CheckpointError, match=r"model.pt: holds a resnet18_narrow network but config key "
                                                  r"'model.arch' is 'resnet18'"):
            getattr(artifacts.read_model(other, str(tmp_path / "pre")), view)()
