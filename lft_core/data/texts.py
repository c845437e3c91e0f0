"""Texts a link can name: a text a user analyses is saved under ``cache/texts/<id>.txt``, where the id is the first
32 hex digits (128 bits) of its SHA-256, so ``?text=<id>`` in a page link reproduces the view on any session of the
same server.

A shared server must not be fillable by its visitors, nor confusable:

* **quota**: the store holds at most ``MAX_TEXTS`` texts and ``MAX_TOTAL_BYTES`` bytes (each text at most
  ``MAX_CHARS`` characters). A text is *in use* while it is being saved and for ``IN_USE_S`` after it was last
  saved or opened (its file's mtime is its last use: every save and every load touches it). When a save leaves
  the store over a bound, texts not in use are removed first, least recently used first, then texts in use, least
  recently used first; the text being saved is never removed. Stale temporaries of killed writes go too.
* **ids**: 128 bits, so no collision is within reach; still, every save compares the bytes already stored under
  the id, and a different text whose hash has the same id is refused (one line), never saved over the other and
  never served in its place. Every load checks that the bytes hash to the id.
* **repair**: a file under an id that is damaged (truncated, edited, replaced by a folder, a symlink or anything
  but a regular file) is rewritten when that text is saved again; until then loading it says it is damaged.
* **old links**: ids of 12 hex digits (links made before 128-bit ids) are still read when their file exists and
  checks out; otherwise the link is answered politely: the text is no longer on this server.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import time
from pathlib import Path

from lft_core.atomic import DamagedRecord, MissingRecord, read_bounded, write_bytes
from lft_core.errors import LFTError
from lft_core.paths import cache_dir

MAX_CHARS = 200_000
"""A text a link can name has at most this many characters (at most 800 KB in UTF-8)."""
MAX_BYTES = 4 * MAX_CHARS
MAX_TEXTS = 2000
"""The store keeps at most this many texts ..."""
MAX_TOTAL_BYTES = 64 * 1024 * 1024
"""... and at most this many bytes of them (64 MiB)."""
IN_USE_S = 24 * 3600.0
"""A text saved or opened in the last 24 hours is in use: removed only when no text out of use is left."""
STALE_TMP_S = 3600.0
"""A temporary of a write (``.<id>.txt.*.tmp``) older than this belongs to a killed write and is removed."""
ID_DIGITS = 32
OLD_ID_DIGITS = 12
_ID = re.compile(rf"[0-9a-f]{{{ID_DIGITS}}}|[0-9a-f]{{{OLD_ID_DIGITS}}}")
_FILE = re.compile(rf"([0-9a-f]{{{ID_DIGITS}}}|[0-9a-f]{{{OLD_ID_DIGITS}}})\.txt")


def text_id(text: str) -> str:
    """The id of ``text`` (content-addressed: the same text always has the same id)."""
    return _digest(text.encode("utf-8"), ID_DIGITS)


def _digest(data: bytes, digits: int) -> str:
    return hashlib.sha256(data).hexdigest()[:digits]


def texts_dir() -> Path:
    """``cache/texts``; LFTError (naming no server path: pages show it) when it cannot be used."""
    try:
        return cache_dir("texts")
    except LFTError:
        raise LFTError("the server's store of texts (cache/texts) cannot be used: it is not a writable folder") \
            from None


def _path(tid: str) -> Path:
    return texts_dir() / f"{tid}.txt"


def _lock():
    from filelock import FileLock

    return FileLock(str(texts_dir() / ".texts.lock"), timeout=30)


def _touch(path: Path) -> None:
    """Mark ``path`` used now (its mtime is its last use); best effort (a read-only store still reads)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _remove(path: Path) -> None:
    """Remove whatever is at ``path`` (a file, a symlink itself, a folder), without following links."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of ``path`` when it is a regular file (a symlink is not followed) of at most ``limit`` bytes;
    None when nothing is there; ``_Damaged`` for anything else (a folder, a link, a FIFO, an over-long or an
    unreadable file), so a read never blocks, never follows a link out of the store and never reads without
    bound (``atomic.read_bounded``)."""
    try:
        return read_bounded(path, limit, follow_links=False)
    except MissingRecord:
        return None
    except DamagedRecord as e:
        raise _Damaged(str(e)) from None


class _Damaged(Exception):
    pass


def save_text(text: str) -> str:
    """Save ``text`` (if it is not saved yet, or to repair its damaged file) and return its id; mark it used.

    LFTError for an over-long text, for a text whose id already names another text (a hash collision: never
    saved over it), and when the store cannot be written."""
    if len(text) > MAX_CHARS:
        raise LFTError(f"the text has {len(text):,} characters; a link can name texts of at most {MAX_CHARS:,}")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise LFTError("the text holds characters that are not valid Unicode (lone surrogates); a link cannot "
                       "name it") from None
    tid = _digest(data, ID_DIGITS)
    path = _path(tid)
    try:
        with _lock():
            try:
                stored = _read_regular(path, MAX_BYTES)
            except _Damaged:
                stored = None
                _remove(path)  # repair: a folder, a link or an over-long file under the id is replaced
            if stored == data:
                _touch(path)
                return tid
            if stored is not None and _digest(stored, len(tid)) == tid:
                raise LFTError(f"text id {tid} already names another text on this server (a hash collision); "
                               f"this text is not saved, so a link cannot name it")
            write_bytes(path, data)  # new, or a damaged file rewritten (repair on re-save)
            _enforce_quota(keep=path)
    except LFTError:
        raise
    except Exception as e:  # the lock or the store cannot be used (a full disk, a read-only folder, ...)
        why = getattr(e, "strerror", None) or type(e).__name__  # never str(e): it may name a server path
        raise LFTError(f"the text could not be saved on this server ({why})") from None
    return tid


def _enforce_quota(keep: Path) -> list[Path]:
    """Remove texts until the store is within ``MAX_TEXTS`` and ``MAX_TOTAL_BYTES`` (the module docstring's rule);
    returns the removed paths. Called with the store's lock held."""
    now = time.time()
    texts: list[tuple[bool, float, int, Path]] = []  # (in use, last use, size, path)
    for entry in os.scandir(texts_dir()):
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            if now - info.st_mtime > STALE_TMP_S:
                Path(entry.path).unlink(missing_ok=True)
            continue
        if not _FILE.fullmatch(entry.name) or not stat.S_ISREG(info.st_mode):
            continue
        texts.append((now - info.st_mtime < IN_USE_S, info.st_mtime, info.st_size, Path(entry.path)))
    count, total = len(texts), sum(t[2] for t in texts)
    removed = []
    for in_use, _, size, path in sorted(texts, key=lambda t: (t[0], t[1])):  # out of use first, oldest first
        if count <= MAX_TEXTS and total <= MAX_TOTAL_BYTES:
            break
        if path == keep:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
        count, total = count - 1, total - size
    return removed


def load_text(tid: str) -> str:
    """The saved text of id ``tid``; mark it used. LFTError when the id is malformed, unknown on this server
    (never saved here, or removed by the quota) or its file is damaged."""
    if not isinstance(tid, str) or not _ID.fullmatch(tid):
        shown = f"{tid!r}" if isinstance(tid, str) and re.fullmatch(r"[\w./-]{0,40}", tid, re.ASCII) else "the id"
        raise LFTError(f"{shown} is not a text id ({ID_DIGITS} hex digits)")  # an odd id is not echoed
    path = _path(tid)
    try:
        data = _read_regular(path, MAX_BYTES)
    except _Damaged as e:
        raise LFTError(f"text {tid} is damaged on this server ({e}): paste the text again to "
                       f"save it anew") from None
    if data is None:
        raise LFTError(f"text {tid} is not saved on this server (it may have been removed to keep the server's "
                       f"store of texts small, or the link comes from another machine): paste the text again")
    if len(data) > MAX_BYTES or _digest(data, len(tid)) != tid:
        raise LFTError(f"text {tid} is damaged on this server (its content no longer matches its id): paste the "
                       f"text again to save it anew")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # bytes that hash to the id but are not UTF-8: never written by save_text
        raise LFTError(f"text {tid} is damaged on this server (not UTF-8)") from None
    _touch(path)
    return text
