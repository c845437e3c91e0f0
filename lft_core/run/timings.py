"""How long operations took on this machine, so that a progress bar can give an honest estimate.

``record(op, seconds)`` keeps the last few durations of an operation (``op`` names the work and its size, e.g.
``"load smollm2-135m"`` or ``"umap 312 points"``) in ``cache/timings.json``; ``estimate(op)`` is their median, or
None before the first measurement. Writes are atomic and serialised by a file lock, so sessions can share it.
"""
from __future__ import annotations

import statistics

from lft_core.atomic import DamagedRecord, read_record, write_json
from lft_core.paths import cache_root

KEEP = 5  # durations kept per operation


def _path():
    return cache_root() / "timings.json"


def _read() -> dict:
    try:
        data = read_record(_path())
    except DamagedRecord:
        return {}
    return {k: [float(x) for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)]
            for k, v in data.items() if isinstance(v, list)}


def estimate(op: str) -> float | None:
    """The median of the last recorded durations of ``op`` in seconds, or None if it was never measured here."""
    values = _read().get(op)
    return float(statistics.median(values)) if values else None


def record(op: str, seconds: float) -> None:
    """Remember that ``op`` took ``seconds`` (best effort: a read-only cache folder records nothing)."""
    from filelock import FileLock

    try:
        with FileLock(str(cache_root() / ".timings.lock"), timeout=5):
            data = _read()
            data[op] = (data.get(op, []) + [round(float(seconds), 3)])[-KEEP:]
            write_json(_path(), data)
    except Exception:  # noqa: BLE001 - timings are a convenience; never fail the work they measure
        pass
