"""The demo's steps: one object per step, listed in one place (``demo_steps``).

Every step has a ``kind`` (cache, recoupling, affine, flow) and

* ``label(settings, spans)``: its line (with the chosen spans once they are known);
* ``state(found)``: 'done' / 'running' / 'pending' from the manifest and the artefacts themselves (``found``, an
  ``Artefacts``: small files only, no model, no hashing, so every page can ask); ``is_done(found)``;
* ``run(run, progress, should_stop)``: do the work, sending progress through ``progress`` (a ``StepProgress``);
  False when a stop request ended it;
* ``read_back(run)``: when it was done before, read its result back for the later steps (the cache and the
  grids; a flow step has nothing to read back);
* ``like(other)``: whether ``other`` takes about as long (a flow of the same method), for ETA estimates.

``run`` is the preparation (``prepare._Run``): the steps read its ``settings``, ``teacher``, ``corpus``,
``verbose``, ``manifest`` and ``steps``, share the cache entries (``entries``, ``entry(split)``) and the
recoupling grid (``grid``) through it, and update the manifest with ``record(step)`` and ``save()``.

The manifest's step records, ``DemoSettings.total``, ``step_labels``, ``demo_status``, the ETA and ``DemoResult``
all read the list ``demo_steps(settings)``: a step is added or reordered there and nowhere else.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

from lft_core.atomic import DamagedRecord, read_record
from lft_core.errors import LFTError
from lft_core.paths import cache_dir
from lft_core.run.demo.settings import DemoSettings, choose_spans, flow_plan
from lft_core.span import Span

if TYPE_CHECKING:
    from lft_core.run.demo.prepare import _Run


class StepProgress(Protocol):
    """How a running step reports progress (one event per call, step, label and ETA added by the run)."""

    def counter(self, unit: str) -> Callable[[int, int], None]:
        """A ``callback(done, total)`` for the inner work, throttled, its ETA from the pace so far."""

    def __call__(self, remaining: float | None, **fields: Any) -> None:
        """One progress event now, ``remaining`` seconds left in the step (None: unknown)."""


# ---------------------------------------------------------------------------------------------------------
# What is there: checks of the artefacts themselves, reading small files only (no model, no hashing)


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
    ``created`` stamps, pairs, ...), as ``recoupling.read_recoupling_grid`` / ``affine.read_affine_grid`` check."""
    try:
        data = read_record(path, {"version": int, "matrix": list})
    except DamagedRecord:
        return False
    return data["version"] == 1 and all(data.get(k) == v for k, v in expect.items())


def _cache_keys(manifest: dict) -> tuple[str, str] | None:
    """(train entry, held-out entry) keys the manifest names (None before the cache step ran)."""
    cache = manifest.get("cache") or {}
    train, held = cache.get("train"), cache.get("heldout")
    return (train, held) if isinstance(train, str) and isinstance(held, str) else None


def _flow_state(entry: dict) -> str:
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


def flow_records(steps: list[Step], manifest: dict) -> dict[FlowStep, Any]:
    """The manifest's record of each flow step's flow (the manifest lists them in the flow steps' order; none
    when it lists another number of flows)."""
    flow_steps = [step for step in steps if isinstance(step, FlowStep)]
    flows = manifest.get("flows") or []
    if not isinstance(flows, list) or len(flows) != len(flow_steps):
        return {}
    return dict(zip(flow_steps, flows))


class Artefacts:
    """What is there of what a manifest names (None: no manifest), read when a step asks."""

    def __init__(self, manifest: dict | None, settings: DemoSettings, steps: list[Step]):
        self.manifest = manifest or {}
        self.settings = settings
        self.flows = flow_records(steps, self.manifest)

    @cached_property
    def entries(self) -> tuple[dict | None, dict | None]:
        """The meta of the train and the held-out cache entry, each None unless complete."""
        cache = self.manifest.get("cache") or {}
        return _entry_complete(cache.get("train")), _entry_complete(cache.get("heldout"))


def step_states(steps: list[Step], manifest: dict | None, settings: DemoSettings) -> dict[Step, str]:
    """'done' / 'running' / 'pending' per step, from the artefacts the manifest names."""
    found = Artefacts(manifest, settings, steps)
    return {step: step.state(found) for step in steps}


# ---------------------------------------------------------------------------------------------------------
# The steps


@dataclass(frozen=True)
class Step:
    """One step of the demo (see the module docstring)."""

    kind: ClassVar[str] = ""

    def label(self, settings: DemoSettings, spans: dict | None = None) -> str:
        raise NotImplementedError

    def state(self, found: Artefacts) -> str:
        raise NotImplementedError

    def is_done(self, found: Artefacts) -> bool:
        return self.state(found) == "done"

    def run(self, run: _Run, progress: StepProgress, should_stop: Callable[[], bool] | None) -> bool:
        raise NotImplementedError

    def read_back(self, run: _Run) -> None:
        """Read back the result of the step done before (nothing by default)."""

    def like(self, other: Step) -> bool:
        """True when ``other`` takes about as long as this step (for estimates)."""
        return False


@dataclass(frozen=True)
class CacheStep(Step):
    """Every layer h_0 … h_L of ``windows`` × ``seq_len`` training tokens and of the held-out windows."""

    kind: ClassVar[str] = "cache"

    def label(self, settings: DemoSettings, spans: dict | None = None) -> str:
        return (f"Cache all layers: {settings.windows} windows x {settings.seq_len} tokens "
                f"(+ {settings.affine_heldout_windows} held-out)")

    def state(self, found: Artefacts) -> str:
        train, held = found.entries
        return "done" if train is not None and held is not None else "pending"

    def run(self, run: _Run, progress: StepProgress, should_stop: Callable[[], bool] | None) -> bool:
        run.entries = self._caches(run, progress.counter("windows"))
        return True

    def read_back(self, run: _Run) -> None:
        run.entries = self._caches(run, None)

    @staticmethod
    def _caches(run: _Run, callback) -> dict:
        from lft_core.data.activations import ensure_activations

        s = run.settings
        layers = range(run.teacher.n_layers + 1)
        out = {}
        for split, n in (("train", s.windows), ("heldout", s.affine_heldout_windows)):
            out[split] = ensure_activations(run.teacher, run.corpus, s.seq_len, n, layers, split,
                                            progress=run.verbose, callback=callback)
        return out


@dataclass(frozen=True)
class GridStep(Step):
    """A value for every span computed from the all-layer cache entries and persisted under cache/grids/: done when
    its file is there and says it was computed from these entries (``expect``). Subclasses name the file, what it
    must say, and compute it (``_grid``), which also reads it back when it was done before."""

    def file_name(self, keys: tuple[str, str], settings: DemoSettings) -> str:
        raise NotImplementedError

    def expect(self, train: dict, held: dict, settings: DemoSettings) -> dict:
        raise NotImplementedError

    def file(self, manifest: dict, settings: DemoSettings) -> Path | None:
        keys = _cache_keys(manifest)
        return None if keys is None else cache_dir("grids") / self.file_name(keys, settings)

    def state(self, found: Artefacts) -> str:
        train, held = found.entries
        if train is None or held is None:
            return "pending"
        path = self.file(found.manifest, found.settings)
        ok = path is not None and _grid_file_ok(path, self.expect(train, held, found.settings))
        return "done" if ok else "pending"

    def run(self, run: _Run, progress: StepProgress, should_stop: Callable[[], bool] | None) -> bool:
        self._grid(run, progress.counter("spans"))
        return True

    def read_back(self, run: _Run) -> None:
        self._grid(run, None)

    def _grid(self, run: _Run, callback) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class RecouplingGridStep(GridStep):
    """The recoupling grid of every span from the cache (``recoupling.recoupling_grid_cached``: persisted, so the
    Span page reads it instead of recomputing)."""

    kind: ClassVar[str] = "recoupling"

    def label(self, settings: DemoSettings, spans: dict | None = None) -> str:
        return f"Recoupling grid: {settings.pairs} token pairs per span"

    def file_name(self, keys: tuple[str, str], settings: DemoSettings) -> str:
        return f"recoupling-{keys[0]}-p{settings.pairs}-s0-drop.json"

    def expect(self, train: dict, held: dict, settings: DemoSettings) -> dict:
        return {"entry_created": str(train.get("created")), "pairs": settings.pairs, "seed": 0, "drop_first": True}

    def _grid(self, run: _Run, callback) -> None:
        from lft_core.analysis.recoupling import recoupling_grid_cached

        run.grid = recoupling_grid_cached(run.entry("train"), pairs=run.settings.pairs, seed=0, drop_first=True,
                                          progress=callback)
        run.manifest.setdefault("grids", {})["recoupling"] = self.file(run.manifest, run.settings).name


@dataclass(frozen=True)
class AffineGridStep(GridStep):
    """The affine grid of every span (``affine.affine_grid_from_caches``, persisted likewise); then the two
    spans are chosen (``choose_spans``) and the flows planned in the manifest."""

    kind: ClassVar[str] = "affine"

    def label(self, settings: DemoSettings, spans: dict | None = None) -> str:
        return "Affine grid: held-out NMSE of every span"

    def file_name(self, keys: tuple[str, str], settings: DemoSettings) -> str:
        return f"affine-{keys[0]}-{keys[1]}.json"

    def expect(self, train: dict, held: dict, settings: DemoSettings) -> dict:
        return {"train_created": str(train.get("created")), "heldout_created": str(held.get("created"))}

    def _grid(self, run: _Run, callback) -> None:
        from lft_core.analysis.affine import affine_grid_from_caches

        affine = affine_grid_from_caches(run.entry("train"), run.entry("heldout"), callback=callback)
        run.manifest.setdefault("grids", {})["affine"] = self.file(run.manifest, run.settings).name
        self._choose(run, affine.matrix)

    @staticmethod
    def _choose(run: _Run, affine_matrix) -> None:
        """Pick the two spans from the recoupling grid and plan their flows in the manifest."""
        s = run.settings
        if run.grid is None:
            from lft_core.analysis.recoupling import recoupling_grid_cached

            run.grid = recoupling_grid_cached(run.entry("train"), pairs=s.pairs, seed=0, drop_first=True)
        spans = choose_spans(run.grid.matrix, s.blocks)
        for which in ("low", "high"):
            m, n = spans[which]["span"]
            value = float(affine_matrix[m, n])
            spans[which]["affine_nmse"] = value if math.isfinite(value) else None
        flow_steps = [step for step in run.steps if isinstance(step, FlowStep)]
        for step in flow_steps:  # the shipped flows the demo installs instead of training (names, by method)
            shipped = step.shipped(s, spans, run.teacher)
            if shipped is not None:
                spans[step.which].setdefault("shipped", {})[step.method] = shipped.name
        flows = [step.plan(s, spans, run.teacher.model_id) for step in flow_steps]
        if spans != run.manifest.get("spans") or flows != run.manifest.get("flows"):
            old = {f.get("name"): pos for pos, f in enumerate(run.manifest.get("flows") or []) if isinstance(f, dict)}
            for pos, (step, f) in enumerate(zip(flow_steps, flows)):  # a flow step that names another flow
                if old.get(f["name"]) != pos:                          # has not been done
                    run.record(step).update(state="pending", seconds=None)
            run.manifest.update(spans=spans, flows=flows)
            run.save()


@dataclass(frozen=True)
class FlowStep(Step):
    """A flow by ``method`` on the ``which`` ('low' / 'high') R span: the shipped flow of the zoo when one was
    trained for this teacher, span, method, corpus and window length and the demo uses the default recipe
    (installed under its zoo name, ``zoo-<method>-M-N``: ``lft_core.zoo``), else trained here with the demo's
    recipe as ``demo-<method>-M-N`` (a ``-<tag>`` suffix names flows of other settings)."""

    which: str
    method: str
    kind: ClassVar[str] = "flow"

    def label(self, settings: DemoSettings, spans: dict | None = None) -> str:
        where = f"span {Span.of(spans[self.which]['span'])}, {self.which} R" if spans and self.which in spans \
            else f"the {self.which}-R span of {settings.blocks} blocks"
        if self.shipped_name(spans):
            return f"Install the shipped {self.method.upper()} flow on {where}"
        return f"Train {self.method.upper()} on {where}"

    def shipped_name(self, spans: dict | None) -> str | None:
        """The name of the shipped flow this step installs (None: it trains), as the manifest's spans say."""
        named = ((spans or {}).get(self.which) or {}).get("shipped") or {}
        name = named.get(self.method) if isinstance(named, dict) else None
        return name if isinstance(name, str) else None

    def shipped(self, settings: DemoSettings, spans: dict, teacher):
        """The zoo's flow for this step (``zoo.find_shipped``: the teacher's id and weights hash, the span, the
        method, the corpus and the window length), or None. Only the default recipe installs shipped flows: a demo
        asked to train with other settings trains."""
        if settings.train:
            return None
        from lft_core.zoo import find_shipped

        m, n = spans[self.which]["span"]
        return find_shipped(teacher.model_id, teacher.weights_hash, (m, n), self.method, settings.corpus,
                            settings.seq_len)

    def state(self, found: Artefacts) -> str:
        entry = found.flows.get(self)
        return _flow_state(entry) if isinstance(entry, dict) else "pending"

    def like(self, other: Step) -> bool:
        return isinstance(other, FlowStep) and other.method == self.method

    def config(self, settings: DemoSettings, span: Span):
        from lft_core.flow.config import TrainConfig

        return TrainConfig(**{**settings.train_kwargs(), "span": span, "method": self.method,
                              "name": settings.flow_name(self.method, span)})

    def plan(self, settings: DemoSettings, spans: dict, model_id: str) -> dict:
        """The manifest's record of this step's flow on the chosen ``spans``, with the settings a saved flow must
        show to be this demo's (what status checks, without the model)."""
        span = Span.of(spans[self.which]["span"])
        shipped = self.shipped_name(spans)
        if shipped is not None:  # the installed flow must be the shipped one: same weights
            from lft_core.zoo import get_shipped

            flow = get_shipped(shipped)
            expected = {"name": shipped, "model": model_id, "span": list(span), "method": self.method,
                        "status": "complete", "weights_sha256": flow.weights_sha256}
            return {"name": shipped, "method": self.method, "which": self.which, "span": list(span),
                    "shipped": True, "config": expected}
        cfg = self.config(settings, span)
        out = {k: v for k, v in asdict(cfg).items() if k not in ("name", "sweep", "model", "span")}
        expected = {**json.loads(json.dumps(out)), "model": model_id, "span": list(cfg.span), "name": cfg.name}
        return {"name": cfg.name, "method": self.method, "which": self.which, "span": list(span),
                "config": expected}

    def run(self, run: _Run, progress: StepProgress, should_stop: Callable[[], bool] | None) -> bool:
        from lft_core.flow.store import being_trained, flows_dir
        from lft_core.flow.training import train_flow

        entry = flow_records(run.steps, run.manifest)[self]
        if entry.get("shipped"):
            from lft_core.zoo import install

            outcome = install(entry["name"], run.teacher)  # never over another flow; idempotent
            progress(0.0, done=1, total=1, unit="flows", flow=entry["name"], detail=f"shipped flow {outcome}")
            return True
        cfg = self.config(run.settings, Span.of(entry["span"]))
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
            progress(eta if isinstance(eta, (int, float)) else None,
                     done=event.get("step"), total=total, unit="flow steps", flow=name,
                     flow_step=event.get("step"), flow_steps=event.get("steps"), flow_eta_s=eta,
                     loss=event.get("loss"), stage=event.get("stage"))

        result = train_flow(cfg, teacher=run.teacher, progress=on_event, should_stop=should_stop,
                            resume=resume, verbose=run.verbose)
        return not result.stopped


def demo_steps(settings: DemoSettings) -> list[Step]:
    """The demo's steps in order, the one place they are listed: cache every layer, the recoupling grid, the
    affine grid, then one flow step per (which span, method) of ``flow_plan``."""
    return [CacheStep(), RecouplingGridStep(), AffineGridStep(),
            *(FlowStep(which, method) for which, method in flow_plan(settings))]


def step_labels(settings: DemoSettings, spans: dict | None = None) -> list[str]:
    """One line per step (with the chosen spans once they are known)."""
    return [step.label(settings, spans) for step in demo_steps(settings)]
