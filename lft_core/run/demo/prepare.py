"""Preparing the demo: ``prepare_demo`` takes the demo's lock and runs the steps of ``demo_steps`` in order
(``_Run``), recording each step's state and seconds in the manifest and sending progress events."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from lft_core.atomic import write_json
from lft_core.errors import LFTError
from lft_core.run.demo.settings import FIRST_BLOCK, DemoSettings
from lft_core.run.demo.status import (manifest_path, new_manifest, now, owner_path, owner_text, prepare_lock,
                                      read_manifest, read_owner)
from lft_core.run.demo.steps import Artefacts, Step, demo_steps, step_states
from lft_core.span import Span

if TYPE_CHECKING:
    from lft_core.data.activations import ActivationCache
    from lft_core.model.teacher import Teacher

PROGRESS_EVERY_S = 0.5
"""Fewest seconds between two progress events of a cache or grid step (start and end events, and one event per
training step, always go out)."""

Progress = Callable[[dict], None]


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
    """Build the demo (see the package docstring); returns what was done.

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
    lock = prepare_lock()
    try:
        lock.acquire()
    except Timeout:
        raise LFTError(f"the demo is being prepared by another process ({owner_text(read_owner())}); follow it on "
                       f"the home page or wait for it to finish") from None
    try:
        write_json(owner_path(), {"pid": os.getpid(), "job": job, "started": now()})
        return _Run(settings, teacher, progress, should_stop, verbose, job).run()
    finally:
        try:
            owner_path().unlink(missing_ok=True)
        finally:
            lock.release()


class _Stopped(Exception):
    pass


class _StepProgress:
    """Progress of the running step (``steps.StepProgress``): events of ``step`` through the run."""

    def __init__(self, run: _Run, step: Step):
        self.run, self.step = run, step

    def counter(self, unit: str) -> Callable[[int, int], None]:
        def callback(done: int, total: int) -> None:
            elapsed = time.perf_counter() - self.run.step_start
            remaining = elapsed / done * (total - done) if done > 0 else None
            self.run.emit(self.step, "progress", force=done >= total, remaining=remaining, done=done, total=total,
                          unit=unit)
        return callback

    def __call__(self, remaining: float | None, **fields: Any) -> None:
        self.run.emit(self.step, "progress", remaining=remaining, **fields)


class _Run:
    """One preparation, holding the demo's lock: the steps of ``demo_steps(settings)``, in order."""

    def __init__(self, settings: DemoSettings, teacher, progress, should_stop, verbose: bool, job: str | None):
        self.settings = settings
        self.steps = demo_steps(settings)
        self.teacher = teacher
        self.progress = progress
        self.should_stop = should_stop
        self.verbose = verbose
        self.job = job
        self.t0 = time.perf_counter()
        self.manifest: dict = {}
        self.already: set[Step] = set()
        self.todo: set[Step] = set()  # steps whose artefacts were not there when this run began
        self.started = False  # a step has begun (from then on the manifest records what happens)
        self.timed: dict[Step, float] = {}  # seconds of steps done by this run, in the order done
        self.step_start = 0.0
        self.last_emit = 0.0
        self.corpus = None
        self.entries: dict[str, ActivationCache] = {}
        self.grid = None

    # -- manifest ----------------------------------------------------------------------------------------
    def save(self) -> None:
        self.manifest["updated"] = now()
        self.manifest["steps"] = [{**record, "label": self.label(step)}
                                  for step, record in zip(self.steps, self.manifest["steps"])]
        write_json(manifest_path(), self.manifest, indent=1)

    def label(self, step: Step) -> str:
        return step.label(self.settings, self.manifest.get("spans"))

    def number(self, step: Step) -> int:
        """The step's number, 1 to len(steps), as events and the manifest's records name it."""
        return self.steps.index(step) + 1

    def record(self, step: Step) -> dict:
        """The manifest's record of ``step`` (records are listed in the steps' order)."""
        return self.manifest["steps"][self.steps.index(step)]

    def set_state(self, step: Step, state: str, **extra: Any) -> None:
        record = self.record(step)
        record.update(state=state, **extra)
        if state != "failed":
            record.pop("error", None)
        self.save()

    def states(self) -> dict[Step, str]:
        return step_states(self.steps, self.manifest, self.settings)

    # -- progress ----------------------------------------------------------------------------------------
    def estimate(self, step: Step, current: Step | None, current_total: float | None) -> float | None:
        """Seconds ``step`` (not started) will take: as in a previous run of this demo, else as a step like it
        (a flow of the same method: same number of blocks, same recipe) in this run, else unknown."""
        prior = self.record(step).get("seconds")
        if isinstance(prior, (int, float)) and not isinstance(prior, bool):
            return float(prior)
        for other, secs in self.timed.items():
            if step.like(other):
                return secs
        if current is not None and step.like(current):
            return current_total
        return None

    def overall_eta(self, current: Step, remaining: float | None) -> float | None:
        if remaining is None:
            return None
        elapsed = time.perf_counter() - self.step_start
        total = 0.0
        for step in self.steps[self.steps.index(current) + 1:]:  # the steps after the current one
            if step not in self.todo or step in self.timed:
                continue
            est = self.estimate(step, current, elapsed + remaining)
            if est is None:
                return None
            total += est
        return round(remaining + total, 1)

    def emit(self, step: Step, state: str, force: bool = True, remaining: float | None = None,
             **fields: Any) -> None:
        if self.progress is None:
            return
        t = time.perf_counter()
        if not force and t - self.last_emit < PROGRESS_EVERY_S:
            return
        self.last_emit = t
        event = {"step": self.number(step), "steps": len(self.steps), "label": self.label(step), "state": state,
                 **fields,
                 "eta_s": self.overall_eta(step, remaining) if state in ("start", "progress") else
                 (0.0 if state == "complete" else None),
                 "elapsed_s": round(t - self.t0, 2)}
        self.progress(event)

    def prior_remaining(self, step: Step) -> float | None:
        prior = self.record(step).get("seconds")
        return float(prior) if isinstance(prior, (int, float)) and not isinstance(prior, bool) else None

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise _Stopped

    # -- the run -----------------------------------------------------------------------------------------
    def run(self) -> DemoResult:
        manifest = read_manifest()
        if manifest is None or manifest["settings"] != self.settings.to_json() or \
                len(manifest["steps"]) != len(self.steps):
            manifest = new_manifest(self.settings, self.steps)
        self.manifest = manifest
        states = self.states()
        last = self.steps[-1]
        if all(state == "done" for state in states.values()):  # nothing to do: no model, no write
            self.already = set(self.steps)
            for step in self.steps:
                self.emit(step, "skipped")
            self.emit(last, "complete")
            return self.result(stopped=False)
        self.manifest.update(job=self.job, pid=os.getpid(), ready=False)
        self.todo = {step for step, state in states.items() if state != "done"}
        step = next(step for step in self.steps if step in self.todo)
        try:
            self.check_stop()
            self.open_teacher(states)
            for step in self.steps:
                self.check_stop()
                self.do_step(step)
        except _Stopped:
            if self.started:
                if self.record(step).get("state") == "running":
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
        self.manifest.update(ready=True, finished=now())
        self.save()
        self.emit(last, "complete")
        return self.result(stopped=False)

    def result(self, stopped: bool) -> DemoResult:
        states = self.states()
        steps = []
        for number, step in enumerate(self.steps, 1):
            record, state = self.record(step), states[step]
            if state != "done":
                state = "failed" if record.get("state") == "failed" else "pending"
            secs = record.get("seconds")
            steps.append({"step": number, "label": self.label(step), "state": state, "seconds": secs,
                          "already": step in self.already,
                          **({"error": record["error"]} if record.get("error") else {})})
        return DemoResult(ready=all(s["state"] == "done" for s in steps), stopped=stopped, steps=steps,
                          spans=self.manifest.get("spans"), flows=[f["name"] for f in self.manifest.get("flows") or []],
                          seconds=time.perf_counter() - self.t0, manifest=str(manifest_path()))

    def open_teacher(self, states: dict[Step, str]) -> None:
        """Load the model (unless given) and check that the manifest's cache entries are this model's and
        corpus's (else the demo starts over: another model under the same spec)."""
        from lft_core.data.activations import cache_key
        from lft_core.data.corpus import load_corpus

        first = next((step for step, state in states.items() if state == "pending"), self.steps[0])
        if self.teacher is None:
            from lft_core.model.loading import load_teacher

            self.emit(first, "start", detail="loading the model")
            self.teacher = load_teacher(self.settings.model)
        t, s = self.teacher, self.settings
        self.corpus = load_corpus(s.corpus)
        keys = {split: cache_key(t.model_id, t.weights_hash, self.corpus.id, self.corpus.content_hash, s.seq_len,
                                 n, split)
                for split, n in (("train", s.windows), ("heldout", s.affine_heldout_windows))}
        if self.manifest.get("cache") and self.manifest["cache"] != keys:
            self.manifest = new_manifest(s, self.steps)
            self.manifest.update(job=self.job, pid=os.getpid())
        self.manifest.update(cache=keys, model_id=t.model_id, weights_hash=t.weights_hash, n_layers=t.n_layers)
        if t.n_layers - s.blocks - FIRST_BLOCK + 1 < 2:
            raise LFTError(f"spans of {s.blocks} blocks leave fewer than two spans to choose from in "
                           f"{t.model_id} ({t.n_layers} blocks): use fewer blocks")

    def do_step(self, step: Step) -> None:
        self.started = True
        if step.is_done(Artefacts(self.manifest, self.settings, self.steps)):
            self.already.add(step)
            step.read_back(self)  # the cache and the grids: their results, read back (cheap) for the next steps
            if self.record(step).get("state") != "done":
                self.set_state(step, "done")
            self.emit(step, "skipped")
            return
        self.step_start = time.perf_counter()
        self.set_state(step, "running", started=now())
        self.emit(step, "start", remaining=self.prior_remaining(step))
        if not step.run(self, _StepProgress(self, step), self.should_stop):
            raise _Stopped
        seconds = round(time.perf_counter() - self.step_start, 3)
        self.timed[step] = seconds
        self.set_state(step, "done", seconds=seconds, finished=now())
        self.emit(step, "done", seconds=seconds)

    def entry(self, split: str) -> ActivationCache:
        if split not in self.entries:
            from lft_core.data.activations import open_activations

            self.entries[split] = open_activations(self.manifest["cache"][split])
        return self.entries[split]
