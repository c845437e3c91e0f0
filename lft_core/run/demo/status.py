"""The demo's files (manifest, lock, owner) and where it stands (``demo_status``): small files only, no model,
no torch, no hashing, so every page can call it."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lft_core.atomic import DamagedRecord, read_record
from lft_core.errors import LFTError
from lft_core.paths import cache_dir
from lft_core.run.demo.settings import DemoSettings
from lft_core.run.demo.steps import Step, demo_steps, step_states
from lft_core.span import Span

MANIFEST_VERSION = 1
LOCK_WAIT_S = 2.0
"""How long ``prepare_demo`` waits for the demo's lock before refusing (``demo_status`` probes the lock for a
moment, which must not make a starting preparation fail)."""


# ---------------------------------------------------------------------------------------------------------
# Files


def demo_dir() -> Path:
    return cache_dir("demo")


def manifest_path() -> Path:
    return demo_dir() / "manifest.json"


def lock_path() -> Path:
    return demo_dir() / "prepare.lock"


def owner_path() -> Path:
    return demo_dir() / "owner.json"


def now() -> str:
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


def new_manifest(settings: DemoSettings, steps: list[Step]) -> dict:
    """A manifest of nothing done yet: one pending record per step of ``steps``."""
    return {"version": MANIFEST_VERSION, "settings": settings.to_json(), "created": now(), "updated": now(),
            "ready": False, "model_id": None, "weights_hash": None, "n_layers": None, "cache": {}, "grids": {},
            "spans": None, "flows": [], "job": None, "pid": None,
            "steps": [{"step": number, "label": step.label(settings), "state": "pending", "seconds": None}
                      for number, step in enumerate(steps, 1)]}


def prepare_lock():
    from filelock import FileLock

    return FileLock(str(lock_path()), timeout=LOCK_WAIT_S)


def preparing() -> bool:
    """True while some process holds the demo's lock (a preparation is running)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path()), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False


def read_owner() -> dict:
    try:
        return read_record(owner_path())
    except DamagedRecord:
        return {}


def owner_text(owner: dict) -> str:
    job, pid = owner.get("job"), owner.get("pid")
    if isinstance(job, str) and job:
        return f"job {job}"
    return f"process {pid}" if isinstance(pid, int) else "another process"


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
    steps = demo_steps(settings)
    states = step_states(steps, manifest, settings)
    running = preparing()
    recorded = {s.get("step"): s for s in (manifest or {}).get("steps", [])}
    error = None
    for number, step in enumerate(steps, 1):
        saved = recorded.get(number, {})
        if states[step] == "done":
            continue
        if running and saved.get("state") == "running":
            states[step] = "running"
        elif saved.get("state") == "failed" and not running:
            states[step] = "failed"
            error = error or f"step {number}: {saved.get('error') or 'failed'}"
    spans_json = (manifest or {}).get("spans") or {}
    span_info, spans = [], ()
    if {"low", "high"} <= set(spans_json):
        try:
            spans = (Span.of(spans_json["low"]["span"]), Span.of(spans_json["high"]["span"]))
            span_info = [{"which": w, **{k: v for k, v in spans_json[w].items() if k != "span"},
                          "span": list(spans[i])} for i, w in enumerate(("low", "high"))]
        except (LFTError, KeyError, TypeError, AttributeError):
            spans, span_info = (), []
    labels = [step.label(settings, spans_json if spans else None) for step in steps]
    total = len(steps)
    done = list(states.values()).count("done")
    ready = done == total
    job = None
    if running:
        owner = read_owner()
        job = owner.get("job") if isinstance(owner.get("job"), str) else None
    if ready:
        line = "demo ready"
    elif running and other:
        line = "not prepared (another demo is being prepared)"
    elif running:
        line = f"preparing: {done} of {total} steps"
    elif error:
        line = f"not ready: {done} of {total} steps done; {error}"
    elif done:
        line = f"not ready: {done} of {total} steps done"
    else:
        line = "not prepared"
    flow_info = [{k: f.get(k) for k in ("name", "method", "which", "span")}
                 for f in (manifest or {}).get("flows", []) if isinstance(f, dict)]
    cache = {k: v for k, v in ((manifest or {}).get("cache") or {}).items() if isinstance(v, str)}
    return DemoStatus(ready=ready, done=done, total=total, steps=list(zip(labels, states.values())), spans=spans,
                      flows=[f["name"] for f in flow_info if isinstance(f.get("name"), str)], running=running,
                      line=line, settings=settings, job=job, span_info=span_info, flow_info=flow_info, cache=cache,
                      error=error)
