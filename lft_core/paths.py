"""Where runtime data lives: ``cache/`` at the repository root, or ``$LFT_CACHE_DIR``."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    """The cache folder (created on demand). ``LFT_CACHE_DIR`` overrides the default ``<repo>/cache``."""
    root = Path(os.environ.get("LFT_CACHE_DIR") or REPO_ROOT / "cache")
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(kind: str) -> Path:
    """A sub-folder of the cache: ``activations``, ``flows``, ``projections``, ``jobs``, ``models``, ``uploads``."""
    path = cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
