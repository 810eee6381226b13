"""Files on disk: litpeft's cache directory and the one way it writes a file or directory atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from litpeft.errors import LitPeftError


def cache_dir() -> Path:
    """litpeft's cache (converted models, tokenized data): ``$LITPEFT_CACHE``, else
    ``$XDG_CACHE_HOME/litpeft``, else ``~/.cache/litpeft``."""
    if os.environ.get("LITPEFT_CACHE"):
        return Path(os.environ["LITPEFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "litpeft"


def temp_sibling(path: str | os.PathLike[str], tag: str | None = None) -> Path:
    """A hidden name beside ``path`` for its temporary copy (per process unless ``tag`` is given)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{tag if tag is not None else os.getpid()}")


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a file, link or directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit(tmp: str | os.PathLike[str], path: str | os.PathLike[str], fsync: bool = False) -> None:
    """Move the finished ``tmp`` (a file or a directory) over ``path`` in one rename.

    ``os.replace`` cannot replace a non-empty directory, so an existing one is first moved aside to
    ``<path>.old`` and removed afterwards: a crash in between leaves that complete old copy, never a
    partial one under ``path``. ``fsync``: flush the file and the directory entry to disk first.
    """
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir():
        if os.path.lexists(path):
            old = path.with_name(path.name + ".old")
            remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
    else:
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    if fsync:
        _fsync(path.parent)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], directory: bool = False, fsync: bool = False, replace: bool = True
) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it becomes ``path`` in one rename.

    A reader (or a resume after a crash) sees the old ``path`` or the complete new one, never a partial
    one; on an error the temporary copy is removed and ``path`` is left as it was. ``directory``: the
    temporary path is created as an empty directory. ``replace=False`` keeps an existing ``path`` (e.g.
    another process finished the same cache entry first) and discards the new copy::

        with atomic_path("out/adapter.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if replace or not os.path.lexists(path):
            commit(tmp, path, fsync=fsync)
    finally:
        remove(tmp)


class DiskWriteError(LitPeftError):
    """A file could not be written (disk full, read-only, quota): the previous version is kept."""


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], what: str = "file") -> Path:
    """Write ``path`` completely or not at all, on any local filesystem.

    ``write(f)`` fills a temporary sibling (same directory, so the rename never crosses filesystems)
    opened with the builtin ``open``; it is fsynced, renamed over ``path`` with ``os.replace`` and the
    directory entry is fsynced. An ``OSError`` (disk full, quota, read-only) removes the temporary file,
    leaves any previous ``path`` untouched and is raised as :class:`DiskWriteError` (one line for the CLI).
    """
    path = Path(path)
    try:
        with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        reason = e.strerror or str(e)
        raise DiskWriteError(f"cannot write {what} {path}: {reason} (nothing was replaced)") from e
    return path


def check_writable(path: str | os.PathLike[str], what: str) -> None:
    """Fail unless a file can be created at ``path`` (its nearest existing ancestor takes a probe file).

    ``os.access`` says yes to root on a read-only filesystem's directory and under ``/proc``; creating (and
    removing) a file is the test that holds.
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise LitPeftError(f"{what} '{path}' exists and is not a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LitPeftError(f"{what} '{path}': '{parent}' is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".litpeft-probe-"):
            pass
    except OSError as e:
        raise LitPeftError(f"{what} '{path}' cannot be written ({e.strerror or e})") from None


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON lines, atomically: a failed write (e.g. a full disk) leaves the old file."""
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as e:
        raise LitPeftError(f"could not write '{path}': {e.strerror or e}") from None


def check_output_file(path: str | None, overwrite: bool, flag: str = "--output") -> None:
    """An output file may be written: not a directory, not an existing file unless ``overwrite`` (as
    ``merge``/``export`` refuse a non-empty directory), and its directory can take a new file."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise LitPeftError(f"{flag} '{path}' is a directory; give a file name")
    if target.exists() and not overwrite:
        raise LitPeftError(f"{flag} '{path}' exists (pass --overwrite true to replace it)")
    check_writable(target.parent, f"{flag} '{path}': its directory")
