"""Comparing trained flows with the baselines: skip-k at every position, and one evaluation arranged for the
Compare page, down to the paper's plot. (Flows grouped over seeds into recipes: ``recipes``.)

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

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lft_core.analysis.baselines import get_baseline
from lft_core.analysis.recipes import FlowGroup, mean_std
from lft_core.flow.methods import METHODS
from lft_core.span import Span

if TYPE_CHECKING:
    from lft_core.model.teacher import Teacher

# ---------------------------------------------------------------------------------------------------------
# Skip-k at every position


@dataclass(frozen=True)
class SkipKL:
    """Blocks start … start + k − 1 removed: mean KL(teacher ‖ skip) per token and perplexity."""

    k: int
    start: int
    kl: float
    ppl: float

    @classmethod
    def of(cls, row: Mapping) -> SkipKL:
        """One row as saved in JSON (``dataclasses.asdict``): a persisted grid, an evaluation, the zoo's curve."""
        return cls(int(row["k"]), int(row["start"]), float(row["kl"]), float(row["ppl"]))


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


def evaluation_table(flow_rows: Sequence[Mapping], baseline_rows: Sequence[Mapping], skip_rows: Sequence[Mapping],
                     best: Mapping[int, SkipKL]) -> pd.DataFrame:
    """The table of one evaluation with every result once: one row per flow (its LFT at its own k), per fitted
    baseline (one per baseline, span and training data), per skip-k inside a span (per span and k) and per
    skip-k at its best position (per k). Columns: row (which kind: "flow", a baseline's name, "skip-k ..."),
    name, span (skip-k: the blocks removed), blocks (replaced or removed), steps (a flow's integration steps; a
    fitted baseline is one step), k (skip-k), start (skip-k's first removed block), KL, PPL, NMSE.

    flow_rows: dicts with flow, span, k, KL, PPL, NMSE; baseline_rows: dicts with baseline (its registered
    name), name, span, KL, PPL, NMSE; skip_rows: ``skip_in_span`` rows."""
    rows = []
    for r in flow_rows:
        rows.append({"row": "flow", "name": r["flow"], "span": r["span"], "blocks": Span.parse(r["span"]).blocks,
                     "steps": r["k"], "KL": r["KL"], "PPL": r["PPL"], "NMSE": r.get("NMSE")})
    for r in baseline_rows:
        rows.append({"row": r["baseline"], "name": r["name"], "span": r["span"],
                     "blocks": Span.parse(r["span"]).blocks, "steps": 1, "KL": r["KL"], "PPL": r["PPL"],
                     "NMSE": r.get("NMSE")})
    for r in skip_rows:
        rows.append({"row": "skip-k in span", "name": f"skip {r['k']} at {r['start']}", "span": r["span"],
                     "blocks": r["k"], "k": r["k"], "start": r["start"], "KL": r["KL"], "PPL": r["PPL"]})
    for k, r in sorted(best.items()):
        rows.append({"row": "skip-k best position", "name": f"skip {k} at {r.start}",
                     "span": str(Span(r.start, r.start + k)), "blocks": k, "k": k, "start": r.start, "KL": r.kl,
                     "PPL": r.ppl})
    table = pd.DataFrame(rows, columns=EVAL_COLUMNS)
    return table.astype({c: "Int64" for c in ("blocks", "steps", "k", "start")}).astype({"NMSE": "float64"})


def per_flow_table(flow_rows: Sequence[Mapping], baselines_of: Mapping[str, Sequence[Mapping]],
                   skip_rows: Sequence[Mapping], teacher_ppl: float | None) -> pd.DataFrame:
    """Each flow with the baselines it is judged against (its fitted baselines, skip-k inside its span): columns
    flow, span, model ("LFT k=3", "affine", "skip 1", ...), KL, PPL, NMSE, teacher PPL. Baselines shared by
    several flows appear under each of them here (a join: each was computed once). ``baselines_of``: flow name
    -> its baseline rows (dicts with baseline, KL, PPL, NMSE)."""
    out = []
    for r in flow_rows:
        name, span = r["flow"], r["span"]
        out.append({"flow": name, "span": span, "model": f"LFT k={r['k']}", "KL": r["KL"], "PPL": r["PPL"],
                    "NMSE": r.get("NMSE"), "teacher PPL": teacher_ppl})
        for a in baselines_of.get(name, ()):
            out.append({"flow": name, "span": span, "model": a["baseline"], "KL": a["KL"], "PPL": a["PPL"],
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
                 best: Mapping[int, SkipKL], baseline_rows: Sequence[Mapping] = (), paper: bool = True
                 ) -> pd.DataFrame:
    """The points of the paper's comparison, KL against the number of blocks removed (skip-k: k) or replaced (a
    flow or a fitted baseline of span [m, n): n − m). Columns: series (legend), kind ("skip in span", "skip best",
    "flow", a fitted baseline's name such as "affine", "paper"), x, KL, err (std over seeds; NaN for one), n
    (seeds), text (hover), reference (the paper's points, another model).

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
        method = METHODS[g.method].short if g.method in METHODS else g.method.upper()
        rows.append({"series": f"trained flows ({method})", "kind": "flow", "x": g.span.blocks,
                     "KL": stat.mean, "err": stat.std, "n": stat.n, "text": f"{g.label} ({seeds}: {members})",
                     "reference": False})
    for a in baseline_rows:
        baseline = get_baseline(a["baseline"])
        text = f"{a['name']} ({baseline.note})" if baseline.note else a["name"]
        rows.append({"series": baseline.label, "kind": baseline.name, "x": Span.parse(a["span"]).blocks,
                     "KL": a["KL"], "err": math.nan, "n": 1, "text": text, "reference": False})
    if paper:
        for p in PAPER.itertuples():
            series = "paper, Pythia-410M: skip-k" if p.what == "skip-k" else "paper, Pythia-410M: trained flows"
            rows.append({"series": series, "kind": "paper", "x": p.x, "KL": p.KL, "err": math.nan, "n": 1,
                         "text": p.label, "reference": True})
    return pd.DataFrame(rows, columns=PLOT_COLUMNS)


def zoo_curve_points(curve: Mapping, paper: bool = True) -> pd.DataFrame:
    """The points of the paper's plot from the zoo's shipped curve (``zoo.read_curve``): the shipped flows (one
    series per method), skip-k at its best position and the affine map of each shipped span, in the columns of
    ``kl_vs_blocks``."""
    best = {int(r["k"]): SkipKL.of(r) for r in curve.get("skip_best", [])}
    baseline_rows = [{"baseline": "affine", "name": f"affine {Span.of(a['span'])}", "span": str(Span.of(a["span"])),
                      "KL": float(a["kl"])} for a in curve.get("affine", [])]
    points = kl_vs_blocks([], [], [], best, baseline_rows, paper=paper)
    rows = []
    for r in curve.get("flows", []):
        method = METHODS[r["method"]].short if r["method"] in METHODS else str(r["method"]).upper()
        rows.append({"series": f"shipped flows ({method})", "kind": "flow", "x": int(r["blocks"]), "KL": float(r["kl"]),
                     "err": math.nan, "n": 1, "text": f"{r['flow']} (span {Span.of(r['span'])}, k={r['k']})",
                     "reference": False})
    return pd.concat([pd.DataFrame(rows, columns=PLOT_COLUMNS), points], ignore_index=True)
