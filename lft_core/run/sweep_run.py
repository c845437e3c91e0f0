"""Running a sweep planned by ``sweep.plan_sweep``: ``run_sweep`` trains cell after cell (the teacher loaded
once), shares cells with other jobs (waits for a cell another job trains, resumes one whose job died), reports
progress in runs and returns a ``SweepResult`` with every cell. See ``sweep`` for the whole story.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Sequence

from lft_core.errors import LFTError
from lft_core.flow.store import being_trained
from lft_core.run.sweep import Cell, SweepPlan, _cell, _on_disk, wait_limit
from lft_core.span import Span

if TYPE_CHECKING:
    from lft_core.model.teacher import Teacher

POLL_S = 1.0
"""How often a sweep looks again at cells another job is training (only when every cell left is such a cell)."""
RETRIES = 3
"""How many times a cell whose training could not start (no step ran, nothing changed on disk) is tried again
before it is recorded as failed: looking at a lock takes it for an instant, which can make another job's start
fail once."""


# ---------------------------------------------------------------------------------------------------------
# Running it


@dataclass
class RunRecord:
    """One cell's outcome. ``status``: complete, stopped, failed, or pending (not reached)."""

    name: str
    span: Span
    method: str
    k: int
    seed: int
    action: str
    status: str
    steps_done: int | None = None
    final_loss: float | None = None
    heldout_nmse: float | None = None
    seconds: float | None = None
    error: str | None = None

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["span"] = list(self.span)
        for key in ("final_loss", "heldout_nmse", "seconds"):
            v = d[key]
            d[key] = None if v is None or not math.isfinite(v) else round(float(v), 6)
        return d


@dataclass
class SweepResult:
    prefix: str
    runs: list[RunRecord]
    stopped: bool
    seconds: float
    grid: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "failed"]

    def to_json(self) -> dict:
        return {"sweep": self.prefix, "grid": self.grid, "stopped": self.stopped, "seconds": round(self.seconds, 3),
                "runs": [r.to_json() for r in self.runs], "summary": summarise(self.runs)}

    def table(self) -> str:
        """The runs, one line each, then mean ± std over seeds per setting."""
        fmt = lambda v, p: "–" if v is None or not math.isfinite(v) else f"{v:.{p}f}"  # noqa: E731
        lines = [f"{'run':<48} {'status':<9} {'loss':>9} {'NMSE':>8} {'s':>7}"]
        for r in self.runs:
            lines.append(f"{r.name:<48} {r.status:<9} {fmt(r.final_loss, 5):>9} {fmt(r.heldout_nmse, 4):>8} "
                         f"{fmt(r.seconds, 1):>7}")
        summary = summarise(self.runs)
        if summary:
            lines += ["", f"{'span':<7} {'method':<7} {'k':>2} {'seeds':>5}  held-out NMSE (mean ± std)"]
            for s in summary:
                std = f" ± {s['nmse_std']:.4f}" if s["nmse_std"] is not None else ""
                lines.append(f"{s['span']:<7} {s['method']:<7} {s['k']:>2} {s['seeds']:>5}  {s['nmse_mean']:.4f}{std}")
        return "\n".join(lines)


def summarise(runs: Sequence[RunRecord]) -> list[dict]:
    """Per (span, method, k): the number of seeds with a held-out NMSE and its mean and sample std over them
    (std None with one seed); complete runs only."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in runs:
        if r.status == "complete" and r.heldout_nmse is not None and math.isfinite(r.heldout_nmse):
            groups.setdefault((str(r.span), r.method, r.k), []).append(r)
    out = []
    for (span, method, k), rs in groups.items():
        nmse = [r.heldout_nmse for r in rs]
        loss = [r.final_loss for r in rs if r.final_loss is not None and math.isfinite(r.final_loss)]
        out.append({"span": span, "method": method, "k": k, "seeds": len(rs),
                    "nmse_mean": round(statistics.fmean(nmse), 6),
                    "nmse_std": round(statistics.stdev(nmse), 6) if len(nmse) > 1 else None,
                    "loss_mean": round(statistics.fmean(loss), 6) if loss else None,
                    "loss_std": round(statistics.stdev(loss), 6) if len(loss) > 1 else None})
    return out


def _saved_numbers(saved: dict) -> tuple[float | None, float | None]:
    """(last loss, last held-out NMSE) of a saved flow's history."""
    history = [e for e in saved.get("history", []) if isinstance(e, dict)] if isinstance(saved.get("history"), list) \
        else []
    losses = [e["loss"] for e in history if isinstance(e.get("loss"), (int, float))]
    nmse = [e["heldout_nmse"] for e in history if isinstance(e.get("heldout_nmse"), (int, float))]
    return (losses[-1] if losses else None), (nmse[-1] if nmse else None)


def _record(cell: Cell, status: str, **kw) -> RunRecord:
    """``action``: what this sweep did (train, resume, skip), ``waited`` when another job, found training the
    cell, completed it, ``wait`` when it was still another job's when the sweep stopped or gave up."""
    cfg = cell.config
    action = "waited" if cell.waited and cell.action == "skip" else cell.action
    return RunRecord(cell.name, cfg.span, cfg.method, cfg.k, cfg.seed, action, status, **kw)


def precache(teacher: Teacher, cells: Sequence[Cell], verbose: bool = True) -> None:
    """Cache the hidden states every cell to train needs in one pass per split (instead of one per span)."""
    from lft_core.data.activations import ensure_activations
    from lft_core.data.corpus import load_corpus

    todo = [c.config for c in cells if c.action != "skip"]
    if len({c.span for c in todo}) < 2:
        return  # one span: train_flow caches exactly what it needs
    base = todo[0]
    inner = {i for c in todo if c.waypoints > 0 for i in range(c.span.m + 1, c.span.n)}
    ends = {i for c in todo for i in c.span}
    corpus = load_corpus(base.corpus)
    ensure_activations(teacher, corpus, base.seq_len, base.windows, sorted(ends | inner), "train", progress=verbose)
    ensure_activations(teacher, corpus, base.seq_len, base.heldout_windows, sorted(ends), "heldout", progress=verbose)


def run_sweep(plan: SweepPlan, teacher: Teacher, progress: Callable[[dict], None] | None = None,
              should_stop: Callable[[], bool] | None = None, verbose: bool = True) -> SweepResult:
    """Train the plan's cells (see the module doc: each cell is decided again at its turn, and cells another
    job is training are waited for); a run that fails (diverges) is recorded as failed and the sweep goes on.
    The result's ``runs`` are in the plan's order."""
    from lft_core.flow.training import train_flow

    emit = progress or (lambda event: None)
    stop = should_stop or (lambda: False)
    limit = wait_limit()
    N = len(plan.cells)
    t_sweep = time.perf_counter()
    records: dict[int, RunRecord] = {}
    stopped = False
    pace = {"per_step": None}  # seconds per step, measured on the current run
    waiting_since: dict[int, float] = {}  # cell index -> when this sweep first found another job training it
    tries: dict[int, int] = {}  # cell index -> starts that came back (lost to another job, or tried again)

    def say(text: str) -> None:
        if verbose:
            print(text, file=sys.stderr, flush=True)

    def finish(cell: Cell, rec: RunRecord, base: dict, eta: float | None) -> None:
        records[cell.index] = rec
        emit({**base, "event": "done", "status": rec.status, "flow_step": rec.steps_done,
              "final_loss": rec.to_json()["final_loss"], "heldout_nmse": rec.to_json()["heldout_nmse"],
              "seconds": rec.to_json()["seconds"], "eta_s": eta})

    def lost_the_start(cell: Cell, before: tuple, error: LFTError) -> bool:
        """After a train_flow that ran no step failed: True to come back to the cell later (another job took
        or changed it meanwhile, or, a few times, to try again), False to record the failure."""
        tries[cell.index] = tries.get(cell.index, 0) + 1
        if tries[cell.index] > 20:  # a name that keeps changing hands: record it rather than loop
            return False
        after = _on_disk(cell.name)
        if being_trained(cell.name) or (after != before and after[1] != "failed"):
            say(f"run {cell.index} of {N}: another job took {cell.name} as this sweep started it; the sweep "
                f"comes back to it")
            return True
        if tries[cell.index] <= RETRIES:
            say(f"run {cell.index} of {N}: {cell.name} could not start ({error}); trying again shortly")
            return True
        return False

    def attempt(cell: Cell, base: dict, sweep_eta: Callable) -> RunRecord | None:
        """Run one decided cell; None when another job took it first."""
        emit({**base, "event": "start", "action": cell.action, "flow_step": cell.steps_done,
              "eta_s": sweep_eta(None)})
        if cell.action == "skip":
            loss, nmse = _saved_numbers(cell.saved or {})
            say(f"run {cell.index} of {N}: {cell.name} " + ("was completed by another job meanwhile"
                                                           if cell.waited else "is complete already (skipped)"))
            return _record(cell, "complete", steps_done=cell.steps_done, final_loss=loss, heldout_nmse=nmse)
        say(f"run {cell.index} of {N}: {'resuming' if cell.action == 'resume' else 'training'} {cell.name}")
        ran = {"steps": 0}

        def on_step(event: dict) -> None:
            ran["steps"] += 1
            left = event["steps"] - event["step"]
            if left > 0 and event.get("eta_s") is not None:
                pace["per_step"] = event["eta_s"] / left
            emit({**{k: v for k, v in event.items() if k not in ("step", "steps", "eta_s")}, **base,
                  "event": "step", "flow_step": event["step"], "flow_steps": event["steps"],
                  "flow_eta_s": event.get("eta_s"), "eta_s": sweep_eta(event.get("eta_s"))})

        before = _on_disk(cell.name)
        t0 = time.perf_counter()
        try:
            result = train_flow(cell.config, teacher=teacher, progress=on_step, should_stop=stop,
                                resume=cell.action == "resume", verbose=verbose)
        except LFTError as e:
            if not ran["steps"] and lost_the_start(cell, before, e):
                return None
            say(f"run {cell.index} of {N}: {cell.name} failed: {e}")
            return _record(cell, "failed", seconds=time.perf_counter() - t0, error=str(e))
        return _record(cell, "stopped" if result.stopped else "complete", steps_done=result.steps,
                       final_loss=result.final_loss, heldout_nmse=result.heldout_nmse,
                       seconds=time.perf_counter() - t0)

    say(plan.summary())
    if any(c.action != "skip" for c in plan.cells) and not stop():
        precache(teacher, plan.cells, verbose)
    pending = list(plan.cells)
    while pending:
        busy: list[Cell] = []  # cells another job holds: the next pass looks at them again
        for pos, cell in enumerate(pending):
            base = {"step": cell.index, "steps": N, "label": cell.name, "flow_steps": cell.config.total_steps}
            if cell.action != "skip" and (stopped or stop()):  # a complete cell is reported as such, also after a stop
                stopped = True
                records[cell.index] = _record(cell, "pending", steps_done=cell.steps_done if cell.saved else None)
                continue
            later = sum(c.steps_left for c in pending[pos + 1:]) + sum(c.steps_left for c in busy)

            def sweep_eta(run_left: float | None, cell: Cell = cell, later: int = later) -> float | None:
                per = pace["per_step"]
                if per is None:
                    return None
                return (run_left if run_left is not None else per * cell.steps_left) + per * later

            if cell.action != "skip":  # decided again now: another job may have taken, finished or left it
                try:
                    now = _cell(cell.index, cell.config, teacher)
                except LFTError as e:
                    say(f"run {cell.index} of {N}: {cell.name} failed: {e}")
                    finish(cell, _record(cell, "failed", error=str(e)), base, sweep_eta(0.0))
                    continue
                now.waited = cell.waited or cell.action == "wait"  # another job had it when this sweep looked
                if now.action == "wait":
                    now.waited = True
                    since = waiting_since.get(cell.index)
                    if since is None:
                        since = waiting_since[cell.index] = time.monotonic()
                        say(f"run {cell.index} of {N}: {cell.name} is being trained by another job; the sweep "
                            f"goes on and comes back to it")
                    if limit is not None and time.monotonic() - since >= limit:
                        error = (f"flow {cell.name!r} is still being trained by another job after {limit:g} s "
                                 f"(LFT_SWEEP_WAIT); run the sweep again once that job is done")
                        say(f"run {cell.index} of {N}: {cell.name} failed: {error}")
                        finish(now, _record(now, "failed", error=error), base, sweep_eta(0.0))
                        continue
                    emit({**base, "event": "wait", "action": "wait", "flow_step": now.steps_done, "eta_s": None})
                    busy.append(now)
                    continue
                cell = now
            rec = attempt(cell, base, sweep_eta)
            if rec is None:
                busy.append(cell)
                continue
            stopped = stopped or rec.status == "stopped"
            finish(cell, rec, base, sweep_eta(0.0))
        pending = busy
        if pending and not (stopped or stop()):
            time.sleep(POLL_S)
    grid = {"spans": [str(s) for s in plan.spans], "methods": plan.methods, "k": plan.ks, "seeds": plan.seeds}
    return SweepResult(plan.prefix, [records[c.index] for c in plan.cells], stopped,
                       time.perf_counter() - t_sweep, grid)
