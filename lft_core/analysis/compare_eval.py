"""A Compare evaluation as one unit of work, computed once and reused: what the Compare page (and the skip-k
reference of Choose a span) shows, run by ``python -m lft_core compare`` as a background job.

* ``skip_grid_cached``: KL and perplexity of removing k blocks at every position, on held-out windows: a property
  of the teacher, the text and k, computed once per (teacher weights, corpus content, windows, window length,
  ks) and persisted in ``cache/grids/skipkl-<key>.json`` (atomic, under a lock: two sessions compute it once);
* ``CompareRequest``: what an evaluation is asked for (flows, text, skip-k, baselines); ``request_key`` names its
  result from the flows' weight hashes and the teacher's, so a retrained flow is a new result;
* ``run_comparison``: the flows at their own k, each fitted baseline once per (span, training data), the skip
  grid; progress as (done, total, what); ``save_comparison`` / ``saved_comparison`` keep the result in
  ``cache/evaluations/<key>.json``.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lft_core.atomic import DamagedRecord, read_record, write_json
from lft_core.paths import cache_dir

if TYPE_CHECKING:
    from lft_core.analysis.comparison import SkipKL
    from lft_core.model.teacher import Teacher

Progress = Callable[[int, int, str], None]
"""``progress(done, total, what)``: units of work done of all, and what is running now."""


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _text_identity(teacher: Teacher, corpus_spec: str) -> dict:
    from lft_core.data.corpus import load_corpus, split_rule_of

    corpus = load_corpus(corpus_spec)
    return {"model": teacher.model_id, "weights_hash": teacher.weights_hash, "corpus": corpus.id,
            "content_hash": corpus.content_hash, "split_rule": split_rule_of(corpus_spec)}


# ---------------------------------------------------------------------------------------------------------
# Skip-k at every position, once


def skip_grid_path(teacher: Teacher, corpus_spec: str, windows: int, seq_len: int, ks: tuple[int, ...]) -> Path:
    key = _digest({**_text_identity(teacher, corpus_spec), "windows": windows, "seq_len": seq_len,
                   "ks": sorted(set(ks))})
    return cache_dir("grids") / f"skipkl-{key}.json"


def read_skip_grid(path: Path) -> list[SkipKL] | None:
    """The persisted grid, or None when absent or damaged."""
    from lft_core.analysis.comparison import SkipKL

    try:
        data = read_record(path, {"version": int, "rows": list})
        return [SkipKL.of(r) for r in data["rows"]]
    except (DamagedRecord, KeyError, TypeError, ValueError):
        return None


def skip_grid_cached(teacher: Teacher, corpus_spec: str, windows: int, seq_len: int, ks: tuple[int, ...],
                     progress: Callable[[int, int], None] | None = None) -> list[SkipKL]:
    """``comparison.skip_kl_grid`` at every start position on ``windows`` held-out windows of ``corpus_spec``,
    computed once and read back afterwards (from any process)."""
    from filelock import FileLock

    from lft_core.analysis.comparison import skip_kl_grid
    from lft_core.analysis.evaluation import eval_windows

    path = skip_grid_path(teacher, corpus_spec, windows, seq_len, ks)
    found = read_skip_grid(path)
    if found is not None:
        return found
    with FileLock(str(path) + ".lock"):
        found = read_skip_grid(path)  # computed by another process while this one waited
        if found is not None:
            return found
        t0 = time.perf_counter()
        ids = eval_windows(teacher, corpus_spec, None, windows, seq_len)
        rows = skip_kl_grid(teacher, ids, ks, progress=progress)
        write_json(path, {"version": 1, **_text_identity(teacher, corpus_spec), "windows": windows, "seq_len": seq_len,
                          "ks": sorted(set(ks)), "seconds": round(time.perf_counter() - t0, 2),
                          "rows": [asdict(r) for r in rows]})
    return rows


# ---------------------------------------------------------------------------------------------------------
# One evaluation


@dataclass(frozen=True)
class CompareRequest:
    """An evaluation of the Compare page: ``flows`` (saved names) at their own k, on ``windows`` held-out windows
    of ``seq_len`` tokens of ``corpus``, against skip-k for k = 1 … ``skip_max`` (in each span; at its best
    position when ``best``) and each of ``baselines`` (fitted on each flow's own training data)."""

    flows: tuple[str, ...]
    corpus: str
    windows: int = 4
    seq_len: int = 128
    skip_max: int = 3
    best: bool = True
    baselines: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(range(1, self.skip_max + 1))

    def cli_args(self) -> list[str]:
        """The ``python -m lft_core compare`` flags of this request."""
        return ["--flows", ",".join(self.flows), "--corpus", self.corpus, "--windows", str(self.windows),
                "--seq-len", str(self.seq_len), "--skip-max", str(self.skip_max),
                *([] if self.best else ["--no-best"]),
                *(["--baselines", ",".join(self.baselines)] if self.baselines else [])]


def request_key(request: CompareRequest, model_id: str, weights_hash: str, flow_hashes: dict[str, str]) -> str:
    """The name of this request's result: the teacher, the text, the settings and the flows' weights."""
    return _digest({"model": model_id, "weights_hash": weights_hash, **asdict(request),
                    "flows": sorted(request.flows), "weights": {n: flow_hashes.get(n) for n in sorted(request.flows)}})


def comparison_path(key: str) -> Path:
    return cache_dir("evaluations") / f"compare-{key}.json"


def saved_comparison(key: str) -> dict | None:
    """A finished evaluation's result, or None."""
    try:
        return read_record(comparison_path(key), {"flow_rows": list, "baseline_rows": list, "grid": list})
    except DamagedRecord:
        return None


def save_comparison(key: str, result: dict) -> Path:
    path = comparison_path(key)
    write_json(path, result)
    return path


def run_comparison(teacher: Teacher, request: CompareRequest, progress: Progress | None = None) -> dict:
    """The evaluation: rows per flow (KL, PPL, NMSE at its own k; the teacher's PPL), per fitted baseline of each
    (span, training data) with the flows it stands beside (``members``), and the skip grid (every start when
    ``best``, else the spans' first blocks only) as dicts. ``progress(done, total, what)`` after each unit."""
    from lft_core.analysis.baselines import FitData, prepare
    from lft_core.analysis.comparison import grid_starts
    from lft_core.analysis.evaluation import eval_windows, evaluate
    from lft_core.flow.store import open_flow, read_flow_config
    from lft_core.span import Span

    t0 = time.perf_counter()
    configs = {name: read_flow_config(name) for name in request.flows}
    fits: dict[tuple, list[str]] = {}
    for baseline in request.baselines:
        for name, config in configs.items():
            fits.setdefault((baseline, tuple(config["span"]), FitData.of_flow(config)), []).append(name)
    skip_units = teacher.n_layers if request.best else 0
    total = len(configs) + len(fits) + skip_units
    done = 0

    def tell(what: str) -> None:
        if progress is not None:
            progress(done, total, what)

    ids = eval_windows(teacher, request.corpus, None, request.windows, request.seq_len)
    flow_rows = []
    for i, name in enumerate(request.flows):
        tell(f"evaluating flow {name} ({i + 1} of {len(configs)})")
        flow, config = open_flow(name, teacher)
        flow.to(teacher.device)
        k = int(config.get("k", 3))
        result = evaluate(teacher, flow, None, ids, ks=[k], skips=[], best_skip=False)
        row = result.rows[0]
        flow_rows.append({"flow": name, "span": str(Span.of(flow.span)), "k": k, "KL": row.kl, "PPL": row.ppl,
                          "NMSE": row.nmse, "teacher PPL": result.teacher_ppl})
        done += 1
    baseline_rows = []
    for i, ((baseline, span, fit), members) in enumerate(fits.items()):
        tell(f"fitting and evaluating the {baseline} baseline of span {Span.of(span)} ({i + 1} of {len(fits)})")
        prepared = prepare(baseline, teacher, Span.of(span), fit, progress=False)
        row = evaluate(teacher, None, span, ids, ks=[], skips=[], best_skip=False, baselines=[prepared]).rows[0]
        same_span = [key for key in fits if key[:2] == (baseline, span)]
        label = f"{baseline} {Span.of(span)}" + (f" ({fit.corpus}, {fit.windows} × {fit.seq_len})"
                                                 if len(same_span) > 1 else "")
        baseline_rows.append({"baseline": baseline, "span": str(Span.of(span)), "KL": row.kl, "PPL": row.ppl,
                              "NMSE": row.nmse, "name": label, "members": members})
        done += 1
    if request.best:
        base = done

        def counted(d: int, t: int) -> None:
            if progress is not None:
                progress(base + int(skip_units * d / max(t, 1)), total, "skip-k at every position")

        tell("skip-k at every position")
        grid = skip_grid_cached(teacher, request.corpus, request.windows, request.seq_len, request.ks, counted)
        done += skip_units
    else:
        from lft_core.analysis.comparison import skip_kl_grid

        spans = sorted({Span.of(c["span"]) for c in configs.values()})
        tell("skip-k in the spans")
        grid = skip_kl_grid(teacher, ids, request.ks, grid_starts(teacher.n_layers, request.ks, spans))
    tell("done")
    return {"request": asdict(request), "flow_rows": flow_rows, "baseline_rows": baseline_rows,
            "grid": [asdict(r) for r in grid], "teacher": teacher.model_id, "weights_hash": teacher.weights_hash,
            "seconds": round(time.perf_counter() - t0, 2)}
