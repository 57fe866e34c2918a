"""lf2 never deletes what it did not write: ``--out`` / ``output_dir`` on local paths and a real S3 server.

Each case puts user files where lf2 is asked to write, runs the real code path (storage functions and the
``lf2`` command), and checks byte for byte that every user file is still there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from lf2core import checkpoint, storage
from lf2core.config import Config
from lf2core.stages.rounds import StageRunner
from lf2core.stages.table import PRETRAIN
from lf2core.cli import main as lf2_main
from lf2core.errors import StorageError

USER_FILES = {"notes.txt": b"my notes", "sub/data.bin": b"\x00\x01\x02"}


def _put_user_files(base: str) -> None:
    for name, data in USER_FILES.items():
        storage.write_bytes(storage.join(base, name), data)


def _user_files_intact(base: str) -> bool:
    return all(storage.read_bytes(storage.join(base, n)) == d for n, d in USER_FILES.items())


def _bucket_keys(bucket: str) -> set[str]:
    s3 = boto3.client("s3")
    return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that is certainly dead now
    return proc.pid


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path)
    return f"s3://{request.getfixturevalue('s3_env')}/work"


# ------------------------------------------------------------------------------------------ storage level
def test_non_empty_location_refused_and_untouched(base: str) -> None:
    out = storage.join(base, "out")
    _put_user_files(out)
    with pytest.raises(StorageError, match=r"out: is not empty and holds files lf2 did not write there "
                                           r"\(notes.txt and 1 more\)"):
        with storage.output_dir(out, "cluster"):
            pytest.fail("refused before the stage runs")
    assert _user_files_intact(out) and sorted(storage.list_files(out)) == sorted(USER_FILES)


def test_overwrite_writes_beside_user_files_and_deletes_none(base: str) -> None:
    out = storage.join(base, "out")
    _put_user_files(out)
    with storage.output_dir(out, "cluster", overwrite=True) as d:
        (d / "labels.npz").write_bytes(b"L1")
        (d / "old.json").write_bytes(b"{}")
    assert _user_files_intact(out) and storage.is_complete(out)
    with pytest.raises(StorageError, match="holds files lf2 did not write"):  # consent is given per run
        with storage.output_dir(out, "cluster"):
            pass
    with storage.output_dir(out, "cluster", overwrite=True) as d:  # lf2's own files replaced, the user's stay
        (d / "labels.npz").write_bytes(b"L2")
    assert _user_files_intact(out) and storage.read_bytes(storage.join(out, "labels.npz")) == b"L2"
    assert sorted(storage.list_files(out)) == sorted([*USER_FILES, "labels.npz", "_COMPLETE", "_LF2_OUTPUT.json"])


def test_rerun_of_same_stage_replaces_only_its_files(base: str) -> None:
    out = storage.join(base, "out")
    with storage.output_dir(out, "finetune") as d:
        (d / "student.pt").write_bytes(b"s1")
        (d / "extra").mkdir()
        (d / "extra" / "x.bin").write_bytes(b"x")
    with storage.output_dir(out, "finetune") as d:
        (d / "student.pt").write_bytes(b"s2")
    assert sorted(storage.list_files(out)) == ["_COMPLETE", "_LF2_OUTPUT.json", "student.pt"]
    if not storage.is_remote(out):
        assert not (Path(out) / "extra").exists()  # the directory lf2 made for its file went with it


def test_other_stage_output_refused(base: str) -> None:
    out = storage.join(base, "out")
    with storage.output_dir(out, "evaluate") as d:
        (d / "metrics.json").write_bytes(b"{}")
    with pytest.raises(StorageError, match="holds the output of lf2 stage 'evaluate', not 'cluster'"):
        with storage.output_dir(out, "cluster"):
            pass
    assert storage.is_complete(out)  # refused: the other stage's output is left as it was


def test_killed_rerun_leaves_no_complete_looking_output(base: str) -> None:
    out = storage.join(base, "out")
    with storage.output_dir(out, "pretrain-source") as d:
        (d / "model.pt").write_bytes(b"config A")
    storage.claim_output(out, "pretrain-source")  # what `lf2 pretrain` does first, before training
    # ... the rerun (other settings) is killed here, before it commits ...
    assert not storage.is_complete(out)
    assert storage.read_bytes(storage.join(out, "model.pt")) == b"config A"  # kept, but not "complete"


def test_s3_bucket_root_and_object_never_outputs(s3_env: str) -> None:
    storage.write_bytes(f"s3://{s3_env}/keep/me.txt", b"1")
    for uri in (f"s3://{s3_env}", f"s3://{s3_env}/"):
        with pytest.raises(StorageError, match="a bucket root is never an output location"):
            with storage.output_dir(uri, "cluster", overwrite=True):
                pass
    with pytest.raises(StorageError, match="is an existing object, not an output prefix"):
        with storage.output_dir(f"s3://{s3_env}/keep/me.txt", "cluster", overwrite=True):
            pass
    assert _bucket_keys(s3_env) == {"keep/me.txt"}


def test_s3_prefix_boundary(s3_env: str) -> None:
    """``s3://b/out`` is the prefix ``out/``: ``out2/...`` and ``out.txt`` are other things."""
    storage.write_bytes(f"s3://{s3_env}/out2/a", b"1")
    storage.write_bytes(f"s3://{s3_env}/out.txt", b"2")
    for _ in range(2):
        with storage.output_dir(f"s3://{s3_env}/out", "cluster") as d:
            (d / "labels.npz").write_bytes(b"L")
    assert {"out2/a", "out.txt", "out/labels.npz"} <= _bucket_keys(s3_env)


def test_local_file_at_out_refused_even_with_overwrite(tmp_path: Path) -> None:
    f = tmp_path / "model.pt"
    f.write_bytes(b"precious")
    with pytest.raises(StorageError, match="is an existing file, not a directory; lf2 will not replace it"):
        with storage.output_dir(str(f), "finetune", overwrite=True):
            pass
    assert f.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_dead_scratch_is_removed_live_one_kept(tmp_path: Path) -> None:
    dead = tmp_path / f".out.lf2-{_dead_pid()}-abc.partial"
    live = tmp_path / f".out.lf2-{os.getppid()}-abc.partial"
    user = tmp_path / ".out.mine.partial"  # not named like lf2's scratch: never touched
    for d in (dead, live, user):
        d.mkdir()
    with storage.output_dir(str(tmp_path / "out"), "cluster") as d:
        (d / "labels.npz").write_bytes(b"L")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, user.name])


def test_released_training_state_takes_killed_writers_temp_files_and_nothing_else(tmp_path: Path) -> None:
    """A process killed while writing ``state.pt`` leaves ``.state.pt.lf2-PID-*.tmp`` in the work dir: the
    release removes it with the state; a live writer's temp file, user files and the user's parent
    directory (``LF2_WORK_DIR``) stay."""
    parent = tmp_path / "my-work-dir"  # made by the user, holds nothing else
    work = parent / "pretrain-abc"
    work.mkdir(parents=True)
    (work / "state.pt").write_bytes(b"S")
    (work / f".state.pt.lf2-{_dead_pid()}-x1.tmp").write_bytes(b"half")
    checkpoint.release_work_dir(str(work))
    assert not work.exists() and parent.is_dir()
    work.mkdir()
    live = work / f".state.pt.lf2-{os.getppid()}-x2.tmp"
    for f in (work / "state.pt", live, work / "notes.txt"):
        f.write_bytes(b"1")
    checkpoint.release_work_dir(str(work))
    assert sorted(p.name for p in work.iterdir()) == sorted([live.name, "notes.txt"])


def test_rerun_after_a_kill_between_commit_and_release_drops_the_state(tmp_path: Path) -> None:
    """The pretrain output was committed but the process died before releasing ``<out>.partial``: the
    rerun skips the complete stage and removes the stale state (the random-kill test found this)."""
    out = str(tmp_path / "pretrain")
    with storage.output_dir(out, PRETRAIN) as d:
        (d / "model.pt").write_bytes(b"M")
    work = Path(checkpoint.work_dir(out, PRETRAIN))
    work.mkdir()
    (work / "state.pt").write_bytes(b"S")
    (work / f".state.pt.lf2-{_dead_pid()}-x.tmp").write_bytes(b"half")
    assert StageRunner(Config()).run(PRETRAIN, out) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain"]
    assert (tmp_path / "pretrain" / "model.pt").read_bytes() == b"M"


def test_failed_stage_leaves_no_scratch(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with storage.output_dir(str(tmp_path / "out"), "cluster") as d:
            (d / "x").write_bytes(b"1")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ the lf2 command
def test_cli_synth_refuses_non_empty_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "mine"
    _put_user_files(str(out))
    rc = lf2_main(["data", "synth", "--domain", "a", "--out", str(out), "--ids", "2", "--test-ids", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"lf2: error: {out}: is not empty")
    assert _user_files_intact(str(out)) and sorted(storage.list_files(str(out))) == sorted(USER_FILES)


def test_cli_synth_overwrite_keeps_user_files_and_reruns(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    _put_user_files(str(out))
    args = ["data", "synth", "--domain", "a", "--out", str(out), "--ids", "2", "--test-ids", "2"]
    assert lf2_main(args + ["--overwrite"]) == 0
    assert _user_files_intact(str(out)) and storage.is_complete(str(out))
    assert lf2_main(args + ["--seed", "1", "--overwrite"]) == 0
    assert _user_files_intact(str(out))
    clean = tmp_path / "clean"
    assert lf2_main(["data", "synth", "--domain", "a", "--out", str(clean), "--ids", "2", "--test-ids", "2"]) == 0
    first = {f: storage.read_bytes(str(clean / f)) for f in storage.list_files(str(clean))}
    assert lf2_main(["data", "synth", "--domain", "a", "--out", str(clean), "--ids", "2", "--test-ids", "2",
                     "--seed", "1"]) == 0  # its own previous output: replaced without --overwrite
    second = {f: storage.read_bytes(str(clean / f)) for f in storage.list_files(str(clean))}
    assert second != first and set(second) >= {"_COMPLETE", "_LF2_OUTPUT.json"}


def test_cli_stage_refuses_before_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``lf2 pretrain`` into a foreign directory fails at once (it would otherwise train first)."""
    out = tmp_path / "mine"
    _put_user_files(str(out))
    rc = lf2_main(["pretrain", "--data", str(tmp_path / "no-data"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "is not empty and holds files lf2 did not write" in err and "no-data" not in err
    rc = lf2_main(["run-local", "--out", str(out)])
    assert rc == 2 and "is not an lf2 run directory" in capsys.readouterr().err
    assert _user_files_intact(str(out)) and sorted(storage.list_files(str(out))) == sorted(USER_FILES)


def test_cli_s3_bucket_root(s3_env: str, capsys: pytest.CaptureFixture) -> None:
    storage.write_bytes(f"s3://{s3_env}/keep/me.txt", b"1")
    rc = lf2_main(["data", "synth", "--domain", "a", "--out", f"s3://{s3_env}", "--ids", "2", "--overwrite"])
    assert rc == 2 and "a bucket root is never an output location" in capsys.readouterr().err
    assert _bucket_keys(s3_env) == {"keep/me.txt"}


def test_outputs_get_ordinary_permissions_under_the_umask(tmp_path: Path) -> None:
    """Outputs are not left 0600/0700 like temp files: a shared cluster's umask decides (here 022 and 002)."""
    for umask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o002, 0o664, 0o775)):
        old = os.umask(umask)
        try:
            out = tmp_path / f"out{umask:o}"
            with storage.output_dir(str(out), "cluster") as d:
                (d / "labels.npz").write_bytes(b"L")
            storage.write_bytes(str(tmp_path / f"w{umask:o}" / "state.pt"), b"s")
        finally:
            os.umask(old)
        assert out.stat().st_mode & 0o777 == dir_mode
        assert (out / "_COMPLETE").stat().st_mode & 0o777 == file_mode
        assert (tmp_path / f"w{umask:o}" / "state.pt").stat().st_mode & 0o777 == file_mode
