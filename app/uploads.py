"""Uploads: a corpus file uploaded on the Setup page, stored under cache/uploads (size-limited, sanitised,
content-addressed)."""
from __future__ import annotations

import re
from pathlib import Path

from lft_core.errors import LFTError


UPLOAD_LIMIT_MB = 20
UPLOAD_SUFFIXES = (".txt", ".jsonl", ".md")


def save_upload(name: str, data: bytes) -> Path:
    """Store an uploaded corpus file under cache/uploads with a sanitised, content-addressed name.

    Refuses files over the size limit, other suffixes, and anything that is not UTF-8 text."""
    import hashlib

    from lft_core.atomic import write_bytes
    from lft_core.paths import cache_dir

    if len(data) > UPLOAD_LIMIT_MB * 2**20:
        raise LFTError(f"{name} is {len(data) / 2**20:.1f} MB; uploads are limited to {UPLOAD_LIMIT_MB} MB")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._") or "corpus"
    suffix = Path(stem).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise LFTError(f"{name}: only {', '.join(UPLOAD_SUFFIXES)} files can be used as a corpus")
    from lft_core.data.corpus import decode_text

    decode_text(data, name)  # the corpus's own checks: empty, binary, not UTF-8
    digest = hashlib.sha256(data).hexdigest()[:12]
    folder = cache_dir("uploads")
    base = Path(stem).stem[:60].strip("._-") or "corpus"
    target = folder / f"{digest}-{base}{suffix}"
    if not target.exists():
        write_bytes(target, data)
    return target
