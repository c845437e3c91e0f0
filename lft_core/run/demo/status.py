"""The demo's files (manifest, lock, owner) and where it stands (``demo_status``): small files only, no model,
no torch, no hashing, so every page can call it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lft_core.atomic import DamagedRecord, MissingRecord, read_record
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


MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""A manifest is a few KB; a larger file (or anything but a regular file) is damaged, never read."""
MAX_INT = 2**31 - 1
STEP_STATES = ("pending", "running", "done", "failed")


class _Bad(Exception):
    """A manifest field of the wrong type or out of range (the message names it)."""


def _number(value, where: str, none: bool = True) -> None:
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(f"{where} is not a finite number")


def _integer(value, where: str, least: int = 0, none: bool = False) -> None:
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= MAX_INT:
        raise _Bad(f"{where} is not an integer in [{least}, {MAX_INT}]")


def _string(value, where: str, none: bool = False, empty: bool = True) -> None:
    if value is None and none:
        return
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise _Bad(f"{where} is not a{'' if empty else ' non-empty'} string")


def _object(value, where: str, none: bool = False) -> dict:
    if value is None and none:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"{where} is not an object")
    return value


def _list(value, where: str, none: bool = False) -> list:
    if value is None and none:
        return []
    if not isinstance(value, list):
        raise _Bad(f"{where} is not a list")
    return value


def _span(value, where: str) -> None:
    if not isinstance(value, list) or len(value) != 2:
        raise _Bad(f"{where} is not a span [m, n]")
    _integer(value[0], where)
    _integer(value[1], where, least=1)
    if not value[0] < value[1]:
        raise _Bad(f"{where} is not a span [m, n] with m < n")


def _check_settings(data) -> None:
    settings = _object(data, "settings")
    for name in ("model", "corpus"):
        if name in settings:
            _string(settings[name], f"settings.{name}", empty=False)
    for name in ("seq_len", "windows", "pairs", "blocks", "affine_heldout_windows"):
        if name in settings:
            _integer(settings[name], f"settings.{name}", least=1)
    if "methods" in settings:
        methods = _list(settings["methods"], "settings.methods")
        for i, method in enumerate(methods):
            _string(method, f"settings.methods[{i}]", empty=False)
        if not methods or len(set(methods)) != len(methods):
            raise _Bad("settings.methods is not a list of distinct names")
    if "train" in settings:
        train = _object(settings["train"], "settings.train")
        for key, value in train.items():
            if not isinstance(value, (str, int, float, bool, list, type(None))):
                raise _Bad(f"settings.train.{key} is not a plain value")


def _check_manifest(data: dict) -> None:
    """_Bad naming the first field of ``data`` (a JSON object) that is missing, of the wrong type or out of range.
    Fields the app never reads are ignored; every field it reads is checked here, once."""
    if data.get("version") != MANIFEST_VERSION or isinstance(data.get("version"), bool):
        raise _Bad(f"version is not {MANIFEST_VERSION}")
    _check_settings(data.get("settings"))
    for i, record in enumerate(_list(data.get("steps"), "steps")):
        where = f"steps[{i}]"
        _object(record, where)
        _integer(record.get("step"), f"{where}.step", least=1)
        if record.get("state") not in STEP_STATES:
            raise _Bad(f"{where}.state is not one of {', '.join(STEP_STATES)}")
        _number(record.get("seconds"), f"{where}.seconds")
        if record.get("seconds") is not None and record["seconds"] < 0:
            raise _Bad(f"{where}.seconds is negative")
        for key in ("label", "error", "started", "finished"):
            _string(record.get(key), f"{where}.{key}", none=True)
    if len({r["step"] for r in data["steps"]}) != len(data["steps"]):
        raise _Bad("steps number a step twice")
    for key in ("cache", "grids"):
        for name, value in _object(data.get(key), key, none=True).items():
            _string(value, f"{key}.{name}")
    spans = _object(data.get("spans"), "spans", none=True)
    if spans:
        for which in ("low", "high"):
            info = _object(spans.get(which), f"spans.{which}")
            _span(info.get("span"), f"spans.{which}.span")
            for key in ("R", "affine_nmse"):
                _number(info.get(key), f"spans.{which}.{key}")
            if info.get("R") is not None and not 0 <= info["R"] <= 1:
                raise _Bad(f"spans.{which}.R is not a ratio in [0, 1]")
        _string(spans.get("rule"), "spans.rule", none=True)
    for i, flow in enumerate(_list(data.get("flows"), "flows", none=True)):
        where = f"flows[{i}]"
        _object(flow, where)
        _string(flow.get("name"), f"{where}.name", empty=False)
        if "/" in flow["name"] or "\\" in flow["name"] or flow["name"].startswith("."):
            raise _Bad(f"{where}.name is not a flow name")
        _string(flow.get("method"), f"{where}.method", empty=False)
        if flow.get("which") not in ("low", "high"):
            raise _Bad(f"{where}.which is not low or high")
        _span(flow.get("span"), f"{where}.span")
        _object(flow.get("config"), f"{where}.config", none=True)
    for key in ("job", "model_id", "weights_hash", "created", "updated", "finished"):
        _string(data.get(key), key, none=True)
    _integer(data.get("pid"), "pid", none=True)
    _integer(data.get("n_layers"), "n_layers", least=1, none=True)
    if not isinstance(data.get("ready", False), bool):
        raise _Bad("ready is not true or false")


def load_manifest() -> tuple[dict | None, str | None]:
    """The one typed reader of the demo's manifest: (manifest, None) when it is whole; (None, None) when there is
    none; (None, why) when it is damaged: not a regular file, over ``MAX_MANIFEST_BYTES``, not JSON, or any field
    of the wrong type or out of range (``_check_manifest``). Never raises for what the file holds."""
    try:
        data = read_record(manifest_path(), limit=MAX_MANIFEST_BYTES, follow_links=False)
    except MissingRecord:
        return None, None
    except DamagedRecord as e:
        return None, str(e)
    try:
        _check_manifest(data)
        DemoSettings.from_json(data["settings"])
    except (_Bad, LFTError) as e:
        return None, f"manifest.json: {e}"
    if data.get("flows") is None:
        data["flows"] = []
    return data, None


def read_manifest() -> dict | None:
    """The manifest as saved, or None when there is none or it is damaged (then the demo counts as not
    prepared, and the next preparation checks every artefact and writes a new one)."""
    return load_manifest()[0]


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
    damaged: str | None = None

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
                "flow_info": self.flow_info, "cache": self.cache, "error": self.error, "damaged": self.damaged,
                "settings": self.settings.to_json()}


def demo_status(settings: DemoSettings | None = None) -> DemoStatus:
    """The demo's state, cheaply (small files only: no model, no hashing; meant for every page render).

    ``settings`` None: the demo the manifest describes (the last one prepared or being prepared), or the default
    demo when there is no manifest. Given settings that differ from the manifest's: that demo is not prepared.
    A step is 'done' only when its artefacts are there and whole (deleting a demo flow makes it pending).
    A damaged manifest (``load_manifest``: any field of the wrong type) reads as none, with ``damaged`` saying why
    and the line "demo damaged: prepare again" (a preparation writes a new one, keeping what is built)."""
    manifest, damaged = load_manifest()
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
    elif damaged and not running:
        line = "demo damaged: prepare again"
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
                      error=error, damaged=damaged)
