"""The demo, in one command: everything the pages need for a ready-made story, built once.

``prepare_demo`` runs seven steps (with the default two methods):

1. cache every layer h_0 … h_L of ``windows`` × ``seq_len`` training tokens, and of the held-out windows the
   affine grid is scored on (the entries the Span page and the analysis pages read);
2. the recoupling grid of every span from that cache (``coupling.recoupling_grid_cached``: persisted, so the
   Span page reads it instead of recomputing);
3. the affine grid of every span (``baselines.affine_grid_from_caches``, persisted likewise);
4-7. then, among the spans of ``blocks`` blocks, the one with the lowest recoupling ratio R and the one with
   the highest (see ``choose_spans``), and a flow trained with the default recipe for each method on each of
   the two spans: ``demo-sfm-M-N``, ``demo-fw-M-N`` (a ``-<tag>`` suffix names flows of other settings).

The manifest ``cache/demo/manifest.json`` (written atomically, only by the process that holds the demo's lock)
records the settings, the cache entries, the grids, the chosen spans with why, the flows, and every step's state
and seconds. ``demo_status`` reads it and checks the artefacts themselves (cache entry complete, grid file
there and of this build of the entry, flow complete and of these settings), so deleting any of them makes the
demo not ready again; it loads no model and hashes nothing, so every page can call it.

Idempotent: a run whose steps are all done returns at once without loading the model. Resumable: caches and
grids are written atomically (a killed step just runs again), a killed or stopped trainer leaves a checkpoint
that the next run resumes (``train_flow(..., resume=True)``). One preparation at a time across processes (a file
lock, ``cache/demo/prepare.lock``): a second ``prepare_demo`` is refused with one LFTError line naming the job
or process that holds it. Saved data is never overwritten: a flow of the demo's name trained with other settings
is refused, not replaced.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lft_core.atomic import DamagedRecord, read_record, write_json
from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.errors import LFTError
from lft_core.paths import cache_dir
from lft_core.span import Span

if TYPE_CHECKING:
    from lft_core.data.activations import ActivationCache
    from lft_core.model.teacher import Teacher

DEFAULT_MODEL = "smollm2-135m"  # = loading.DEFAULT_MODEL (not imported: loading imports torch, status must not)
MANIFEST_VERSION = 1
MAX_PAIRS = 4096  # as the CLI's recoupling --pairs: the cost matrix is pairs² float64
LOCK_WAIT_S = 2.0
"""How long ``prepare_demo`` waits for the demo's lock before refusing (``demo_status`` probes the lock for a
moment, which must not make a starting preparation fail)."""
PROGRESS_EVERY_S = 0.5
"""Fewest seconds between two progress events of a cache or grid step (start and end events, and one event per
training step, always go out)."""
FIRST_BLOCK = 1
"""Candidate spans start at block 1 or later: at m = 0 (the embeddings) every token with the same id has the same
x0, so R is near 1 whatever the blocks do (docs/RESULTS.md section 4)."""

Progress = Callable[[dict], None]


# ---------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class DemoSettings:
    """What the demo builds. The defaults are the app's (app/common.py DEFAULTS, the Span page's 256 token pairs
    with seed 0 and position 0 excluded, its 4 held-out windows for the affine grid) and the default training
    recipe (``train`` empty); ``train`` holds TrainConfig overrides (tests and small machines). Training uses
    ``seq_len`` too unless ``train`` sets its own."""

    model: str = DEFAULT_MODEL
    corpus: str = DEFAULT_CORPUS
    seq_len: int = 128
    windows: int = 16
    pairs: int = 256
    blocks: int = 6
    methods: tuple[str, ...] = ("sfm", "fw")
    affine_heldout_windows: int = 4
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.train = dict(self.train or {})

    def to_json(self) -> dict:
        return {**asdict(self), "methods": list(self.methods), "train": dict(sorted(self.train.items()))}

    @classmethod
    def from_json(cls, data: Any) -> DemoSettings:
        """Settings from a manifest; LFTError if they are not settings."""
        if not isinstance(data, dict):
            raise LFTError("the demo manifest's settings are not an object")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise LFTError(f"the demo manifest's settings are damaged ({e})") from None

    @property
    def total(self) -> int:
        """Number of steps: cache, two grids, and a flow per method on each of the two spans."""
        return 3 + 2 * len(self.methods)

    def validate(self) -> None:
        """LFTError naming the first impossible setting (before any work)."""
        for name in ("model", "corpus"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise LFTError(f"the demo's {name} must be a non-empty string")
        for name, least in (("seq_len", 2), ("windows", 1), ("pairs", 2), ("blocks", 1),
                            ("affine_heldout_windows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise LFTError(f"the demo's {name.replace('_', ' ')} must be an integer of at least {least}, "
                               f"got {value!r}")
        if self.pairs > MAX_PAIRS:
            raise LFTError(f"at most {MAX_PAIRS} token pairs per span, got {self.pairs}")
        available = self.windows * (self.seq_len - 1)
        if self.pairs > available:
            raise LFTError(f"{self.pairs} token pairs per span, but {self.windows} windows x {self.seq_len - 1} "
                           f"positions (position 0 excluded) hold only {available}: use fewer pairs or more windows")
        from lft_core.flow.methods import METHODS

        if not self.methods or len(set(self.methods)) != len(self.methods) or \
                any(m not in METHODS for m in self.methods):
            raise LFTError(f"the demo's methods must be distinct names from {', '.join(METHODS)}, "
                           f"got {list(self.methods)}")
        from dataclasses import fields

        from lft_core.flow.config import TrainConfig

        allowed = {f.name for f in fields(TrainConfig)} - {"model", "corpus", "span", "method", "name", "sweep"}
        unknown = sorted(set(self.train) - allowed)
        if unknown:
            raise LFTError(f"unknown training setting(s) for the demo: {', '.join(unknown)}")
        try:
            cfg = TrainConfig(**{**self.train_kwargs(), "span": (1, 1 + self.blocks), "method": self.methods[0]})
        except (TypeError, ValueError) as e:
            raise LFTError(f"the demo's training settings: {e}") from None
        try:
            cfg.validate()  # LFTError naming a bad value (a batch larger than the windows, ...)
        except TypeError:
            raise LFTError(f"the demo's training settings have a value of the wrong type: {self.train}") from None

    def normalised(self) -> DemoSettings:
        """The same settings with training overrides equal to the default recipe dropped, so ``--steps 400``
        and no flag are one demo (imports the training module)."""
        from dataclasses import fields

        from lft_core.flow.config import TrainConfig

        defaults = {f.name: f.default for f in fields(TrainConfig)}
        train = {k: v for k, v in self.train.items() if not (k in defaults and defaults[k] == v and
                                                             type(defaults[k]) is type(v))}
        if train.get("seq_len") == self.seq_len:
            train.pop("seq_len")
        return DemoSettings(**{**asdict(self), "methods": tuple(self.methods), "train": train})

    def flow_tag(self) -> str:
        """'' for the default demo (default model, corpus, 128-token windows and recipe); else 6 hex digits of a
        hash of what the flows depend on, so flows of other settings never take the default demo's names."""
        recipe = {"model": self.model, "corpus": self.corpus, "seq_len": self.seq_len, **self.train}
        if recipe == {"model": DEFAULT_MODEL, "corpus": DEFAULT_CORPUS, "seq_len": 128}:
            return ""
        return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:6]

    def flow_name(self, method: str, span: Span | tuple[int, int]) -> str:
        m, n = span
        tag = self.flow_tag()
        return f"demo-{method}-{m}-{n}" + (f"-{tag}" if tag else "")

    def train_kwargs(self) -> dict:
        """TrainConfig keyword arguments common to every demo flow (span, method and name come per flow)."""
        return {"model": self.model, "corpus": self.corpus, "seq_len": self.seq_len, **self.train}


def flow_plan(settings: DemoSettings) -> list[tuple[str, str]]:
    """The flow steps in order: (which span, method), the low-R span's flows first."""
    return [(which, method) for which in ("low", "high") for method in settings.methods]


def step_labels(settings: DemoSettings, spans: dict | None = None) -> list[str]:
    """One line per step (with the chosen spans once they are known)."""
    labels = [f"Cache all layers: {settings.windows} windows x {settings.seq_len} tokens "
              f"(+ {settings.affine_heldout_windows} held-out)",
              f"Recoupling grid: {settings.pairs} token pairs per span",
              "Affine grid: held-out NMSE of every span"]
    for which, method in flow_plan(settings):
        where = f"span {Span.of(spans[which]['span'])}, {which} R" if spans and which in spans \
            else f"the {which}-R span of {settings.blocks} blocks"
        labels.append(f"Train {method.upper()} on {where}")
    return labels


# ---------------------------------------------------------------------------------------------------------
# Files


def demo_dir() -> Path:
    return cache_dir("demo")


def manifest_path() -> Path:
    return demo_dir() / "manifest.json"


def _lock_path() -> Path:
    return demo_dir() / "prepare.lock"


def _owner_path() -> Path:
    return demo_dir() / "owner.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest() -> dict | None:
    """The manifest as saved, or None when there is none or it is damaged (then the demo counts as not
    prepared, and the next preparation checks every artefact and writes a new one)."""
    try:
        data = read_record(manifest_path(), {"version": int, "settings": dict, "steps": list})
    except DamagedRecord:
        return None
    shapes = (("cache", dict), ("grids", dict), ("spans", dict), ("flows", list))
    if data["version"] != MANIFEST_VERSION or not all(isinstance(s, dict) for s in data["steps"]) or \
            any(data.get(k) is not None and not isinstance(data[k], kind) for k, kind in shapes):
        return None
    spans = data.get("spans") or {}
    if not all(isinstance(spans.get(w, {}), dict) for w in ("low", "high")) or \
            not all(isinstance(f, dict) for f in data.get("flows") or []):
        return None
    return data


def _new_manifest(settings: DemoSettings) -> dict:
    return {"version": MANIFEST_VERSION, "settings": settings.to_json(), "created": _now(), "updated": _now(),
            "ready": False, "model_id": None, "weights_hash": None, "n_layers": None, "cache": {}, "grids": {},
            "spans": None, "flows": [], "job": None, "pid": None,
            "steps": [{"step": i, "label": label, "state": "pending", "seconds": None}
                      for i, label in enumerate(step_labels(settings), 1)]}


def _prepare_lock():
    from filelock import FileLock

    return FileLock(str(_lock_path()), timeout=LOCK_WAIT_S)


def _preparing() -> bool:
    """True while some process holds the demo's lock (a preparation is running)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(_lock_path()), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False


def _owner() -> dict:
    try:
        return read_record(_owner_path())
    except DamagedRecord:
        return {}


def _owner_text(owner: dict) -> str:
    job, pid = owner.get("job"), owner.get("pid")
    if isinstance(job, str) and job:
        return f"job {job}"
    return f"process {pid}" if isinstance(pid, int) else "another process"


# ---------------------------------------------------------------------------------------------------------
# What is done: checks of the artefacts themselves, reading small files only (no model, no hashing)


def _entry_complete(key: Any) -> dict | None:
    """The meta.json of activation cache entry ``key`` when it lists every layer 0..L and every layer file has
    its full size; else None. (A light check: ``activations.open_activations`` is the thorough one.)"""
    if not isinstance(key, str) or not key or "/" in key or key.startswith("."):
        return None
    entry = cache_dir("activations") / key
    try:
        meta = read_record(entry / "meta.json", {"windows": int, "seq_len": int, "d_model": int, "n_layers": int,
                                                  "layers": list})
    except DamagedRecord:
        return None
    if sorted(meta["layers"]) != list(range(meta["n_layers"] + 1)):
        return None
    size = meta["windows"] * meta["seq_len"] * meta["d_model"] * 2  # float16, plus the .npy header
    try:
        if (entry / "tokens.npy").stat().st_size < meta["windows"] * meta["seq_len"] * 4:
            return None
        for i in meta["layers"]:
            if (entry / f"layer_{i:02d}.npy").stat().st_size < size:
                return None
    except OSError:
        return None
    return meta


def _grid_file_ok(path: Path, expect: dict) -> bool:
    """True when the persisted grid ``path`` exists and says it was computed with ``expect`` (the entries'
    ``created`` stamps, pairs, ...), as ``coupling.read_recoupling_grid`` / ``baselines.read_affine_grid`` check."""
    try:
        data = read_record(path, {"version": int, "matrix": list})
    except DamagedRecord:
        return False
    return data["version"] == 1 and all(data.get(k) == v for k, v in expect.items())


def _grid_paths(manifest: dict, settings: DemoSettings) -> tuple[Path | None, Path | None]:
    """(recoupling grid file, affine grid file) of the manifest's cache entries (None before step 1 ran)."""
    cache = manifest.get("cache") or {}
    train, held = cache.get("train"), cache.get("heldout")
    if not (isinstance(train, str) and isinstance(held, str)):
        return None, None
    grids = cache_dir("grids")
    return (grids / f"recoupling-{train}-p{settings.pairs}-s0-drop.json", grids / f"affine-{train}-{held}.json")


def _flow_done(entry: dict) -> str:
    """State of a demo flow from its files: 'done' (complete, of the expected settings), 'running' (a process
    trains it now) or 'pending'."""
    name = entry.get("name")
    if not isinstance(name, str) or "/" in name or name.startswith("."):
        return "pending"
    folder = cache_dir("flows") / name
    try:
        config = read_record(folder / "config.json")
    except DamagedRecord:
        return "pending"
    if not (folder / "model.safetensors").is_file():
        return "pending"
    if config.get("status") == "running":
        from lft_core.flow.store import being_trained

        return "running" if being_trained(name) else "pending"
    expected = entry.get("config") or {}
    if config.get("status") != "complete" or any(config.get(k) != v for k, v in expected.items()):
        return "pending"
    return "done"


def _artefact_states(manifest: dict | None, settings: DemoSettings) -> list[str]:
    """'done' / 'running' / 'pending' per step, from the artefacts the manifest names."""
    states = ["pending"] * settings.total
    if manifest is None:
        return states
    cache = manifest.get("cache") or {}
    train, held = _entry_complete(cache.get("train")), _entry_complete(cache.get("heldout"))
    if train is not None and held is not None:
        states[0] = "done"
        rec, aff = _grid_paths(manifest, settings)
        if rec is not None and _grid_file_ok(rec, {"entry_created": str(train.get("created")),
                                                    "pairs": settings.pairs, "seed": 0, "drop_first": True}):
            states[1] = "done"
        if aff is not None and _grid_file_ok(aff, {"train_created": str(train.get("created")),
                                                    "heldout_created": str(held.get("created"))}):
            states[2] = "done"
    flows = manifest.get("flows") or []
    if isinstance(flows, list) and len(flows) == settings.total - 3:
        for i, entry in enumerate(flows):
            states[3 + i] = _flow_done(entry) if isinstance(entry, dict) else "pending"
    return states


# ---------------------------------------------------------------------------------------------------------
# Status


@dataclass
class DemoStatus:
    """Where the demo stands, from its manifest and its artefacts (``demo_status``).

    steps: (label, state) per step, state one of done / running / pending / failed. spans: (low-R span, high-R
    span) once chosen, else (); span_info: per span which ('low'/'high'), span, R and the affine NMSE; flows: the
    demo flows' names, flow_info: name, method, which and span of each. running: a preparation holds the demo's
    lock now (job: its job id, if it runs as a job). line: 'demo ready' / 'preparing: 3 of 7 steps' / ...
    model, corpus, seq_len, windows, pairs: the settings the demo was (or is being) prepared with, so a page
    can tell whether its own choices match. cache: the all-layer entries' keys ('train', 'heldout')."""

    ready: bool
    done: int
    total: int
    steps: list[tuple[str, str]]
    spans: tuple[Span, ...]
    flows: list[str]
    running: bool
    line: str
    settings: DemoSettings
    job: str | None = None
    span_info: list[dict] = field(default_factory=list)
    flow_info: list[dict] = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def model(self) -> str:
        return self.settings.model

    @property
    def corpus(self) -> str:
        return self.settings.corpus

    @property
    def seq_len(self) -> int:
        return self.settings.seq_len

    @property
    def windows(self) -> int:
        return self.settings.windows

    @property
    def pairs(self) -> int:
        return self.settings.pairs

    def to_json(self) -> dict:
        return {"ready": self.ready, "done": self.done, "total": self.total, "line": self.line,
                "running": self.running, "job": self.job,
                "steps": [{"step": i, "label": label, "state": state}
                          for i, (label, state) in enumerate(self.steps, 1)],
                "spans": [list(s) for s in self.spans], "span_info": self.span_info, "flows": self.flows,
                "flow_info": self.flow_info, "cache": self.cache, "error": self.error,
                "settings": self.settings.to_json()}


def demo_status(settings: DemoSettings | None = None) -> DemoStatus:
    """The demo's state, cheaply (small files only: no model, no hashing; meant for every page render).

    ``settings`` None: the demo the manifest describes (the last one prepared or being prepared), or the default
    demo when there is no manifest. Given settings that differ from the manifest's: that demo is not prepared.
    A step is 'done' only when its artefacts are there and whole (deleting a demo flow makes it pending)."""
    manifest = read_manifest()
    other = False  # the manifest describes another demo than the one asked about
    if settings is None:
        try:
            settings = DemoSettings.from_json(manifest["settings"]) if manifest else DemoSettings()
        except LFTError:
            manifest, settings = None, DemoSettings()
    else:
        settings = settings.normalised()
        if manifest is not None and manifest["settings"] != settings.to_json():
            manifest, other = None, True
    states = _artefact_states(manifest, settings)
    running = _preparing()
    recorded = {s.get("step"): s for s in (manifest or {}).get("steps", [])}
    error = None
    for i in range(settings.total):
        saved = recorded.get(i + 1, {})
        if states[i] == "done":
            continue
        if running and saved.get("state") == "running":
            states[i] = "running"
        elif saved.get("state") == "failed" and not running:
            states[i] = "failed"
            error = error or f"step {i + 1}: {saved.get('error') or 'failed'}"
    spans_json = (manifest or {}).get("spans") or {}
    span_info, spans = [], ()
    if {"low", "high"} <= set(spans_json):
        try:
            spans = (Span.of(spans_json["low"]["span"]), Span.of(spans_json["high"]["span"]))
            span_info = [{"which": w, **{k: v for k, v in spans_json[w].items() if k != "span"},
                          "span": list(spans[i])} for i, w in enumerate(("low", "high"))]
        except (LFTError, KeyError, TypeError, AttributeError):
            spans, span_info = (), []
    labels = step_labels(settings, spans_json if spans else None)
    done = states.count("done")
    ready = done == settings.total
    job = None
    if running:
        owner = _owner()
        job = owner.get("job") if isinstance(owner.get("job"), str) else None
    if ready:
        line = "demo ready"
    elif running and other:
        line = "not prepared (another demo is being prepared)"
    elif running:
        line = f"preparing: {done} of {settings.total} steps"
    elif error:
        line = f"not ready: {done} of {settings.total} steps done; {error}"
    elif done:
        line = f"not ready: {done} of {settings.total} steps done"
    else:
        line = "not prepared"
    flow_info = [{k: f.get(k) for k in ("name", "method", "which", "span")}
                 for f in (manifest or {}).get("flows", []) if isinstance(f, dict)]
    cache = {k: v for k, v in ((manifest or {}).get("cache") or {}).items() if isinstance(v, str)}
    return DemoStatus(ready=ready, done=done, total=settings.total, steps=list(zip(labels, states)), spans=spans,
                      flows=[f["name"] for f in flow_info if isinstance(f.get("name"), str)], running=running,
                      line=line, settings=settings, job=job, span_info=span_info, flow_info=flow_info, cache=cache,
                      error=error)


# ---------------------------------------------------------------------------------------------------------
# Choosing the spans


def choose_spans(matrix, blocks: int) -> dict:
    """The low-R and the high-R span among the spans [m, m + blocks) with m >= 1 and a finite R in ``matrix``
    (shape (L+1, L+1), the recoupling grid): lowest R (ties: the earliest span) and highest R among the others
    (ties: the latest span). LFTError when fewer than two spans qualify. Returns {"low": {"span", "R"}, "high":
    {...}, "rule": why}."""
    import numpy as np

    L = matrix.shape[0] - 1
    candidates = [(float(matrix[m, m + blocks]), m) for m in range(FIRST_BLOCK, L - blocks + 1)
                  if np.isfinite(matrix[m, m + blocks])]
    if len(candidates) < 2:
        raise LFTError(f"spans of {blocks} blocks starting at block {FIRST_BLOCK} or later leave fewer than two "
                       f"spans to choose from in a model of {L} blocks: use fewer blocks")
    low = min(candidates, key=lambda c: (c[0], c[1]))
    high = max((c for c in candidates if c != low), key=lambda c: (c[0], c[1]))
    rule = (f"among the {len(candidates)} spans of {blocks} blocks that start at block {FIRST_BLOCK} or later (at "
            f"m = 0 every token with the same id starts from the same embedding, so R is near 1 whatever the blocks "
            f"do), the lowest recoupling ratio ({Span(low[1], low[1] + blocks)}, R {low[0]:.3f}: straight paths "
            f"agree with the teacher's pairing) and the highest ({Span(high[1], high[1] + blocks)}, R {high[0]:.3f}: "
            f"optimal transport re-pairs the most tokens, so plain flow matching averages over crossing paths); ties "
            f"go to the earliest span for low R and the latest for high R")
    return {"low": {"span": [low[1], low[1] + blocks], "R": low[0]},
            "high": {"span": [high[1], high[1] + blocks], "R": high[0]}, "rule": rule}


# ---------------------------------------------------------------------------------------------------------
# Preparing


@dataclass
class DemoResult:
    """What ``prepare_demo`` did. steps: per step its number, label, state (done / pending / failed), seconds
    (of the run that did it; None if unknown) and ``already`` (it was done before this run). stopped: a stop
    request ended the run early (run it again to go on)."""

    ready: bool
    stopped: bool
    steps: list[dict]
    spans: dict | None
    flows: list[str]
    seconds: float
    manifest: str

    @property
    def did_nothing(self) -> bool:
        return all(s.get("already") for s in self.steps)

    def to_json(self) -> dict:
        return {"ready": self.ready, "stopped": self.stopped, "did_nothing": self.did_nothing, "steps": self.steps,
                "spans": self.spans, "flows": self.flows, "seconds": round(self.seconds, 3),
                "manifest": self.manifest}

    def summary(self) -> str:
        done = sum(s["state"] == "done" for s in self.steps)
        if not self.ready:
            head = (f"demo stopped after {done} of {len(self.steps)} steps; run it again to go on" if self.stopped
                    else f"demo not ready: {done} of {len(self.steps)} steps done")
            return head
        low, high = self.spans["low"], self.spans["high"]
        text = (f"demo ready: spans {Span.of(low['span'])} (R {low['R']:.2f}) and {Span.of(high['span'])} "
                f"(R {high['R']:.2f}); flows {', '.join(self.flows)}")
        return text + (" (every step was done already)" if self.did_nothing else f" ({self.seconds:.1f} s)")


def prepare_demo(settings: DemoSettings | None = None, teacher: Teacher | None = None,
                 progress: Progress | None = None, should_stop: Callable[[], bool] | None = None, *,
                 verbose: bool = False, job: str | None = None) -> DemoResult:
    """Build the demo (see the module docstring); returns what was done.

    ``teacher``: the model, if already loaded (else loaded when some step has work to do). ``progress(event)``
    gets one dict per event: step, steps, label, state ('start', 'progress', 'done', 'skipped', 'stopped',
    'failed', 'complete'), done / total / unit inside a step (windows, spans, flow steps), while training
    flow_step, flow_steps, flow_eta_s, loss, and eta_s, the whole run's remaining seconds (None while a
    remaining step has never been timed). ``should_stop()`` is checked between steps and before every training
    step. ``verbose``: tqdm bars of the inner work on stderr. ``job``: the job id to name to a second preparation.
    LFTError at once when another process prepares the demo."""
    from filelock import Timeout

    settings = (settings or DemoSettings()).normalised()
    settings.validate()
    lock = _prepare_lock()
    try:
        lock.acquire()
    except Timeout:
        raise LFTError(f"the demo is being prepared by another process ({_owner_text(_owner())}); follow it on the "
                       f"home page or wait for it to finish") from None
    try:
        write_json(_owner_path(), {"pid": os.getpid(), "job": job, "started": _now()})
        return _Run(settings, teacher, progress, should_stop, verbose, job).run()
    finally:
        try:
            _owner_path().unlink(missing_ok=True)
        finally:
            lock.release()


class _Stopped(Exception):
    pass


class _Run:
    """One preparation, holding the demo's lock."""

    def __init__(self, settings: DemoSettings, teacher, progress, should_stop, verbose: bool, job: str | None):
        self.s = settings
        self.teacher = teacher
        self.progress = progress
        self.should_stop = should_stop
        self.verbose = verbose
        self.job = job
        self.t0 = time.perf_counter()
        self.already: set[int] = set()
        self.todo: set[int] = set()  # steps whose artefacts were not there when this run began
        self.started = False  # a step has begun (from then on the manifest records what happens)
        self.timed: dict[int, float] = {}  # seconds of steps done by this run
        self.step_start = 0.0
        self.last_emit = 0.0
        self.entries: dict[str, ActivationCache] = {}
        self.grid = None

    # -- manifest ----------------------------------------------------------------------------------------
    def save(self) -> None:
        self.m["updated"] = _now()
        self.m["steps"] = [{**s, "label": label} for s, label in zip(self.m["steps"], self.labels())]
        write_json(manifest_path(), self.m, indent=1)

    def labels(self) -> list[str]:
        return step_labels(self.s, self.m.get("spans"))

    def step_record(self, i: int) -> dict:
        return self.m["steps"][i - 1]

    def set_state(self, i: int, state: str, **extra: Any) -> None:
        record = self.step_record(i)
        record.update(state=state, **extra)
        if state != "failed":
            record.pop("error", None)
        self.save()

    # -- progress ----------------------------------------------------------------------------------------
    def estimate(self, j: int, current: int | None, current_total: float | None) -> float | None:
        """Seconds step ``j`` (not started) will take: as in a previous run of this demo, else as a flow of the
        same method in this run (same number of blocks, same recipe), else unknown."""
        prior = self.step_record(j).get("seconds")
        if isinstance(prior, (int, float)) and not isinstance(prior, bool):
            return float(prior)
        if j > 3:
            method = flow_plan(self.s)[j - 4][1]
            for i, secs in self.timed.items():
                if i > 3 and flow_plan(self.s)[i - 4][1] == method:
                    return secs
            if current is not None and current > 3 and flow_plan(self.s)[current - 4][1] == method:
                return current_total
        return None

    def overall_eta(self, current: int, remaining: float | None) -> float | None:
        if remaining is None:
            return None
        elapsed = time.perf_counter() - self.step_start
        total = 0.0
        for j in range(current + 1, self.s.total + 1):
            if j not in self.todo or j in self.timed:
                continue
            est = self.estimate(j, current, elapsed + remaining)
            if est is None:
                return None
            total += est
        return round(remaining + total, 1)

    def emit(self, step: int, state: str, force: bool = True, remaining: float | None = None, **fields: Any) -> None:
        if self.progress is None:
            return
        now = time.perf_counter()
        if not force and now - self.last_emit < PROGRESS_EVERY_S:
            return
        self.last_emit = now
        event = {"step": step, "steps": self.s.total, "label": self.labels()[step - 1], "state": state, **fields,
                 "eta_s": self.overall_eta(step, remaining) if state in ("start", "progress") else
                 (0.0 if state == "complete" else None),
                 "elapsed_s": round(now - self.t0, 2)}
        self.progress(event)

    def counter(self, step: int, unit: str) -> Callable[[int, int], None]:
        """A ``callback(done, total)`` for the inner work of a step, sending throttled progress events."""
        def callback(done: int, total: int) -> None:
            elapsed = time.perf_counter() - self.step_start
            remaining = elapsed / done * (total - done) if done > 0 else None
            self.emit(step, "progress", force=done >= total, remaining=remaining, done=done, total=total, unit=unit)
        return callback

    def prior_remaining(self, step: int) -> float | None:
        prior = self.step_record(step).get("seconds")
        return float(prior) if isinstance(prior, (int, float)) and not isinstance(prior, bool) else None

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise _Stopped

    # -- the run -----------------------------------------------------------------------------------------
    def run(self) -> DemoResult:
        manifest = read_manifest()
        if manifest is None or manifest["settings"] != self.s.to_json() or \
                len(manifest["steps"]) != self.s.total:
            manifest = _new_manifest(self.s)
        self.m = manifest
        states = _artefact_states(self.m, self.s)
        if all(state == "done" for state in states):  # nothing to do: no model, no write
            self.already = set(range(1, self.s.total + 1))
            for i in range(1, self.s.total + 1):
                self.emit(i, "skipped")
            self.emit(self.s.total, "complete")
            return self.result(stopped=False)
        self.m.update(job=self.job, pid=os.getpid(), ready=False)
        self.todo = {i for i, state in enumerate(states, 1) if state != "done"}
        step = min(self.todo)
        try:
            self.check_stop()
            self.open_teacher(states)
            for step in range(1, self.s.total + 1):
                self.check_stop()
                self.do_step(step)
        except _Stopped:
            if self.started:
                if self.step_record(step).get("state") == "running":
                    self.set_state(step, "pending")
                self.save()
            self.emit(step, "stopped")
            return self.result(stopped=True)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                if self.started:
                    self.set_state(step, "pending")
                raise
            message = (str(e) if isinstance(e, LFTError) else f"{type(e).__name__}: {e}").strip()
            message = message.splitlines()[0][:300] if message else type(e).__name__
            if self.started:  # before a step began (the model did not load, ...) the manifest is left as it was
                self.set_state(step, "failed", error=message)
            self.emit(step, "failed", error=message)
            raise
        self.m.update(ready=True, finished=_now())
        self.save()
        self.emit(self.s.total, "complete")
        return self.result(stopped=False)

    def result(self, stopped: bool) -> DemoResult:
        states = _artefact_states(self.m, self.s)
        steps = []
        for i, (label, state) in enumerate(zip(self.labels(), states), 1):
            record = self.step_record(i)
            if state != "done":
                state = "failed" if record.get("state") == "failed" else "pending"
            secs = record.get("seconds")
            steps.append({"step": i, "label": label, "state": state, "seconds": secs, "already": i in self.already,
                          **({"error": record["error"]} if record.get("error") else {})})
        return DemoResult(ready=all(s["state"] == "done" for s in steps), stopped=stopped, steps=steps,
                          spans=self.m.get("spans"), flows=[f["name"] for f in self.m.get("flows") or []],
                          seconds=time.perf_counter() - self.t0, manifest=str(manifest_path()))

    def open_teacher(self, states: list[str]) -> None:
        """Load the model (unless given) and check that the manifest's cache entries are this model's and
        corpus's (else the demo starts over: another model under the same spec)."""
        from lft_core.data.activations import cache_key
        from lft_core.data.corpus import load_corpus

        first = states.index("pending") + 1 if "pending" in states else 1
        if self.teacher is None:
            from lft_core.model.loading import load_teacher

            self.emit(first, "start", detail="loading the model")
            self.teacher = load_teacher(self.s.model)
        t = self.teacher
        self.corpus = load_corpus(self.s.corpus)
        keys = {split: cache_key(t.model_id, t.weights_hash, self.corpus.id, self.corpus.content_hash, self.s.seq_len,
                                 n, split)
                for split, n in (("train", self.s.windows), ("heldout", self.s.affine_heldout_windows))}
        if self.m.get("cache") and self.m["cache"] != keys:
            self.m = _new_manifest(self.s)
            self.m.update(job=self.job, pid=os.getpid())
        self.m.update(cache=keys, model_id=t.model_id, weights_hash=t.weights_hash, n_layers=t.n_layers)
        if t.n_layers - self.s.blocks - FIRST_BLOCK + 1 < 2:
            raise LFTError(f"spans of {self.s.blocks} blocks leave fewer than two spans to choose from in "
                           f"{t.model_id} ({t.n_layers} blocks): use fewer blocks")

    def do_step(self, i: int) -> None:
        self.started = True
        states = _artefact_states(self.m, self.s)
        if states[i - 1] == "done":
            self.already.add(i)
            if i <= 3:  # a cache or grid step: its result is read back (cheap) for the next steps
                self.work(i, skip=True)
            if self.step_record(i).get("state") != "done":
                self.set_state(i, "done")
            self.emit(i, "skipped")
            return
        self.step_start = time.perf_counter()
        self.set_state(i, "running", started=_now())
        self.emit(i, "start", remaining=self.prior_remaining(i))
        finished = self.work(i, skip=False)
        if not finished:
            raise _Stopped
        seconds = round(time.perf_counter() - self.step_start, 3)
        self.timed[i] = seconds
        self.set_state(i, "done", seconds=seconds, finished=_now())
        self.emit(i, "done", seconds=seconds)

    def work(self, i: int, skip: bool) -> bool:
        """Do step ``i`` (or, ``skip``, only read back its result); False when a stop request ended it."""
        if i == 1:
            self.entries = self.caches(None if skip else self.counter(1, "windows"))
        elif i == 2:
            from lft_core.analysis.coupling import recoupling_grid_cached

            self.grid = recoupling_grid_cached(self.entry("train"), pairs=self.s.pairs, seed=0, drop_first=True,
                                               progress=None if skip else self.counter(2, "spans"))
            self.m.setdefault("grids", {})["recoupling"] = _grid_paths(self.m, self.s)[0].name
        elif i == 3:
            from lft_core.analysis.affine import affine_grid_from_caches

            affine = affine_grid_from_caches(self.entry("train"), self.entry("heldout"),
                                             callback=None if skip else self.counter(3, "spans"))
            self.m.setdefault("grids", {})["affine"] = _grid_paths(self.m, self.s)[1].name
            self.choose(affine.matrix)
        else:
            return self.train(i)
        return True

    def caches(self, callback) -> dict:
        from lft_core.data.activations import ensure_activations

        layers = range(self.teacher.n_layers + 1)
        out = {}
        for split, n in (("train", self.s.windows), ("heldout", self.s.affine_heldout_windows)):
            out[split] = ensure_activations(self.teacher, self.corpus, self.s.seq_len, n, layers, split,
                                            progress=self.verbose, callback=callback)
        return out

    def entry(self, split: str) -> ActivationCache:
        if split not in self.entries:
            from lft_core.data.activations import open_activations

            self.entries[split] = open_activations(self.m["cache"][split])
        return self.entries[split]

    def choose(self, affine_matrix) -> None:
        """Pick the two spans from the recoupling grid and plan their flows (after step 3)."""
        if self.grid is None:
            from lft_core.analysis.coupling import recoupling_grid_cached

            self.grid = recoupling_grid_cached(self.entry("train"), pairs=self.s.pairs, seed=0, drop_first=True)
        spans = choose_spans(self.grid.matrix, self.s.blocks)
        for which in ("low", "high"):
            m, n = spans[which]["span"]
            value = float(affine_matrix[m, n])
            spans[which]["affine_nmse"] = value if math.isfinite(value) else None
        flows = []
        for which, method in flow_plan(self.s):
            span = Span.of(spans[which]["span"])
            cfg = self.config(method, span)
            flows.append({"name": cfg.name, "method": method, "which": which, "span": list(span),
                          "config": self.expected(cfg)})
        if spans != self.m.get("spans") or flows != self.m.get("flows"):
            old = {f.get("name"): i for i, f in enumerate(self.m.get("flows") or []) if isinstance(f, dict)}
            for k, f in enumerate(flows):  # a flow step that names another flow has not been done
                if old.get(f["name"]) != k:
                    self.m["steps"][3 + k].update(state="pending", seconds=None)
            self.m.update(spans=spans, flows=flows)
            self.save()

    def config(self, method: str, span: Span):
        from lft_core.flow.config import TrainConfig

        return TrainConfig(**{**self.s.train_kwargs(), "span": span, "method": method,
                              "name": self.s.flow_name(method, span)})

    def expected(self, cfg) -> dict:
        """The settings a saved flow must show to be this demo's (what status checks, without the model)."""
        out = {k: v for k, v in asdict(cfg).items() if k not in ("name", "sweep", "model", "span")}
        return {**json.loads(json.dumps(out)), "model": self.teacher.model_id, "span": list(cfg.span),
                "name": cfg.name}

    def train(self, i: int) -> bool:
        from lft_core.flow.store import being_trained, flows_dir
        from lft_core.flow.training import train_flow

        entry = self.m["flows"][i - 4]
        cfg = self.config(entry["method"], Span.of(entry["span"]))
        name = cfg.name
        resume = False
        try:
            saved = read_record(flows_dir() / name / "config.json")
        except DamagedRecord:
            saved = None
            if (flows_dir() / name).exists():
                raise LFTError(f"flow {name!r} exists but its config is damaged: delete it (`python -m lft_core "
                               f"flows --delete {name}`) and run the demo again") from None
        if saved is not None:
            expected = entry["config"]
            differ = [k for k, v in expected.items() if k in saved and saved[k] != v and k != "name"]
            if differ:
                k = differ[0]
                raise LFTError(f"a flow named {name!r} exists with other settings ({k} = {saved[k]!r}, not "
                               f"{expected[k]!r}); the demo never overwrites it: delete it (`python -m lft_core flows "
                               f"--delete {name}`) and run the demo again")
            status = saved.get("status")
            if status == "running" and being_trained(name):
                raise LFTError(f"flow {name!r} is being trained by another job; wait for it, then run the demo again")
            if status == "failed":
                raise LFTError(f"flow {name!r} failed in an earlier run ({status}); delete it (`python -m lft_core "
                               f"flows --delete {name}`) and run the demo again")
            resume = True  # stopped, interrupted (killed), or complete but of fewer steps
        total = cfg.total_steps

        def on_event(event: dict) -> None:
            eta = event.get("eta_s")
            self.emit(i, "progress", remaining=eta if isinstance(eta, (int, float)) else None,
                      done=event.get("step"), total=total, unit="flow steps", flow=name,
                      flow_step=event.get("step"), flow_steps=event.get("steps"), flow_eta_s=eta,
                      loss=event.get("loss"), stage=event.get("stage"))

        result = train_flow(cfg, teacher=self.teacher, progress=on_event, should_stop=self.should_stop,
                            resume=resume, verbose=self.verbose)
        return not result.stopped
