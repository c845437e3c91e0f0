"""Where runtime data lives: ``cache/`` at the repository root, or ``$LFT_CACHE_DIR``."""
from __future__ import annotations

import os
from pathlib import Path

from lft_core.errors import LFTError

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_location() -> Path:
    """Where the cache folder is (``$LFT_CACHE_DIR`` or ``<repo>/cache``), without creating it."""
    return Path(os.environ.get("LFT_CACHE_DIR") or REPO_ROOT / "cache")


def cache_root() -> Path:
    """The cache folder (created on demand). ``LFT_CACHE_DIR`` overrides the default ``<repo>/cache``."""
    given = os.environ.get("LFT_CACHE_DIR")
    root = cache_location()
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


CACHE_OWN_FILES = ("timings.json", "README.md")
"""Files the engine keeps at the top of the cache folder (beside its hidden locks and temporaries)."""


def cache_owned(path: str | Path) -> tuple[Path, Path] | None:
    """``(cache folder, path inside it)`` when ``path`` belongs to the cache, else None.

    The cache is the project's own: the folder itself, everything in any sub-folder (``activations``, ``flows``,
    ``grids``, ``demo``, ``jobs``, ``texts``, ``uploads``, ``models``, ``projections``, ``offload`` and any kind
    ``cache_dir`` makes later), the top-level files in ``CACHE_OWN_FILES``, hidden names (locks, temporaries),
    and any top-level name without a suffix (a future sub-folder's name). A top-level ``NAME.SUFFIX`` file of the
    user's own (``cache/flows.json``) is not the cache's. Both the active cache (``$LFT_CACHE_DIR``) and the
    repository's default ``cache/`` are checked, each as written (made absolute) and with links resolved, so
    ``..``, a link to a folder of the cache or a relative path cannot reach in.
    """
    given = Path(path).expanduser()
    forms = {Path(os.path.abspath(given))}
    try:
        forms.add(Path(os.path.realpath(given)))
    except (OSError, ValueError):
        pass
    roots: set[Path] = set()
    for root in (cache_location(), REPO_ROOT / "cache"):
        roots.add(Path(os.path.abspath(root)))
        try:
            roots.add(Path(os.path.realpath(root)))
        except (OSError, ValueError):
            pass
    for root in sorted(roots):
        for form in sorted(forms):
            try:
                rel = form.relative_to(root)
            except ValueError:
                continue
            parts = rel.parts
            if (not parts or len(parts) > 1 or parts[0] in CACHE_OWN_FILES or parts[0].startswith(".")
                    or not Path(parts[0]).suffix):
                return root, rel
    return None
