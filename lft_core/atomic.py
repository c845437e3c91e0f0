"""Atomic writes and checked reads: every file the engine saves appears whole or not at all, and reads back
checked.

One guarantee for every writer: the content goes to a temporary name in the target's own folder, is flushed
and fsync'ed, then renamed over the target with ``os.replace`` (atomic on POSIX within one file system). A
crash or a full disk leaves at worst a hidden temporary (``.<name>.*.tmp``) that nobody reads, never a half
file under the real name; the temporary is removed when the write fails.

* ``atomic_write(path, fill)``: ``fill(tmp_path)`` writes the content (any library that writes to a path);
* ``write_bytes`` / ``write_text`` / ``write_json`` / ``save_npy``: the common cases;
* ``atomic_folder(target)``: a folder built in a staging sibling, fsync'ed and renamed into place;
* ``read_record(path, fields)``: the way back: a JSON object with typed fields, or one DamagedRecord line.
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

from lft_core.errors import LFTError


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


class DamagedRecord(LFTError):
    """A record file (JSON) is missing, unreadable, not an object, or has a field of the wrong type."""


def read_record(path: str | Path, fields: dict[str, type | tuple[type, ...]] | None = None) -> dict:
    """The JSON object in ``path``, with each of ``fields`` present and of its type (bool is not an int here);
    DamagedRecord naming the first problem otherwise. Every record the engine reads back goes through here, so
    a truncated, hand-edited or foreign file is one clear line (or a rebuild), never a traceback."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedRecord(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DamagedRecord(f"{path.name} cannot be read ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise DamagedRecord(f"{path.name} holds a JSON {type(data).__name__}, not an object")
    for name, kind in (fields or {}).items():
        value = data.get(name)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if name not in data or (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise DamagedRecord(f"{path.name}: field {name!r} is missing or not a {'/'.join(k.__name__ for k in kinds)}")
    return data
