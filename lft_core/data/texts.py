"""Texts a link can name: every text a user analyses is saved once under ``cache/texts/<id>.txt``, where the id
is the first 12 hex digits of its SHA-256, so ``?text=<id>`` in a page link reproduces the view on any session of
the same server (texts are write-once: a saved text is never changed or removed by the app)."""
from __future__ import annotations

import hashlib
import re

from lft_core.atomic import write_text
from lft_core.errors import LFTError
from lft_core.paths import cache_dir

MAX_CHARS = 200_000
_ID = re.compile(r"[0-9a-f]{12}")


def text_id(text: str) -> str:
    """The id of ``text`` (content-addressed: the same text always has the same id)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def save_text(text: str) -> str:
    """Save ``text`` (if it is not saved yet) and return its id; LFTError for an over-long text."""
    if len(text) > MAX_CHARS:
        raise LFTError(f"the text has {len(text):,} characters; a link can name texts of at most {MAX_CHARS:,}")
    tid = text_id(text)
    path = cache_dir("texts") / f"{tid}.txt"
    if not path.exists():
        write_text(path, text)
    return tid


def load_text(tid: str) -> str:
    """The saved text of id ``tid``; LFTError when the id is malformed or unknown on this server."""
    if not _ID.fullmatch(tid or ""):
        raise LFTError(f"{tid!r} is not a text id (12 hex digits)")
    path = cache_dir("texts") / f"{tid}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LFTError(f"text {tid} is not saved on this server (the link comes from another machine?)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LFTError(f"text {tid} cannot be read ({type(e).__name__})") from None
    if text_id(text) != tid:
        raise LFTError(f"text {tid} is damaged on disk (its content no longer matches its id)")
    return text
