"""Recipes: trained flows grouped over seeds, their statistics and training curves.

* ``group_flows``: flows whose settings differ only in seed (and name, and bookkeeping such as how often they were
  evaluated or checkpointed) form a ``FlowGroup``, a *recipe*; ``FlowGroup.summary()`` gives mean, standard
  deviation and count of the members' held-out NMSE. Statistics over seeds use the sample standard deviation
  (n − 1 in the denominator; undefined, NaN, for one seed).
* ``history_curve`` / ``group_curves``: a flow's training curve against the step or the training time, and a
  recipe's mean ± std over its seeds.

This module only arranges saved flows' records (no model, no Streamlit); ``comparison`` arranges evaluations.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from lft_core.flow.store import SavedFlow, trained_on
from lft_core.span import Span


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
