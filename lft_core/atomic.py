"""Atomic writes: every file and folder the engine saves appears whole or not at all.

One guarantee for every writer: the content goes to a temporary name in the target's own folder, is flushed
and fsync'ed, then renamed over the target with ``os.replace`` (atomic on POSIX within one file system). A
crash or a full disk leaves at worst a hidden temporary (``.<name>.*.tmp``) that nobody reads, never a half
file under the real name; the temporary is removed when the write fails.

* ``atomic_write(path, fill)``: ``fill(tmp_path)`` writes the content (any library that writes to a path);
* ``write_bytes`` / ``write_text`` / ``write_json`` / ``save_npy``: the common cases;
* ``atomic_folder(target)``: a folder built in a staging sibling, fsync'ed and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


def _fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems refuse to open folders)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Write ``path`` atomically: ``fill(tmp)`` writes a temporary file beside it, which is fsync'ed and renamed
    onto ``path``. The parent folder must exist. On any error the temporary is removed and the error raised."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fill(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """``path`` holds exactly ``data`` (atomically)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> None:
    """``path`` holds exactly ``text`` as UTF-8 (atomically)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any, indent: int | None = None, default: Callable | None = None) -> None:
    """``path`` holds ``data`` as JSON (atomically); the text is built first, so a value JSON cannot encode
    raises before anything is written."""
    write_text(path, json.dumps(data, indent=indent, default=default))


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """``path`` holds ``array`` as a .npy file (atomically, never pickled)."""

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    atomic_write(path, fill)


@contextmanager
def atomic_folder(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Build a folder in a staging sibling (yielded), then rename it to ``target`` when the block succeeds.

    Every file in it is fsync'ed first. ``target`` must not exist unless ``replace`` is true (then the old
    folder is removed just before the rename). On any error the staging folder is removed and ``target`` is
    untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield staging
        for item in staging.rglob("*"):
            if item.is_file():
                _fsync_file(item)
        if replace and target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        _fsync_dir(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
