"""Sweeps: one training per cell of the grid spans × methods × k × seeds, one after another in one process
(the teacher loaded once), so that every number gets an error bar over seeds.

Every cell is a flow of its own with a deterministic name, ``<prefix>-<m>-<n>-<method>-k<k>-s<seed>``, and its
config.json records the sweep (``sweep: <prefix>``). Every other setting is the sweep's base ``TrainConfig``.

A sweep is idempotent and resumable: ``plan_sweep`` checks the whole grid before anything is trained (spans
against the model, settings, and every name: free, or taken by a flow of exactly this cell's settings), and
decides per cell: ``train`` (new), ``resume`` (a stopped, interrupted or failed flow:
``train_flow(resume=True)``) or ``skip`` (complete), or ``wait`` (another job holds the flow's training lock
right now). ``run_sweep`` (``sweep_run``) then trains cell after cell; a stop request (``should_stop``) stops the
current flow at its next step, which saves, and the sweep there; the cells not reached are ``pending`` and a
second run of the same command continues where it stopped.

Sweeps share their cells (two identical sweeps at once, overlapping sweeps, a sweep beside a ``train`` of one of
its cells): each cell is decided again when its turn comes, from the flow's lock and its folder. A cell another
job is training is passed over and the sweep goes on with the next one; when only such cells are left, it looks
again every ``sweep_run.POLL_S`` seconds until their lock is free, then reads each as it is then: ``complete``
(the other job finished it: recorded with action ``waited``), or stopped / interrupted (it was stopped, or died,
and its lock went with it), which this sweep resumes from its last checkpoint. A ``train_flow`` that loses the
race for a lock (another job took the name between the look and the start) comes back later instead of failing.
So every sweep reports every cell, and succeeds when every flow completed, whoever trained it. The wait ends when
the other job ends (the operating system releases its lock, also on kill -9), when this sweep is asked to stop,
or after ``LFT_SWEEP_WAIT`` seconds when that is set (the cell is then failed with one line).

Progress events (``progress(event)``, the job's progress.jsonl) speak in runs: ``step`` / ``steps`` are the run
i of N, ``label`` its flow, ``flow_step`` / ``flow_steps`` the step inside it, ``eta_s`` the whole sweep's time
left (estimated from the current run's pace), ``event`` one of ``start``, ``step``, ``done``, and ``wait`` (another
job is training this run; ``flow_step`` is where its checkpoint was when the sweep looked).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from lft_core.errors import LFTError
from lft_core.flow.config import MAX_SEED, TrainConfig
from lft_core.flow.methods import METHODS
from lft_core.flow.store import NAME_RE, being_trained, flows_dir, has_training_state, read_flow_config
from lft_core.span import Span

if TYPE_CHECKING:
    from lft_core.model.teacher import Teacher

GRID = ("span", "method", "k", "seed")
"""The TrainConfig settings a sweep varies; ``name`` and ``sweep`` are set per cell, the rest is the base."""
MAX_RUNS = 1024


# ---------------------------------------------------------------------------------------------------------
# The grid


def _items(text: str | Sequence, what: str) -> list[str]:
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else map(str, text))]
    parts = [p for p in parts if p]
    if not parts:
        raise LFTError(f"give at least one {what}")
    return list(dict.fromkeys(parts))  # duplicates once, order kept


def parse_spans_list(text: str | Sequence) -> list[Span]:
    """``"6:12, 12:18"`` -> [Span(6, 12), Span(12, 18)] (duplicates once); LFTError naming a bad item."""
    return list(dict.fromkeys(Span.parse(p) for p in _items(text, "span (M:N)")))


def parse_methods(text: str | Sequence) -> list[str]:
    methods = [m.lower() for m in _items(text, "method")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LFTError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def parse_ints(text: str | Sequence, what: str, low: int, high: int) -> list[int]:
    """A comma list of integers in [low, high], e.g. seeds ``"0, 1, 2"``."""
    values = []
    for part in _items(text, what):
        try:
            v = int(part)
        except ValueError:
            raise LFTError(f"{what} must be a comma list of integers, got {part!r}") from None
        if not low <= v <= high:
            raise LFTError(f"{what} must be between {low} and {high}, got {v}")
        values.append(v)
    return list(dict.fromkeys(values))


def parse_grid(spans, methods, ks, seeds) -> tuple[list[Span], list[str], list[int], list[int]]:
    """The four axes from text (CLI flags, the app's inputs) or lists; LFTError with one line on bad input."""
    from lft_core.flow.latent import MAX_K

    return (parse_spans_list(spans), parse_methods(methods), parse_ints(ks, "k", 1, MAX_K),
            parse_ints(seeds, "seeds", 0, MAX_SEED))


def _model_stem(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model.rstrip("/")).name).lstrip("._-") or "model"


def default_prefix(base: TrainConfig) -> str:
    """``sw-<model>-st<steps>[-kl<distill steps>]``: sweeps of another recipe get other names."""
    tail = f"-st{base.steps}" + (f"-kl{base.distill_steps}" if base.distill_steps else "")
    return "sw-" + _model_stem(base.model)[: 40 - len(tail)] + tail


def cell_name(prefix: str, span: Span, method: str, k: int, seed: int) -> str:
    """The flow name of one cell: ``<prefix>-<m>-<n>-<method>-k<k>-s<seed>``."""
    return f"{prefix}-{span.m}-{span.n}-{method}-k{k}-s{seed}"


def expand(base: TrainConfig, spans: Sequence[Span], methods: Sequence[str], ks: Sequence[int],
           seeds: Sequence[int], prefix: str) -> list[TrainConfig]:
    """One TrainConfig per cell, in the order spans, then methods, then k, then seeds (seeds innermost, so the
    seeds of one setting run back to back)."""
    out = []
    for span in spans:
        for method in methods:
            for k in ks:
                for seed in seeds:
                    cfg = TrainConfig(**{f.name: getattr(base, f.name) for f in fields(TrainConfig)})
                    cfg.span, cfg.method, cfg.k, cfg.seed = Span.of(span), method, int(k), int(seed)
                    cfg.name, cfg.sweep = cell_name(prefix, cfg.span, method, int(k), int(seed)), prefix
                    out.append(cfg)
    return out


def cli_args(plan: SweepPlan, base: TrainConfig) -> list[str]:
    """The ``python -m lft_core sweep`` arguments of a plan over ``base`` (what the app's sweep job runs)."""
    args = ["--spans", ",".join(map(str, plan.spans)), "--methods", ",".join(plan.methods),
            "--k", ",".join(map(str, plan.ks)), "--seeds", ",".join(map(str, plan.seeds)), "--name", plan.prefix]
    per_cell = {"--" + name for name in (*GRID, "name", "sweep")}  # flags that take a value, set per cell
    given = iter(base.cli_args())
    for flag in given:
        if flag in per_cell:
            next(given)
        else:
            args.append(flag)
    return args


# ---------------------------------------------------------------------------------------------------------
# The plan: the whole grid checked before anything is trained


@dataclass
class Cell:
    index: int  # 1-based: run i of N
    config: TrainConfig
    action: str  # "train" | "resume" | "skip" | "wait" (another job is training it)
    saved: dict | None = None  # the existing flow's config.json
    waited: bool = False  # another job was training it when this sweep looked

    @property
    def name(self) -> str:
        return str(self.config.name)

    @property
    def steps_done(self) -> int:
        done = (self.saved or {}).get("steps_done")
        return done if isinstance(done, int) and not isinstance(done, bool) else 0

    @property
    def steps_left(self) -> int:
        return 0 if self.action == "skip" else max(0, self.config.total_steps - self.steps_done)


@dataclass
class SweepPlan:
    prefix: str
    spans: list[Span]
    methods: list[str]
    ks: list[int]
    seeds: list[int]
    cells: list[Cell]

    def count(self, action: str) -> int:
        return sum(c.action == action for c in self.cells)

    def summary(self) -> str:
        busy = f", {self.count('wait')} being trained by another job (waited for)" if self.count("wait") else ""
        return (f"sweep {self.prefix}: {len(self.cells)} runs ({len(self.spans)} span(s) × {len(self.methods)} "
                f"method(s) × {len(self.ks)} k × {len(self.seeds)} seed(s)): {self.count('train')} to train, "
                f"{self.count('resume')} to resume, {self.count('skip')} complete already{busy}")


def _mismatch(saved: dict, cfg: TrainConfig, teacher: Teacher | None) -> str | None:
    """The first setting in which an existing flow differs from the cell (None: it is this cell's flow)."""
    if teacher is not None and (saved.get("model") != teacher.model_id
                                or saved.get("weights_hash") != teacher.weights_hash):
        return f"it was trained for model {saved.get('model')!r}"
    for f in fields(TrainConfig):
        if f.name in ("name", "model"):
            continue
        want = getattr(cfg, f.name)
        want = list(want) if f.name == "span" else want
        if f.name in saved and saved[f.name] != want:
            return f"it has {f.name} = {saved[f.name]!r}, not {want!r}"
    return None


def plan_sweep(base: TrainConfig, spans, methods, ks, seeds, prefix: str | None = None,
               teacher: Teacher | None = None) -> SweepPlan:
    """Check the whole grid and decide what each cell does; LFTError (one line) on the first problem, before
    anything is trained. ``teacher`` (or anything with ``n_layers``, ``model_id`` and ``weights_hash``) checks the
    spans against the model and existing flows against its weights."""
    spans, methods, ks, seeds = parse_grid(spans, methods, ks, seeds)
    prefix = (prefix or "").strip() or default_prefix(base)
    if not NAME_RE.match(prefix):
        raise LFTError(f"sweep name {prefix!r}: use letters, digits, '-', '_' or '.'")
    runs = len(spans) * len(methods) * len(ks) * len(seeds)
    if runs > MAX_RUNS:
        raise LFTError(f"the sweep has {runs} runs; at most {MAX_RUNS} (fewer spans, methods, k or seeds)")
    n_layers = getattr(teacher, "n_layers", None)
    for span in spans:
        span.check(n_layers, where=f" for {teacher.model_id}" if teacher is not None else "")
    configs = expand(base, spans, methods, ks, seeds, prefix)
    longest = max(configs, key=lambda c: len(str(c.name)))
    if not NAME_RE.match(str(longest.name)):
        raise LFTError(f"flow names of this sweep would be too long (e.g. {longest.name!r}, at most 80 "
                       f"characters): give a shorter sweep name")
    cells = []
    for i, cfg in enumerate(configs, 1):
        cfg.validate(n_layers)
        cells.append(_cell(i, cfg, teacher))
    return SweepPlan(prefix, spans, methods, ks, seeds, cells)


def _cell(index: int, cfg: TrainConfig, teacher: Teacher | None) -> Cell:
    """What cell ``index`` does now: train, resume, skip, or wait (another job holds its lock); LFTError (one
    line) when its name is taken by something else (a flow of other settings, an unreadable or unresumable one)."""
    name = str(cfg.name)
    folder = flows_dir() / name
    busy = being_trained(name)
    if not folder.exists():
        return Cell(index, cfg, "wait" if busy else "train")
    try:
        saved = read_flow_config(name)
    except LFTError:
        saved = None
    if not isinstance(saved, dict):
        if busy:  # whoever trains it will write it; judged once it is done
            return Cell(index, cfg, "wait")
        raise LFTError(f"flow {name!r} exists but its config.json cannot be read: delete it "
                       f"(`python -m lft_core flows --delete {name}`) or give the sweep another name")
    problem = _mismatch(saved, cfg, teacher)
    if problem:
        raise LFTError(f"a flow named {name!r} exists with other settings ({problem}): give the sweep another "
                       f"name (--name) or delete that flow")
    if busy:
        return Cell(index, cfg, "wait", saved)
    if saved.get("status") == "complete":
        return Cell(index, cfg, "skip", saved)
    if not has_training_state(folder):
        raise LFTError(f"flow {name!r} is unfinished and has no training state to resume from: delete it "
                       f"(`python -m lft_core flows --delete {name}`)")
    return Cell(index, cfg, "resume", saved)


def _on_disk(name: str) -> tuple:
    """What a flow's folder says now (exists, status, steps done): to tell whether another job changed it."""
    if not (flows_dir() / name).exists():
        return (False, None, None)
    try:
        saved = read_flow_config(name)
    except LFTError:
        return (True, None, None)
    return (True, saved.get("status"), saved.get("steps_done")) if isinstance(saved, dict) else (True, None, None)


def wait_limit() -> float | None:
    """``LFT_SWEEP_WAIT``: the most seconds a sweep waits for a cell another job is training (unset: as long as
    that job runs)."""
    text = os.environ.get("LFT_SWEEP_WAIT", "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise LFTError(f"LFT_SWEEP_WAIT must be a number of seconds (0 or more), got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------------
# A saved flow's own settings (the app's "Resume a flow")


def saved_train_config(config: dict, model: str | None = None) -> TrainConfig:
    """The TrainConfig a saved flow was trained with (its config.json), named after it, to resume it with
    ``cli_args() + ["--resume"]``. ``model``: the spec to load its teacher by (config.json holds the model id).
    Settings an old flow did not record keep their defaults, except distillation (then off: it predates it)."""
    kw = {f.name: config[f.name] for f in fields(TrainConfig) if f.name in config}
    kw.setdefault("distill_steps", 0)
    kw["name"] = config.get("name")
    if model is not None:
        kw["model"] = model
    try:
        return TrainConfig(**kw)
    except (TypeError, ValueError) as e:
        raise LFTError(f"flow {config.get('name')!r}: its settings cannot be read back ({e})") from None
