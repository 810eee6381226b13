"""The one atomic-write helper: a path holds its old content or the complete new one, never a part."""

from __future__ import annotations

from pathlib import Path

import pytest

from litpeft.files import atomic_path, cache_dir, commit


def _hidden_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_file_appears_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()  # nothing under the real name while writing
    assert target.read_text() == "new"
    assert _hidden_leftovers(target.parent) == []


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert target.read_text() == "old"
    assert _hidden_leftovers(tmp_path) == []


def test_a_directory_replaces_the_old_one_whole(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("x")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .tmp, no .old


def test_replace_false_keeps_what_another_process_finished_first(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    target.mkdir()
    (target / "theirs").write_text("1")
    with atomic_path(target, directory=True, replace=False) as tmp:
        (tmp / "mine").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_commit_moves_a_finished_file_over_the_target(tmp_path: Path) -> None:
    (tmp_path / "ckpt").write_text("old")
    (tmp_path / "ckpt.tmp").write_text("new")
    commit(tmp_path / "ckpt.tmp", tmp_path / "ckpt", fsync=True)
    assert (tmp_path / "ckpt").read_text() == "new" and not (tmp_path / "ckpt.tmp").exists()


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITPEFT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LITPEFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "litpeft"


def test_write_atomic_disk_full_keeps_the_old_file_and_says_so_in_one_line(tmp_path: Path) -> None:
    import errno

    from litpeft.files import DiskWriteError, write_atomic

    target = tmp_path / "last.ckpt"
    write_atomic(target, lambda f: f.write(b"old complete"))

    def half_then_full(f) -> None:
        f.write(b"new, ha")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskWriteError) as info:
        write_atomic(target, half_then_full, what="checkpoint")
    assert (
        str(info.value) == f"cannot write checkpoint {target}: No space left on device (nothing was replaced)"
    )
    assert target.read_bytes() == b"old complete"
    assert _hidden_leftovers(tmp_path) == []


def test_write_atomic_fsyncs_the_file_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from litpeft.files import write_atomic

    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
    assert calls.index("fsync") < calls.index("replace")
    assert calls[-1] == "fsync"  # the directory entry too
