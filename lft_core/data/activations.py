"""On-disk activation cache: hidden states h_i of a teacher over a corpus's windows, as float16 memmaps.

Layout (``cache/activations/<key>/``)::

    meta.json      model id + weights hash, corpus id + hash, split, seq_len, windows, d, layers present, dates
    tokens.npy     int32 (windows, seq_len)
    layer_XX.npy   float16 (windows, seq_len, d): h_XX, the residual stream entering block XX (XX = L: last
                   block's output before the final norm)

Guarantees:

* Missing layers are computed together in ONE forward pass over the windows (stopping after the deepest).
* Writes are atomic: a layer is filled in ``layer_XX.npy.partial`` and renamed when complete; ``meta.json``
  (written last, also by rename) is the only list of layers that count. A crash leaves at worst a partial
  file that is deleted and recomputed, never a half file read as whole.
* A file lock (``<key>.lock`` beside the entry) serialises writers of one entry across processes; a second
  writer waits, then finds the layers present and computes nothing.
* A corrupt entry (meta.json missing or unreadable, a short layer file, wrong shape) is detected on open and
  rebuilt (only the damaged parts).
* Free disk is checked before writing; a write that would not fit is refused with a clear message.
* Under torchrun the windows' batches are split over the ranks; each fills its rows of the same ``.partial``
  files and leaves a part marker, and rank 0 renames the layers into place only when every part is there.
  The files are byte-identical to a one-process run's.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from lft_core.atomic import DamagedRecord, read_record, save_npy, write_json
from lft_core.data.corpus import Corpus, make_windows
from lft_core.distributed import Dist, agree, current, shard_of
from lft_core.errors import LFTError
from lft_core.paths import cache_dir

FORMAT_VERSION = 2  # 2: the train / held-out split is by token blocks (corpus.SPLIT_RULE), not by window
DISK_MARGIN_BYTES = 64 * 2**20


class CacheError(LFTError):
    """The cache cannot be written or read (no space, bad entry, bad request)."""


def parse_layers(text: str, n_layers: int) -> list[int]:
    """Parse a layer list: ``all`` (0..L), ``a:b`` (a..b inclusive) or ``0,6,12``. Checks 0 <= i <= L."""
    text = str(text).strip().lower()
    try:
        if text == "all":
            layers = list(range(n_layers + 1))
        elif ":" in text:
            a, b = (int(x) for x in text.split(":", 1))
            if a > b:
                raise CacheError(f"layer range {text} is reversed")
            layers = list(range(a, b + 1))
        else:
            layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CacheError(f"cannot read layers {text!r}: use all, a:b or a comma list like 0,6,12") from None
    if not layers:
        raise CacheError("no layers given")
    bad = [i for i in layers if not 0 <= i <= n_layers]
    if bad:
        shown = str(bad) if len(bad) <= 5 else f"[{', '.join(map(str, bad[:5]))}, ...] ({len(bad)} in all)"
        raise CacheError(f"layers {shown} are outside 0..{n_layers} (the model has {n_layers} blocks)")
    return sorted(set(layers))


def cache_key(model_id: str, weights_hash: str, corpus_id: str, corpus_hash: str, seq_len: int, n_windows: int,
              split: str) -> str:
    """Entry name: a readable prefix and a hash of everything that determines the contents."""
    raw = json.dumps([model_id, weights_hash, corpus_id, corpus_hash, seq_len, n_windows, split, FORMAT_VERSION])
    digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
    model = Path(model_id).name.replace("/", "_")[:24] or "model"
    return f"{model}-{split}-T{seq_len}-W{n_windows}-{digest}"


def _layer_file(entry: Path, i: int) -> Path:
    return entry / f"layer_{i:02d}.npy"


META_FIELDS = {"format_version": int, "model": str, "windows": int, "seq_len": int, "d_model": int,
               "n_layers": int, "layers": list, "split": str}


def _read_meta(entry: Path) -> dict | None:
    """The entry's meta.json if it is whole, of this format, and says something possible (positive sizes,
    layers inside 0..n_layers); None otherwise (the entry is then treated as damaged and rebuilt)."""
    try:
        meta = read_record(entry / "meta.json", META_FIELDS)
    except DamagedRecord:
        return None
    sizes_ok = all(meta[k] >= 1 for k in ("windows", "seq_len", "d_model", "n_layers"))
    layers = meta["layers"]
    layers_ok = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= meta["n_layers"] for i in layers)
    return meta if meta["format_version"] == FORMAT_VERSION and sizes_ok and layers_ok else None


def _valid_array(path: Path, shape: tuple[int, ...], dtype: str) -> bool:
    """True when ``path`` is a complete .npy of exactly this shape and dtype (a short file fails here)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == shape and arr.dtype == np.dtype(dtype)


@dataclass
class ActivationCache:
    """A validated cache entry. ``layer(i)`` returns a read-only float16 memmap (windows, seq_len, d)."""

    dir: Path
    meta: dict
    hit: bool = True
    seconds: float = 0.0
    computed_layers: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        return self.dir.name

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.meta["windows"], self.meta["seq_len"], self.meta["d_model"])

    @property
    def tokens(self) -> np.ndarray:
        return np.load(self.dir / "tokens.npy", mmap_mode="r")

    def layer(self, i: int) -> np.ndarray:
        if i not in self.meta["layers"]:
            raise CacheError(f"layer {i} is not in cache entry {self.key} (present: {self.layers})")
        return np.load(_layer_file(self.dir, i), mmap_mode="r")

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())


def open_activations(entry: str | Path, root: Path | None = None) -> ActivationCache:
    """Open an existing entry by key or folder, validating every listed layer. CacheError if unusable."""
    path = Path(entry)
    if not path.is_absolute() and not path.exists():
        path = (root or cache_dir("activations")) / str(entry)
    meta = _read_meta(path)
    if meta is None:
        raise CacheError(f"activation cache {path.name} is missing or damaged (no valid meta.json); rebuild it")
    shape = (meta["windows"], meta["seq_len"], meta["d_model"])
    bad = [i for i in meta["layers"] if not _valid_array(_layer_file(path, i), shape, "float16")]
    if bad or not _valid_array(path / "tokens.npy", shape[:2], "int32"):
        raise CacheError(f"activation cache {path.name} is damaged (layers {bad}); rebuild it with `cache`")
    return ActivationCache(path, meta)


def list_entries(root: Path | None = None) -> list[dict]:
    """Summaries of every entry (for status pages): key, meta (or None if damaged), size in bytes."""
    root = root or cache_dir("activations")
    out = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
            out.append({"key": p.name, "dir": str(p), "meta": _read_meta(p), "size_bytes": size})
    return out


def delete_entry(key: str, root: Path | None = None) -> None:
    """Remove an entry (under its lock, so no writer is mid-way)."""
    from filelock import FileLock

    root = root or cache_dir("activations")
    if "/" in key or key.startswith("."):
        raise CacheError(f"bad cache key {key!r}")
    with FileLock(str(root / f"{key}.lock")):
        shutil.rmtree(root / key, ignore_errors=True)


def cached_layers(teacher, corpus: Corpus, seq_len: int, n_windows: int, split: str = "train",
                  root: Path | None = None) -> list[int]:
    """The layers the cache entry of these windows lists (its meta.json; not validated: a quick look to tell
    whether ``ensure_activations`` would have to compute anything)."""
    key = cache_key(teacher.model_id, teacher.weights_hash, corpus.id, corpus.content_hash, seq_len, n_windows, split)
    meta = _read_meta((root or cache_dir("activations")) / key)
    return list(meta.get("layers", [])) if meta else []


def ensure_activations(
    teacher,
    corpus: Corpus,
    seq_len: int,
    n_windows: int,
    layers: Sequence[int],
    split: str = "train",
    batch_size: int = 8,
    progress: bool = True,
    callback: Callable[[int, int], None] | None = None,
    root: Path | None = None,
    lock_timeout: float = -1,
) -> ActivationCache:
    """Return the entry for (teacher, corpus, split, seq_len, n_windows) with at least ``layers`` present,
    computing only the missing layers in one pass. ``callback(done_windows, total)`` reports progress.

    Under torchrun (``distributed.current()`` has several ranks) every rank calls this and the work is
    shared: rank 0 holds the entry's lock, decides what is missing and creates the layer files; the batches
    of ``batch_size`` windows are split into contiguous shares (``distributed.shard_of``), each rank fills
    its rows and leaves a part marker; only when every part's marker is there does rank 0 rename the layer
    files into place and write meta.json. The batches are the ones a single process computes, so the files
    are byte-identical to a one-process run's; the cache folder must be shared by all ranks."""
    from filelock import FileLock, Timeout

    dist = current()
    start = time.perf_counter()
    layers = sorted(set(int(i) for i in layers))
    if not layers or layers[0] < 0 or layers[-1] > teacher.n_layers:
        raise CacheError(f"layers must lie in 0..{teacher.n_layers}, got {layers}")
    if seq_len > teacher.max_positions:
        raise CacheError(f"seq_len {seq_len} is longer than the model's context ({teacher.max_positions} tokens)")
    if n_windows < 1:
        raise CacheError(f"the number of windows must be at least 1, got {n_windows}")
    root = root or cache_dir("activations")
    key = cache_key(teacher.model_id, teacher.weights_hash, corpus.id, corpus.content_hash, seq_len, n_windows, split)
    entry = root / key
    shape = (n_windows, seq_len, teacher.d_model)
    # tokenize before taking the lock or touching the entry: a corpus too short is refused with nothing written
    windows = make_windows(corpus, teacher.tokenizer, seq_len, n_windows, split)

    with ExitStack() as held:
        def plan() -> dict:  # rank 0, under the entry's lock: what is there, what must be computed
            try:
                lock = FileLock(str(root / f"{key}.lock"), timeout=lock_timeout)
                lock.acquire()
            except Timeout:
                raise CacheError(f"cache entry {key} is being written by another process; try again shortly") from None
            held.callback(lock.release)
            return _plan_entry(entry, shape, windows, layers, root)

        todo = agree(plan, dist)
        if todo["missing"] is None:
            return ActivationCache(entry, todo["meta"], hit=True, seconds=time.perf_counter() - start)
        missing, present, meta = todo["missing"], todo["present"], todo["meta"]
        try:
            if missing:
                _compute_layers(teacher, windows, missing, entry, shape, batch_size, progress, callback, dist)
            dist.barrier()

            def finish() -> dict:  # rank 0, once every rank's part is written
                _assemble(entry, missing, dist.world)
                now = datetime.now(timezone.utc).isoformat(timespec="seconds")
                new_meta = {
                    "format_version": FORMAT_VERSION,
                    "model": teacher.model_id,
                    "weights_hash": teacher.weights_hash,
                    "corpus": corpus.id,
                    "corpus_hash": corpus.content_hash,
                    "split": split,
                    "split_rule": corpus.split_rule,
                    "seq_len": seq_len,
                    "windows": n_windows,
                    "d_model": teacher.d_model,
                    "n_layers": teacher.n_layers,
                    "dtype": "float16",
                    "layers": sorted(set(present) | set(missing)),
                    "created": (meta or {}).get("created", now),
                    "updated": now,
                }
                write_json(entry / "meta.json", new_meta, indent=1)
                return new_meta

            new_meta = agree(finish, dist)
        except BaseException:
            if dist.main:  # what this attempt left behind is never read as whole
                for p in [*entry.glob("*.partial"), *entry.glob(".part-*")]:
                    p.unlink(missing_ok=True)
            raise
        return ActivationCache(entry, new_meta, hit=False, seconds=time.perf_counter() - start,
                               computed_layers=tuple(missing))


def _plan_entry(entry: Path, shape: tuple[int, int, int], windows: np.ndarray, layers: list[int], root: Path) -> dict:
    """Under the lock: clean what a killed writer left, find the valid layers, and either report a hit
    (``missing`` None, with the meta) or write the tokens and create the empty ``.partial`` layer files."""
    meta = _read_meta(entry)
    if meta is not None and (meta["windows"], meta["seq_len"], meta["d_model"]) != shape:
        meta = None  # a meta.json that describes other arrays (edited, or from another version)
    if meta is None and entry.exists():
        shutil.rmtree(entry)  # damaged: nothing in it can be trusted
    created = not entry.exists()
    entry.mkdir(parents=True, exist_ok=True)
    for stale in [*entry.glob("*.partial"), *entry.glob(".part-*"), *entry.glob(".*.tmp")]:
        stale.unlink()  # left by a killed writer (we hold the lock)
    present = [i for i in (meta or {}).get("layers", []) if _valid_array(_layer_file(entry, i), shape, "float16")]
    tokens_ok = _valid_array(entry / "tokens.npy", shape[:2], "int32") and np.array_equal(
        np.load(entry / "tokens.npy", mmap_mode="r"), windows
    )
    if not tokens_ok:
        present = []  # layers computed from other (or unreadable) tokens cannot be trusted
    missing = [i for i in layers if i not in present]
    if tokens_ok and not missing and meta is not None and sorted(present) == sorted(meta["layers"]):
        return {"missing": None, "present": present, "meta": meta}

    need = len(missing) * int(np.prod(shape)) * 2 + (0 if tokens_ok else windows.nbytes)
    free = shutil.disk_usage(root).free
    if need + DISK_MARGIN_BYTES > free:
        if created:
            shutil.rmtree(entry, ignore_errors=True)
        raise CacheError(
            f"caching needs {need / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free on {root}: "
            f"free space, or use fewer windows / layers"
        )
    if not tokens_ok:
        save_npy(entry / "tokens.npy", windows)
    for i in missing:  # empty files of the final size, filled in place by the ranks
        arr = np.lib.format.open_memmap(_partial_file(entry, i), mode="w+", dtype=np.float16, shape=shape)
        arr.flush()
        del arr
    return {"missing": missing, "present": present, "meta": meta}


def _partial_file(entry: Path, i: int) -> Path:
    return entry / f"layer_{i:02d}.npy.partial"


def _part_marker(entry: Path, rank: int, world: int) -> Path:
    return entry / f".part-{rank}-of-{world}.json"


def _compute_layers(teacher, windows: np.ndarray, missing: list[int], entry: Path, shape: tuple[int, int, int],
                    batch_size: int, progress: bool, callback: Callable[[int, int], None] | None,
                    dist: Dist) -> None:
    """Fill this rank's share of the batches into the ``.partial`` files, then leave its part marker."""
    from tqdm import tqdm

    n = shape[0]
    batches = shard_of(-(-n // batch_size), dist)
    first, last = batches.start * batch_size, min(batches.stop * batch_size, n)
    arrays = {i: np.lib.format.open_memmap(_partial_file(entry, i), mode="r+") for i in missing}
    where = f" (rank {dist.rank} of {dist.world}: windows {first}..{last - 1})" if dist.active else ""
    bar = tqdm(total=last - first, desc=f"caching {len(missing)} layers{where}", unit="win", file=sys.stderr,
               disable=not (progress and dist.main))
    for b in batches:
        s = b * batch_size
        ids = torch.from_numpy(windows[s : s + batch_size].astype(np.int64))
        hs = teacher.hidden_states(ids, missing)
        for i in missing:
            half = hs[i].cpu().numpy().astype(np.float16)
            if not np.isfinite(half).all():
                raise CacheError(f"hidden states of layer {i} overflow float16 (|h| > 65504); "
                                 f"this model cannot be cached in float16")
            arrays[i][s : s + len(ids)] = half
        bar.update(len(ids))
        if callback is not None:
            callback(min(s + batch_size, last) - first, last - first)
    bar.close()
    for i, arr in arrays.items():
        arr.flush()
        del arr
        with open(_partial_file(entry, i), "rb") as f:
            os.fsync(f.fileno())
    arrays.clear()
    write_json(_part_marker(entry, dist.rank, dist.world), {"rank": dist.rank, "world": dist.world,
                                                            "windows": [first, last], "layers": missing})


def _assemble(entry: Path, missing: list[int], world: int) -> None:
    """Rank 0, after every rank is done: check that each part is there, then rename the layers into place."""
    absent = [r for r in range(world) if not _part_marker(entry, r, world).is_file()]
    if absent:
        raise CacheError(f"the parts of ranks {absent} of cache entry {entry.name} are not in {entry}: every rank "
                         f"must write to the same cache folder (set LFT_CACHE_DIR to a folder all nodes share)")
    for i in missing:
        os.replace(_partial_file(entry, i), _layer_file(entry, i))
    for r in range(world):
        _part_marker(entry, r, world).unlink()
