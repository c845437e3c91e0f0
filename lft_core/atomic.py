"""Atomic writes and checked reads: every file the engine saves appears whole or not at all, and reads back
checked.

One guarantee for every writer: the content goes to a temporary name in the target's own folder, is flushed
and fsync'ed, then renamed over the target with ``os.replace`` (atomic on POSIX within one file system). A
crash or a full disk leaves at worst a hidden temporary (``.<name>.*.tmp``) that nobody reads, never a half
file under the real name; the temporary is removed when the write fails.

* ``atomic_write(path, fill)``: ``fill(tmp_path)`` writes the content (any library that writes to a path);
* ``write_bytes`` / ``write_text`` / ``write_json`` / ``save_npy``: the common cases;
* ``atomic_folder(target)``: a folder built in a staging sibling, fsync'ed and renamed into place;
* ``read_record(path, fields, optional=, extra=)``: the way back, the ONE reader of every JSON record: a regular
  file of at most ``MAX_RECORD_BYTES`` (FIFOs, devices and folders refused without blocking), holding a JSON
  object whose fields match a schema (missing, wrong-typed or, when ``extra=False``, unexpected fields are
  refused by name), or one DamagedRecord line;
* ``file_sha256(path)``: the hash that proves a weights file is the one a record was saved with.

Outputs the user names (``--json PATH``, a script's ``--out``) are written by ``lft_core.outputs`` instead, which
checks what is there first and never replaces a FIFO, device, socket, link or a file of the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
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


def atomic_write(path: str | Path, fill: Callable[[Path], None],
                 before_replace: Callable[[Path], None] | None = None) -> None:
    """Write ``path`` atomically: ``fill(tmp)`` writes a temporary file beside it, which is fsync'ed and renamed
    onto ``path``. The parent folder must exist. On any error the temporary is removed and the error raised.
    ``before_replace(tmp)`` runs once the temporary is complete and durable, just before the rename (the flow
    store hashes the new weights there and records the hash first)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fill(tmp)
        _fsync_file(tmp)
        if before_replace is not None:
            before_replace(tmp)
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


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


MAX_RECORD_BYTES = 16 * 2**20
"""The largest JSON record the engine reads back (16 MiB: a flow record with the history of a 100,000-step run
is ~10 MiB). Anything larger is refused from its size, without reading it."""

Kinds = type | tuple[type, ...]


class DamagedRecord(LFTError):
    """A record file (JSON) is missing, unreadable, not an object, or has a field of the wrong type."""


class MissingRecord(DamagedRecord):
    """The file is not there at all (callers that treat "none yet" apart from "damaged" catch this first)."""


def _kind_names(kinds: tuple[type, ...]) -> str:
    return "/".join("null" if k is type(None) else k.__name__ for k in kinds)


def read_bounded(path: Path, limit: int, follow_links: bool = True) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes (a symlink to one is fine, unless
    ``follow_links`` is False: then a link is refused as one, never followed).

    Opened with O_NONBLOCK and checked with fstat on the open descriptor, so a FIFO never blocks the reader and a
    device (``/dev/zero``), a socket or a folder is refused before a byte is read; a file that grows while it is
    read is cut at ``limit + 1`` bytes and refused."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    if not follow_links:
        if os.path.islink(path):
            raise DamagedRecord(f"{path.name} is a symbolic link, not a regular file")
        flags |= getattr(os, "O_NOFOLLOW", 0)  # and a link put there after the look is refused by the open
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise MissingRecord(f"{path.name} is missing") from None
    except OSError as e:
        raise DamagedRecord(f"{path.name} cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = ("a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode)
                    else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "a socket")
            raise DamagedRecord(f"{path.name} is {kind}, not a regular file")
        too_big = DamagedRecord(f"{path.name} is larger than {limit / 2**20:g} MiB, the limit of a record")
        if info.st_size > limit:
            raise too_big
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, min(2**20, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise too_big
        return b"".join(chunks)
    except OSError as e:
        raise DamagedRecord(f"{path.name} cannot be read ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)


def check_fields(data: dict, where: str, fields: dict[str, Kinds] | None = None,
                 optional: dict[str, Kinds] | None = None, extra: bool = True) -> dict:
    """``data`` if each of ``fields`` is present and of its type, each of ``optional`` present is of its type,
    and (``extra=False``) no other field is there; DamagedRecord naming the first field that is not. ``bool`` is
    not an ``int`` here, and ``object`` accepts anything (a field another check reads)."""
    for name, kind in {**(optional or {}), **(fields or {})}.items():
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if name not in data:
            if fields and name in fields:
                raise DamagedRecord(f"{where}: field {name!r} is missing (it should be a {_kind_names(kinds)})")
            continue
        value = data[name]
        if object in kinds:
            continue
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise DamagedRecord(f"{where}: field {name!r} is a {_kind_names((type(value),))}, not a "
                                f"{_kind_names(kinds)}")
    if not extra:
        known = set(fields or ()) | set(optional or ())
        unexpected = [name for name in data if name not in known]
        if unexpected:
            raise DamagedRecord(f"{where}: field {unexpected[0]!r} is not a field of this record")
    return data


def read_record(path: str | Path, fields: dict[str, Kinds] | None = None, *, optional: dict[str, Kinds] | None = None,
                extra: bool = True, limit: int = MAX_RECORD_BYTES, follow_links: bool = True) -> dict:
    """The JSON object in ``path``, checked against a schema: each of ``fields`` present and of its type, each of
    ``optional`` of its type when present, and (``extra=False``) nothing else; DamagedRecord naming the first
    problem otherwise. The file must be a regular file of at most ``limit`` bytes (see ``read_bounded``).
    Every record the engine reads back goes through here, so a truncated, hand-edited, endless or foreign file
    is one clear line (or a rebuild), never a traceback or a hang."""
    path = Path(path)
    raw = read_bounded(path, limit, follow_links)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DamagedRecord(f"{path.name} cannot be read ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise DamagedRecord(f"{path.name} holds a JSON {type(data).__name__}, not an object")
    return check_fields(data, path.name, fields, optional, extra)
