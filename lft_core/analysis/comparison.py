"""Comparing trained flows: seeds grouped into recipes, skip-k at every position, and the paper's plot assembled.

* ``group_flows``: flows whose settings differ only in seed (and name, and bookkeeping such as how often they were
  evaluated or checkpointed) form a ``FlowGroup``, a *recipe*; ``FlowGroup.summary()`` gives mean, standard
  deviation and count of the members' held-out NMSE. Statistics over seeds use the sample standard deviation
  (n − 1 in the denominator; undefined, NaN, for one seed).
* ``history_curve`` / ``group_curves``: a flow's training curve against the step or the training time, and a
  recipe's mean ± std over its seeds.
* ``skip_kl_grid``: KL(teacher ‖ skip-k) and perplexity of removing k blocks from every start position (one
  pass per batch shares the blocks before each start), from which ``skip_in_span`` (the first k blocks of each
  span, once per span and k) and ``best_skips`` (the start with the lowest KL for each k) are read.
* ``evaluation_table`` / ``per_flow_table`` / ``group_evaluation`` / ``kl_vs_blocks``: the results of one
  evaluation arranged for a table (every baseline once), per flow, per recipe, and as the points of the paper's
  plot (KL against the number of blocks removed or replaced), the paper's own Pythia-410M numbers included as a
  reference.

The engine computes (``evaluation``, ``baselines``); this module only arranges. No Streamlit here.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

import torch

from lft_core.span import Span
from lft_core.flow.store import SavedFlow, trained_on

if TYPE_CHECKING:
    from lft_core.model.teacher import Teacher

# ---------------------------------------------------------------------------------------------------------
# Statistics over seeds


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (n − 1; NaN for fewer than two values) and count of some values."""

    mean: float
    std: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "n": self.n}

    def text(self, fmt: str = ".4f") -> str:
        """``0.1234 ± 0.0100`` (just the mean for one value, "–" for none)."""
        if self.n == 0:
            return "–"
        return f"{self.mean:{fmt}}" if self.n < 2 else f"{self.mean:{fmt}} ± {self.std:{fmt}}"


def mean_std(values: Iterable[float | None]) -> Stat:
    """The statistics of the finite values among ``values`` (None and NaN are left out)."""
    kept = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
    if len(kept) == 0:
        return Stat(math.nan, math.nan, 0)
    return Stat(float(kept.mean()), float(kept.std(ddof=1)) if len(kept) > 1 else math.nan, len(kept))


# ---------------------------------------------------------------------------------------------------------
# Recipes: flows that differ only in seed

PER_RUN = frozenset({"name", "seed", "sweep", "eval_every", "checkpoint_every"})
"""Settings of a ``TrainConfig`` that do not define the recipe: the name, the seed, the sweep it was started by
(a label: a sweep may hold several recipes), and how often the run was
evaluated or checkpointed (they change what is recorded, not what is learned)."""
EXTRA_KEYS = ("weights_hash",)
"""Config entries outside ``TrainConfig`` that still define the recipe (the exact teacher weights)."""


def recipe_fields() -> list[str]:
    """The config entries that two flows must share to be seeds of one recipe: every ``TrainConfig`` setting
    except ``PER_RUN`` (a setting added to training later joins the recipe by itself), and ``EXTRA_KEYS``."""
    from lft_core.flow.config import TrainConfig

    return [f.name for f in fields(TrainConfig) if f.name not in PER_RUN] + list(EXTRA_KEYS)


def _setting(config: Mapping[str, Any], name: str) -> Any:
    if name == "corpus":
        return trained_on(dict(config))
    if name == "span":
        span = config.get("span")
        return list(span) if isinstance(span, (list, tuple)) else span
    return config.get(name)


def recipe_key(config: Mapping[str, Any], names: Sequence[str] | None = None) -> tuple[tuple[str, str], ...]:
    """A hashable key of a flow's recipe: (setting, its JSON text) for every recipe setting. A setting missing
    from an older config counts as None (so it is not silently taken for today's default)."""
    names = recipe_fields() if names is None else names
    return tuple((n, json.dumps(_setting(config, n), sort_keys=True, default=str)) for n in names)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}:{value[1]}"
    return "–" if value is None else str(value)


@dataclass(frozen=True)
class FlowGroup:
    """Flows trained with one recipe and different seeds.

    ``key``: the recipe (see ``recipe_key``); ``settings``: the same as a dict of values; ``members``: the flows
    (by name); ``label``: a short, unique name for tables and legends (method, k, span, then the settings in which
    this recipe differs from the others it was grouped with, prefixed by the sweep's name when every member
    comes from one sweep)."""

    key: tuple[tuple[str, str], ...]
    settings: dict
    members: tuple[SavedFlow, ...]
    label: str = ""

    @property
    def span(self) -> Span:
        return self.members[0].span

    @property
    def method(self) -> str:
        return self.members[0].method

    @property
    def k(self) -> int | None:
        return self.members[0].k

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.members]

    @property
    def seeds(self) -> list[Any]:
        return [f.config.get("seed") for f in self.members]

    @property
    def sweep(self) -> str | None:
        """The sweep's name (``config["sweep"]``) when every member comes from the same sweep."""
        sweeps = {f.config.get("sweep") for f in self.members}
        return sweeps.pop() if len(sweeps) == 1 and None not in sweeps else None

    def nmse(self) -> Stat:
        """Held-out NMSE (the last of each member's training history) over the seeds."""
        return mean_std(f.last_nmse for f in self.members)

    def summary(self) -> dict[str, float | int]:
        """``{"mean", "std", "n"}`` of the members' held-out NMSE (n counts the members that have one)."""
        return self.nmse().as_dict()


def group_flows(flows: Iterable[SavedFlow]) -> list[FlowGroup]:
    """The recipes among ``flows`` (unreadable records left out), in the order of their first member; members
    keep the given order."""
    names = recipe_fields()
    by_key: dict[tuple, list[SavedFlow]] = {}
    for f in flows:
        if f.error is None and f.span is not None:
            by_key.setdefault(recipe_key(f.config, names), []).append(f)
    settings = {key: {n: json.loads(v) for n, v in key} for key in by_key}
    shown = [n for n in names if n not in ("method", "k", "span", "model", "weights_hash")]
    varying = [n for n in shown if len({json.dumps(s[n], sort_keys=True) for s in settings.values()}) > 1]
    groups, seen = [], {}
    for key, members in by_key.items():
        s = settings[key]
        first = members[0]
        label = f"{first.method.upper()} k={_fmt(first.k)} · span {first.span}"
        if varying:
            label += " · " + ", ".join(f"{n}={_fmt(s[n])}" for n in varying)
        sweeps = {f.config.get("sweep") for f in members}
        if len(sweeps) == 1 and None not in sweeps:
            label = f"{sweeps.pop()}: {label}"
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # differs only in settings not shown (the teacher's weights)
            label += f" #{seen[label]}"
        groups.append(FlowGroup(key, s, tuple(members), label))
    return groups


def group_of(groups: Sequence[FlowGroup]) -> dict[str, FlowGroup]:
    """flow name -> its group."""
    return {name: g for g in groups for name in g.names}


def groups_table(groups: Sequence[FlowGroup]) -> pd.DataFrame:
    """One row per recipe: label, span, blocks replaced, method, k, steps, seeds, n, held-out NMSE mean / std."""
    rows = []
    for g in groups:
        stat = g.nmse()
        rows.append({"recipe": g.label, "span": str(g.span), "blocks": g.span.blocks, "method": g.method, "k": g.k,
                     "steps": g.settings.get("steps"), "distill steps": g.settings.get("distill_steps"),
                     "seeds": ", ".join(_fmt(s) for s in g.seeds), "n": len(g.members),
                     "held-out NMSE": stat.text(), "NMSE mean": stat.mean, "NMSE std": stat.std,
                     "flows": ", ".join(g.names)})
    return pd.DataFrame(rows, columns=["recipe", "span", "blocks", "method", "k", "steps", "distill steps", "seeds",
                                       "n", "held-out NMSE", "NMSE mean", "NMSE std", "flows"])


# ---------------------------------------------------------------------------------------------------------
# Training curves against step or time

X_AXES = ("step", "seconds")
TIME_FIELDS = ("elapsed_s", "seconds", "elapsed")
"""Per-event fields holding the seconds since the run started (training records ``elapsed_s``); the app's
``figures.training_curves(x="seconds")`` reads the same list."""


def history_seconds(flow: SavedFlow) -> tuple[np.ndarray, str] | None:
    """The training time at each event of ``flow.history`` and how it was obtained, or None.

    A recorded elapsed time (one of ``TIME_FIELDS`` in every event) is used as it is ("recorded"). Otherwise the
    time is the running sum of each step's measured duration, which every event records as its throughput:
    duration = tokens of the step / ``tokens_per_s`` (tokens = windows per step × ``seq_len``; distillation steps
    use ``distill_batch``). That sum counts the optimiser steps only, not the held-out evaluations or the
    checkpoint writes ("summed step times")."""
    history = flow.history
    if not history:
        return None
    for name in TIME_FIELDS:
        if all(isinstance(e.get(name), (int, float)) for e in history):
            return np.array([float(e[name]) for e in history]), "recorded"
    cfg = flow.config
    seq_len, batch = cfg.get("seq_len"), cfg.get("batch")
    if not all(isinstance(v, int) and v > 0 for v in (seq_len, batch)):
        return None
    distill = cfg.get("distill_batch") if isinstance(cfg.get("distill_batch"), int) else batch
    durations = []
    for e in history:
        rate = e.get("tokens_per_s")
        if not isinstance(rate, (int, float)) or not rate > 0:
            return None
        durations.append((distill if e.get("stage") == "distill" else batch) * seq_len / float(rate))
    return np.cumsum(durations), "summed step times"


def history_curve(flow: SavedFlow, metric: str, x: str = "step") -> pd.DataFrame | None:
    """Columns x, y of ``metric`` ("loss" or "heldout_nmse") over a flow's history, against the step or the
    training time (``history_seconds``); None when the history has no such values (or no time)."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    history = flow.history
    if x == "seconds":
        timed = history_seconds(flow)
        if timed is None:
            return None
        xs = timed[0]
    else:
        xs = np.array([e.get("step", i + 1) for i, e in enumerate(history)], dtype=np.float64)
    keep = [i for i, e in enumerate(history) if isinstance(e.get(metric), (int, float))]
    if not keep:
        return None
    return pd.DataFrame({"x": xs[keep], "y": [float(history[i][metric]) for i in keep]})


def ema(values: Sequence[float], alpha: float = 0.1) -> np.ndarray:
    """Exponential moving average (the smoothing of the training-loss plots)."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return np.array(out, dtype=np.float64)


SMOOTH_ABOVE = 30
"""Loss curves longer than this are smoothed (``ema``) before seeds are averaged."""


def group_curves(group: FlowGroup, metric: str, x: str = "step", points: int = 200) -> pd.DataFrame | None:
    """A recipe's curve of ``metric``: columns x, mean, std, n over its seeds (std NaN where n < 2).

    Seeds are put on one x grid: the union of their x values (thinned to about ``points``) inside the range
    every seed covers, each seed linearly interpolated there. Against the step, seeds of one recipe share their
    steps, so nothing is interpolated. Long loss curves are smoothed per seed first. None when no member has
    the curve."""
    curves = [c for c in (history_curve(f, metric, x) for f in group.members) if c is not None and len(c)]
    if not curves:
        return None
    if metric == "loss":
        curves = [c.assign(y=ema(c["y"])) if len(c) > SMOOTH_ABOVE else c for c in curves]
    lo, hi = max(c["x"].min() for c in curves), min(c["x"].max() for c in curves)
    if len(curves) > 1 and lo > hi:  # no common range (cannot happen with steps, which all start at 1)
        curves = curves[:1]
        lo, hi = curves[0]["x"].min(), curves[0]["x"].max()
    grid = np.unique(np.concatenate([c["x"].to_numpy() for c in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if len(grid) > points:
        grid = grid[np.unique(np.linspace(0, len(grid) - 1, points).round().astype(int))]
    ys = np.stack([np.interp(grid, c["x"].to_numpy(), c["y"].to_numpy()) for c in curves])
    n = len(curves)
    return pd.DataFrame({"x": grid, "mean": ys.mean(0), "std": ys.std(0, ddof=1) if n > 1 else np.nan, "n": n})


def curves_frame(groups: Sequence[FlowGroup], x: str = "step") -> pd.DataFrame:
    """Every recipe's loss and held-out NMSE curves in one long table: columns recipe, metric, x, mean, std, n."""
    parts = []
    for g in groups:
        for metric in ("loss", "heldout_nmse"):
            curve = group_curves(g, metric, x)
            if curve is not None:
                parts.append(curve.assign(recipe=g.label, metric=metric))
    if not parts:
        return pd.DataFrame(columns=["recipe", "metric", "x", "mean", "std", "n"])
    return pd.concat(parts, ignore_index=True)[["recipe", "metric", "x", "mean", "std", "n"]]


# ---------------------------------------------------------------------------------------------------------
# Skip-k at every position


@dataclass(frozen=True)
class SkipKL:
    """Blocks start … start + k − 1 removed: mean KL(teacher ‖ skip) per token and perplexity."""

    k: int
    start: int
    kl: float
    ppl: float


def skip_starts(n_layers: int, k: int) -> range:
    """Every position k blocks can be removed from."""
    return range(0, n_layers - k + 1)


def grid_starts(n_layers: int, ks: Sequence[int], spans: Iterable[Span] | None = None) -> list[int]:
    """The start positions a skip grid visits: every position (``spans`` None), or only the spans' first blocks."""
    if spans is None:
        return list(range(0, n_layers - min(ks) + 1)) if ks else []
    return sorted({Span.of(s).m for s in spans})


@torch.no_grad()
def skip_kl_grid(teacher: Teacher, ids: torch.Tensor, ks: Sequence[int], starts: Sequence[int] | None = None,
                 batch: int = 8, progress: Callable[[int, int], None] | None = None) -> list[SkipKL]:
    """KL(teacher ‖ skip) per token and perplexity of removing k blocks from each start (every position when
    ``starts`` is None), for each k in ``ks`` that fits, on ``ids`` (windows, seq_len).

    The same numbers as ``evaluation.skip_rows``, computed for many positions at once: per batch of windows, one
    pass records the teacher's logits and its hidden states h_s at every start; removing blocks s … s + k − 1 is
    then h_s run on through blocks s + k … L − 1 (``Teacher.logits_from_state``), so the blocks before s are not
    recomputed for every skip. Memory: the hidden states of one batch at every start, and two batches of logits.
    ``progress(done, total)`` after each (batch, start); total = batches × starts."""
    from lft_core.errors import LFTError
    from lft_core.analysis.metrics import kl_per_token, nll_per_token

    L = teacher.n_layers
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise LFTError(f"skip k must be at least 1, got {ks}")
    starts = grid_starts(L, ks) if starts is None else sorted({int(s) for s in starts})
    if any(not 0 <= s < L for s in starts):
        raise LFTError(f"skip starts must lie in 0..{L - 1}, got {starts}")
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise LFTError("skip-k needs token windows of at least 2 tokens")
    cells = [(s, k) for s in starts for k in ks if s + k <= L]
    kl_sum = dict.fromkeys(cells, 0.0)
    nll_sum = dict.fromkeys(cells, 0.0)
    tokens = predictions = 0
    dtype = next(teacher.model.parameters()).dtype
    batches = range(0, len(ids), batch)
    done, total = 0, len(batches) * len(starts)
    for b in batches:
        part = ids[b : b + batch]
        ref = teacher.logits(part)
        states = teacher.hidden_states(part, starts) if starts else {}
        for s in starts:
            h = states[s].to(teacher.device, dtype)
            for k in ks:
                if s + k > L:
                    continue
                logits = teacher.logits_from_state(part, h, s + k)
                kl_sum[(s, k)] += float(kl_per_token(ref, logits).double().sum())
                nll_sum[(s, k)] += float(nll_per_token(logits, part.to(logits.device)).double().sum())
                del logits
            done += 1
            if progress is not None:
                progress(done, total)
        tokens += part.numel()
        predictions += part.shape[0] * (part.shape[1] - 1)
        del ref, states
    out = [SkipKL(k, s, kl_sum[(s, k)] / tokens, float(np.exp(nll_sum[(s, k)] / predictions))) for s, k in cells]
    broken = [f"skip {r.k} at {r.start}" for r in out if not (math.isfinite(r.kl) and math.isfinite(r.ppl))]
    if broken:
        raise LFTError(f"{', '.join(broken[:3])} gave non-finite KL or perplexity on this text")
    return out


def skip_in_span(grid: Iterable[SkipKL], spans: Iterable[Span | tuple[int, int]], max_k: int | None = None
                 ) -> list[dict]:
    """Skip-k inside each span (its first k blocks, k ≤ n − m), one row per (span, k) however many flows share
    the span: dicts with span, k, start, KL, PPL."""
    at = {(r.start, r.k): r for r in grid}
    rows, seen = [], set()
    for span in sorted({Span.of(s) for s in spans}):
        m, n = span
        for k in range(1, n - m + 1):
            if (max_k is not None and k > max_k) or (span, k) in seen or (m, k) not in at:
                continue
            seen.add((span, k))
            r = at[(m, k)]
            rows.append({"span": str(span), "k": k, "start": m, "KL": r.kl, "PPL": r.ppl})
    return rows


def best_skips(grid: Iterable[SkipKL], min_starts: int = 2) -> dict[int, SkipKL]:
    """For each k, the start with the lowest KL, among k's measured starts; a k measured at fewer than
    ``min_starts`` positions has no "best" position."""
    by_k: dict[int, list[SkipKL]] = {}
    for r in grid:
        by_k.setdefault(r.k, []).append(r)
    return {k: min(rs, key=lambda r: r.kl) for k, rs in sorted(by_k.items()) if len(rs) >= min_starts}


# ---------------------------------------------------------------------------------------------------------
# One evaluation, arranged


PAPER = pd.DataFrame([
    {"what": "FM flow", "x": 6, "KL": 0.407, "label": "paper, Pythia-410M: flow matching replacing 6 blocks"},
    {"what": "skip-k", "x": 2, "KL": 0.529, "label": "paper, Pythia-410M: skipping 2 blocks"},
    {"what": "FW flow", "x": 12, "KL": 0.736, "label": "paper, Pythia-410M: Flow Walking replacing 12 blocks"},
    {"what": "skip-k", "x": 3, "KL": 0.932, "label": "paper, Pythia-410M: skipping 3 blocks"},
])
"""The paper's reference numbers (arXiv 2505.14513, Pythia-410M, 24 blocks; KL of the LM's logits): a different
model and text, shown for orientation only."""

EVAL_COLUMNS = ["row", "name", "span", "blocks", "steps", "k", "start", "KL", "PPL", "NMSE"]


def evaluation_table(flow_rows: Sequence[Mapping], affine_rows: Sequence[Mapping], skip_rows: Sequence[Mapping],
                     best: Mapping[int, SkipKL]) -> pd.DataFrame:
    """The table of one evaluation with every result once: one row per flow (its LFT at its own k), per affine
    baseline (one per span and training data), per skip-k inside a span (per span and k) and per skip-k at its
    best position (per k). Columns: row (which kind), name, span (skip-k: the blocks removed), blocks (replaced
    or removed), steps (a flow's integration steps; the affine map is one step), k (skip-k), start (skip-k's
    first removed block), KL, PPL, NMSE.

    flow_rows: dicts with flow, span, k, KL, PPL, NMSE; affine_rows: dicts with name, span, KL, PPL, NMSE;
    skip_rows: ``skip_in_span`` rows."""
    rows = []
    for r in flow_rows:
        rows.append({"row": "flow", "name": r["flow"], "span": r["span"], "blocks": Span.parse(r["span"]).blocks,
                     "steps": r["k"], "KL": r["KL"], "PPL": r["PPL"], "NMSE": r.get("NMSE")})
    for r in affine_rows:
        rows.append({"row": "affine", "name": r["name"], "span": r["span"], "blocks": Span.parse(r["span"]).blocks,
                     "steps": 1, "KL": r["KL"], "PPL": r["PPL"], "NMSE": r.get("NMSE")})
    for r in skip_rows:
        rows.append({"row": "skip-k in span", "name": f"skip {r['k']} at {r['start']}", "span": r["span"],
                     "blocks": r["k"], "k": r["k"], "start": r["start"], "KL": r["KL"], "PPL": r["PPL"]})
    for k, r in sorted(best.items()):
        rows.append({"row": "skip-k best position", "name": f"skip {k} at {r.start}",
                     "span": str(Span(r.start, r.start + k)), "blocks": k, "k": k, "start": r.start, "KL": r.kl,
                     "PPL": r.ppl})
    table = pd.DataFrame(rows, columns=EVAL_COLUMNS)
    return table.astype({c: "Int64" for c in ("blocks", "steps", "k", "start")}).astype({"NMSE": "float64"})


def per_flow_table(flow_rows: Sequence[Mapping], affine_of: Mapping[str, Mapping], skip_rows: Sequence[Mapping],
                   teacher_ppl: float | None) -> pd.DataFrame:
    """Each flow with the baselines it is judged against (its affine baseline, skip-k inside its span): columns
    flow, span, model ("LFT k=3", "affine", "skip 1", ...), KL, PPL, NMSE, teacher PPL. Baselines shared by
    several flows appear under each of them here (a join: each was computed once)."""
    out = []
    for r in flow_rows:
        name, span = r["flow"], r["span"]
        out.append({"flow": name, "span": span, "model": f"LFT k={r['k']}", "KL": r["KL"], "PPL": r["PPL"],
                    "NMSE": r.get("NMSE"), "teacher PPL": teacher_ppl})
        if name in affine_of:
            a = affine_of[name]
            out.append({"flow": name, "span": span, "model": "affine", "KL": a["KL"], "PPL": a["PPL"],
                        "NMSE": a.get("NMSE"), "teacher PPL": teacher_ppl})
        for s in skip_rows:
            if s["span"] == span:
                out.append({"flow": name, "span": span, "model": f"skip {s['k']}", "KL": s["KL"], "PPL": s["PPL"],
                            "NMSE": None, "teacher PPL": teacher_ppl})
    return pd.DataFrame(out, columns=["flow", "span", "model", "KL", "PPL", "NMSE", "teacher PPL"])


def group_evaluation(flow_rows: Sequence[Mapping], groups: Sequence[FlowGroup]) -> pd.DataFrame:
    """KL, perplexity and NMSE of the evaluated flows per recipe: mean, std over the evaluated seeds, n."""
    by_flow = {r["flow"]: r for r in flow_rows}
    rows = []
    for g in groups:
        evaluated = [by_flow[n] for n in g.names if n in by_flow]
        if not evaluated:
            continue
        kl, ppl, err = (mean_std(r.get(c) for r in evaluated) for c in ("KL", "PPL", "NMSE"))
        rows.append({"recipe": g.label, "span": str(g.span), "blocks": g.span.blocks, "k": evaluated[0]["k"],
                     "n": kl.n, "KL": kl.text(), "NMSE": err.text(), "PPL": ppl.text(".3f"),
                     "KL mean": kl.mean, "KL std": kl.std, "NMSE mean": err.mean, "NMSE std": err.std,
                     "PPL mean": ppl.mean, "flows": ", ".join(r["flow"] for r in evaluated)})
    return pd.DataFrame(rows, columns=["recipe", "span", "blocks", "k", "n", "KL", "NMSE", "PPL", "KL mean", "KL std",
                                       "NMSE mean", "NMSE std", "PPL mean", "flows"])


PLOT_COLUMNS = ["series", "kind", "x", "KL", "err", "n", "text", "reference"]


def kl_vs_blocks(flow_rows: Sequence[Mapping], groups: Sequence[FlowGroup], skip_rows: Sequence[Mapping],
                 best: Mapping[int, SkipKL], affine_rows: Sequence[Mapping] = (), paper: bool = True) -> pd.DataFrame:
    """The points of the paper's comparison, KL against the number of blocks removed (skip-k: k) or replaced (a
    flow or the affine map of span [m, n): n − m). Columns: series (legend), kind ("skip in span", "skip best",
    "flow", "affine", "paper"), x, KL, err (std over seeds; NaN for one), n (seeds), text (hover), reference
    (the paper's points, another model).

    Flows are points per recipe (mean ± std over its evaluated seeds), one series per method."""
    rows = []
    for s in skip_rows:
        rows.append({"series": "skip-k in span", "kind": "skip in span", "x": s["k"], "KL": s["KL"], "err": math.nan,
                     "n": 1, "text": f"skip {s['k']} at {s['start']} (first blocks of span {s['span']})",
                     "reference": False})
    for k, r in sorted(best.items()):
        rows.append({"series": "skip-k at its best position", "kind": "skip best", "x": k, "KL": r.kl,
                     "err": math.nan, "n": 1, "text": f"skip {k} at {r.start} (lowest KL of every start)",
                     "reference": False})
    by_flow = {r["flow"]: r for r in flow_rows}
    for g in groups:
        evaluated = [by_flow[n] for n in g.names if n in by_flow]
        if not evaluated:
            continue
        stat = mean_std(r["KL"] for r in evaluated)
        if stat.n == 0:
            continue
        seeds = f"{stat.n} seeds" if stat.n > 1 else "1 seed"
        members = ", ".join(r["flow"] for r in evaluated)
        rows.append({"series": f"trained flows ({g.method.upper()})", "kind": "flow", "x": g.span.blocks,
                     "KL": stat.mean, "err": stat.std, "n": stat.n, "text": f"{g.label} ({seeds}: {members})",
                     "reference": False})
    for a in affine_rows:
        rows.append({"series": "affine replacement", "kind": "affine", "x": Span.parse(a["span"]).blocks,
                     "KL": a["KL"], "err": math.nan, "n": 1, "text": f"{a['name']} (closed form)", "reference": False})
    if paper:
        for p in PAPER.itertuples():
            series = "paper, Pythia-410M: skip-k" if p.what == "skip-k" else "paper, Pythia-410M: trained flows"
            rows.append({"series": series, "kind": "paper", "x": p.x, "KL": p.KL, "err": math.nan, "n": 1,
                         "text": p.label, "reference": True})
    return pd.DataFrame(rows, columns=PLOT_COLUMNS)
