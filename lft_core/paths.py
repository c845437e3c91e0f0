"""Where runtime data lives: ``cache/`` at the repository root, or ``$LFT_CACHE_DIR``."""
from __future__ import annotations

import os
from pathlib import Path

from lft_core.errors import LFTError

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    """The cache folder (created on demand). ``LFT_CACHE_DIR`` overrides the default ``<repo>/cache``."""
    given = os.environ.get("LFT_CACHE_DIR")
    root = Path(given or REPO_ROOT / "cache")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = f"LFT_CACHE_DIR={given}" if given else f"the cache folder {root}"
        raise LFTError(f"{what} cannot be used ({e.strerror or e}): point LFT_CACHE_DIR at a writable folder") from None
    return root


def cache_dir(kind: str) -> Path:
    """A sub-folder of the cache: ``activations``, ``flows``, ``projections``, ``jobs``, ``models``, ``uploads``."""
    path = cache_root() / kind
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LFTError(f"cannot create {path} ({e.strerror or e}): point LFT_CACHE_DIR at a writable folder") from None
    return path
