"""Recoupling: how far the straight-path pairing of a span's tokens is from optimal transport.

The maths (numpy, float64), on token pairs (x0_i, x1_i) = (h_m, h_n) of a span [m, n):

* Recoupling ratio: σ = argmin over permutations of Σ_i ‖x0_i − x1_σ(i)‖² (exact, Hungarian-type solver);
  R = #{i : σ(i) ≠ i} / n. R = 0 means straight paths agree with the teacher's pairing; a high R means
  flow matching will *recouple* tokens (its marginal paths average over crossing pairs).
* Sinkhorn recoupling: the same question under entropic OT (a soft, cheaper-to-scale variant).
* Recoupling grid: R for every span (m, n) of a model, from cached hidden states (``recoupling_for_model``),
  persisted per all-layer cache entry so every page and process reads it back (``recoupling_grid_cached``).

Where the pairing breaks, token pair by token pair, is ``crossings``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

from lft_core.data.activations import ActivationCache, ensure_activations
from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.data.corpus import load_corpus
from lft_core.analysis.metrics import MetricError, as_float64
from lft_core.span import Span, all_spans, grid_json

if TYPE_CHECKING:
    from lft_core.model.teacher import Teacher

def pair_arrays(x0: Any, x1: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_float64(x0, "x0"), as_float64(x1, "x1")
    if a.ndim != 2 or a.shape != b.shape:
        raise MetricError(f"expected x0 and x1 of the same shape (n, d), got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise MetricError("x0 / x1 contain non-finite values (inf or NaN); float16 overflow in the cache?")
    return a, b


def sq_cost(a: np.ndarray, b: np.ndarray, sq_a: np.ndarray | None = None, sq_b: np.ndarray | None = None) -> np.ndarray:
    """C[i, j] = ‖a_i‖² + ‖b_j‖² − 2 a_i·b_j, clamped ≥ 0. a: (n, d), b: (k, d) float64 -> (n, k)."""
    if sq_a is None:
        sq_a = np.einsum("nd,nd->n", a, a)
    if sq_b is None:
        sq_b = np.einsum("nd,nd->n", b, b)
    cost = a @ b.T
    cost *= -2.0
    cost += sq_a[:, None]
    cost += sq_b[None, :]
    np.maximum(cost, 0.0, out=cost)
    return cost


def cost_matrix(x0: Any, x1: Any) -> np.ndarray:
    """Squared Euclidean costs C[i, j] = ‖x0_i − x1_j‖², shape (n, n), float64, clamped ≥ 0.

    x0, x1: shape (n, d). Uses ‖a‖² + ‖b‖² − 2a·b (one matrix product).
    """
    a, b = pair_arrays(x0, x1)
    return sq_cost(a, b)


@dataclass(frozen=True)
class Recoupling:
    """Exact recoupling of n token pairs.

    ratio:      R = #{i : σ(i) ≠ i} / n, in [0, 1].
    assignment: σ, shape (n,), int: token i's optimal target is x1_σ(i).
    n:          number of token pairs.
    """

    ratio: float
    assignment: np.ndarray
    n: int


def _ratio_from_cost(cost: np.ndarray) -> tuple[float, np.ndarray]:
    rows, cols = linear_sum_assignment(cost)
    sigma = np.empty(cost.shape[0], dtype=np.int64)
    sigma[rows] = cols
    return float(np.mean(sigma != np.arange(cost.shape[0]))), sigma


def recoupling_ratio(x0: Any, x1: Any) -> Recoupling:
    """Recoupling ratio of pairs (x0_i, x1_i): the fraction of tokens the optimal coupling re-pairs.

    σ = argmin_{σ ∈ S_n} Σ_i ‖x0_i − x1_σ(i)‖², solved exactly with scipy's linear_sum_assignment on the
    float64 cost matrix; R = #{i : σ(i) ≠ i} / n.

    x0, x1: shape (n, d), n ≥ 1 (torch or numpy).
    """
    a, b = pair_arrays(x0, x1)
    if a.shape[0] < 1:
        raise MetricError("the recoupling ratio needs at least one token pair")
    ratio, sigma = _ratio_from_cost(sq_cost(a, b))
    return Recoupling(ratio=ratio, assignment=sigma, n=a.shape[0])


@dataclass(frozen=True)
class SinkhornRecoupling:
    """Entropic-OT recoupling of n token pairs.

    ratio:      fraction of rows i whose largest plan entry is not in column i.
    plan:       transport plan π, shape (n, n), rows and columns summing to 1/n.
    eps:        the *effective* ε used (= relative eps · median of the cost matrix).
    iterations: Sinkhorn iterations run.
    converged:  whether the row-marginal error Σ_i |Σ_j π_ij − 1/n| fell below tol within max_iter.
    """

    ratio: float
    plan: np.ndarray
    eps: float
    iterations: int
    converged: bool


def sinkhorn_recoupling(x0: Any, x1: Any, eps: float = 0.05, max_iter: int = 2000, tol: float = 1e-6) -> SinkhornRecoupling:
    """Recoupling under entropic optimal transport (log-domain Sinkhorn, uniform marginals 1/n).

    π = argmin_{π ∈ Π(1/n, 1/n)} ⟨π, C⟩ − ε_eff H(π), C[i, j] = ‖x0_i − x1_j‖², solved by alternating
    f_i = ε_eff (log(1/n) − logsumexp_j((g_j − C_ij)/ε_eff)),  g_j = ε_eff (log(1/n) − logsumexp_i((f_i − C_ij)/ε_eff)),
    π_ij = exp((f_i + g_j − C_ij)/ε_eff).

    eps is RELATIVE: ε_eff = eps · median(C) (so the same eps works for hidden states of any scale; if the
    median is 0, the mean of C is used, and 1 if C is all zeros). Small eps approaches the exact assignment.
    Converged when the misplaced mass Σ_i |Σ_j π_ij − 1/n| < tol (π has total mass 1; columns are exact after
    each g update). ratio = fraction of rows with argmax_j π_ij ≠ i.

    x0, x1: shape (n, d).
    """
    if not eps > 0:
        raise MetricError(f"Sinkhorn eps must be > 0, got {eps}")
    a, b = pair_arrays(x0, x1)
    n = a.shape[0]
    if n < 1:
        raise MetricError("Sinkhorn recoupling needs at least one token pair")
    cost = sq_cost(a, b)
    scale = float(np.median(cost))
    if scale <= 0:
        scale = float(np.mean(cost)) or 1.0
    eps_eff = eps * scale
    c = cost / eps_eff  # work in units of ε_eff: potentials f/ε, g/ε
    log_marginal = -np.log(n)
    f = np.zeros(n)
    g = np.zeros(n)
    lse_rows = logsumexp(-c, axis=1)  # logsumexp_j(g_j − c_ij) for the current g
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        f = log_marginal - lse_rows
        g = log_marginal - logsumexp(f[:, None] - c, axis=0)
        # Columns are exact after the g update; the rows' total misplaced mass says how far we are.
        lse_rows = logsumexp(g[None, :] - c, axis=1)
        if np.sum(np.abs(np.exp(f + lse_rows) - 1.0 / n)) < tol:
            converged = True
            break
    plan = np.exp(f[:, None] + g[None, :] - c)
    ratio = float(np.mean(np.argmax(plan, axis=1) != np.arange(n)))
    return SinkhornRecoupling(ratio=ratio, plan=plan, eps=eps_eff, iterations=iterations, converged=converged)


# --------------------------------------------------------------------------------------------------------------
# Recoupling grid over all spans
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecouplingGrid:
    """Recoupling ratio for many spans [m, n) of one model.

    matrix:      shape (L+1, L+1), float; matrix[m, n] = R of span [m, n); NaN where m ≥ n or not computed.
    n_layers:    L (number of blocks).
    pairs:       number of token pairs used for every span.
    token_index: shape (pairs, 2), int: the (window, position) of every sampled token (same for all spans).
    drop_first:  whether position 0 of each window (attention-sink tokens, huge norms) was excluded.
    seconds:     wall time of the computation.
    """

    matrix: np.ndarray
    n_layers: int
    pairs: int
    token_index: np.ndarray
    drop_first: bool
    seconds: float

    def to_json_matrix(self) -> list[list[float | None]]:
        """matrix as nested lists with None for NaN (JSON has no NaN)."""
        return grid_json(self.matrix)


_GRID_BLOCK_ELEMENTS = 8_000_000
"""Largest Gram block recoupling_grid builds at once (float64 entries, ~64 MB)."""


def _check_spans(spans: Sequence[tuple[int, int]] | None, n_layers: int) -> list[Span]:
    if spans is None:
        return all_spans(n_layers)
    out = [Span.of(span).check(n_layers, where=f" for a model of {n_layers} blocks") for span in spans]
    if not out:
        raise MetricError("no spans to compute")
    return out


def recoupling_grid(
    layer: Callable[[int], np.ndarray],
    n_layers: int,
    pairs: int = 512,
    spans: Sequence[tuple[int, int]] | None = None,
    drop_first: bool = True,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> RecouplingGrid:
    """Recoupling ratio R(m, n) for every span (all 0 ≤ m < n ≤ L when spans is None).

    layer(i) returns the cached hidden states h_i, shape (windows, seq_len, d) (typically an np.memmap of
    float16). One set of `pairs` distinct token positions is drawn (seeded, without replacement; position 0
    of each window excluded when drop_first) and used for every span, so the grid compares like with like.
    Each needed layer is read once (only the sampled rows, as float64); then for each span
    R(m, n) = recoupling_ratio(h_m[sample], h_n[sample]).

    progress(done, total) is called after each span.
    """
    start = time.perf_counter()
    if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
        raise MetricError(f"n_layers must be an integer >= 1, got {n_layers!r}")
    n_layers = int(n_layers)
    if isinstance(pairs, bool) or not isinstance(pairs, (int, np.integer)) or pairs < 2:
        raise MetricError(f"the recoupling ratio needs at least 2 token pairs, got pairs={pairs!r}")
    pairs = int(pairs)
    todo = _check_spans(spans, n_layers)
    needed = sorted({i for span in todo for i in span})

    rows: dict[int, np.ndarray] = {}
    shape: tuple[int, ...] | None = None
    token_index = np.zeros((0, 2), dtype=np.int64)
    for i in needed:
        h = layer(i)
        if h.ndim != 3:
            raise MetricError(f"layer {i} has shape {tuple(h.shape)}; expected (windows, seq_len, d)")
        if shape is None:
            shape = tuple(h.shape)
            windows, seq_len, _ = shape
            first = 1 if drop_first else 0
            per_window = seq_len - first
            available = windows * max(per_window, 0)
            if pairs > available:
                raise MetricError(
                    f"asked for {pairs} token pairs but only {available} tokens are available "
                    f"({windows} windows x {per_window} positions{' after dropping position 0' if drop_first else ''}); "
                    "use fewer pairs or cache more windows")
            flat = np.sort(np.random.default_rng(seed).choice(available, size=pairs, replace=False))
            token_index = np.stack([flat // per_window, flat % per_window + first], axis=1).astype(np.int64)
        elif tuple(h.shape) != shape:
            raise MetricError(f"layer {i} has shape {tuple(h.shape)} but layer {needed[0]} has {shape}; the cache is inconsistent")
        x = np.asarray(h[token_index[:, 0], token_index[:, 1]], dtype=np.float64)
        if not np.isfinite(x).all():
            raise MetricError(f"layer {i} has non-finite hidden states at the sampled tokens (float16 overflow?)")
        rows[i] = x
    sq = {i: np.einsum("nd,nd->n", x, x) for i, x in rows.items()}

    # Spans sharing a start m share one large matrix product x_m · [x_n1; x_n2; …]ᵀ (BLAS is ~3x faster on
    # one wide product than on many 512x512 ones), in blocks of at most _GRID_BLOCK_ELEMENTS entries.
    by_start: dict[int, list[int]] = {}
    for m, n in todo:
        by_start.setdefault(m, []).append(n)
    per_block = max(1, _GRID_BLOCK_ELEMENTS // (pairs * pairs))
    matrix = np.full((n_layers + 1, n_layers + 1), np.nan)
    done = 0
    for m, ends in by_start.items():
        for b in range(0, len(ends), per_block):
            block = ends[b:b + per_block]
            targets = np.concatenate([rows[n] for n in block]) if len(block) > 1 else rows[block[0]]
            gram = rows[m] @ targets.T  # (pairs, len(block) * pairs)
            for k, n in enumerate(block):
                cost = gram[:, k * pairs:(k + 1) * pairs]
                cost *= -2.0
                cost += sq[m][:, None]
                cost += sq[n][None, :]
                np.maximum(cost, 0.0, out=cost)
                matrix[m, n], _ = _ratio_from_cost(cost)
                done += 1
                if progress is not None:
                    progress(done, len(todo))
    return RecouplingGrid(matrix=matrix, n_layers=n_layers, pairs=pairs, token_index=token_index,
                          drop_first=bool(drop_first), seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------------------
# Analysis of a model over a corpus or a text
# --------------------------------------------------------------------------------------------------------------


def all_layer_cache(teacher: Teacher, corpus_spec: str = DEFAULT_CORPUS, seq_len: int = 128, windows: int = 16,
                    progress: bool = True, callback: Callable[[int, int], None] | None = None) -> ActivationCache:
    """The train-split cache with every layer 0..L (computed once, then read from disk)."""
    corpus = load_corpus(corpus_spec)
    return ensure_activations(teacher, corpus, seq_len, windows, range(teacher.n_layers + 1), "train",
                              progress=progress, callback=callback)


def recoupling_for_cache(cache: ActivationCache, pairs: int = 512, spans: Sequence[Span] | None = None,
                         drop_first: bool = True, seed: int = 0,
                         progress: Callable[[int, int], None] | None = None) -> RecouplingGrid:
    """R for every span (or the given ones) from an all-layer cache entry."""
    return recoupling_grid(cache.layer, cache.meta["n_layers"], pairs=pairs, spans=spans, drop_first=drop_first,
                           seed=seed, progress=progress)


def recoupling_for_model(teacher: Teacher, corpus_spec: str = DEFAULT_CORPUS, pairs: int = 512,
                         spans: Sequence[Span] | None = None, seq_len: int = 128, windows: int = 16,
                         drop_first: bool = True, seed: int = 0,
                         progress: Callable[[int, int], None] | None = None) -> RecouplingGrid:
    """R for every span (or the given ones) from one all-layer cache of the corpus (computed when missing)."""
    cache = all_layer_cache(teacher, corpus_spec, seq_len, windows)
    return recoupling_for_cache(cache, pairs, spans, drop_first, seed, progress)


# Persisted grids: the full grid of an all-layer cache entry, computed once and read back by every page, job and
# process (cache/grids/recoupling-<entry key>-p<pairs>-s<seed>-<drop|keep>.json, written atomically).

GRID_FILE_VERSION = 1


def recoupling_grid_path(key: str, pairs: int, seed: int = 0, drop_first: bool = True) -> Path:
    """Where the persisted full recoupling grid of cache entry ``key`` with these settings lives."""
    from lft_core.paths import cache_dir

    return cache_dir("grids") / f"recoupling-{key}-p{int(pairs)}-s{int(seed)}-{'drop' if drop_first else 'keep'}.json"


def read_recoupling_grid(entry: ActivationCache, pairs: int, seed: int = 0,
                         drop_first: bool = True) -> RecouplingGrid | None:
    """The persisted full grid of ``entry`` with these settings, or None when there is none, it is damaged, or it
    was computed from an earlier build of the entry (the entry's ``created`` stamp differs). Computes nothing."""
    from lft_core.atomic import DamagedRecord, read_record

    path = recoupling_grid_path(entry.key, pairs, seed, drop_first)
    try:
        data = read_record(path, {"version": int, "entry_created": str, "n_layers": int, "pairs": int,
                                  "matrix": list, "token_index": list, "seconds": (int, float)})
        L = data["n_layers"]
        if (data["version"] != GRID_FILE_VERSION or data["entry_created"] != str(entry.meta.get("created"))
                or L != entry.meta.get("n_layers") or data["pairs"] != int(pairs)
                or data.get("seed") != int(seed) or data.get("drop_first") != bool(drop_first)):
            return None
        matrix = np.array([[np.nan if v is None else float(v) for v in row] for row in data["matrix"]], dtype=float)
        token_index = np.asarray(data["token_index"], dtype=np.int64).reshape(-1, 2)
    except (DamagedRecord, TypeError, ValueError):
        return None
    if matrix.shape != (L + 1, L + 1) or len(token_index) != int(pairs):
        return None
    return RecouplingGrid(matrix=matrix, n_layers=L, pairs=int(pairs), token_index=token_index,
                          drop_first=bool(drop_first), seconds=float(data["seconds"]))


def recoupling_grid_cached(entry: ActivationCache, pairs: int = 512, seed: int = 0, drop_first: bool = True,
                           progress: Callable[[int, int], None] | None = None) -> RecouplingGrid:
    """R of every span of an all-layer cache entry, as ``recoupling_for_cache`` computes it, computed once and
    persisted (``recoupling_grid_path``): later calls, from any process, read the file back (equal values,
    ``seconds`` is the original computation's). Two processes asking at once compute it once (a file lock);
    the file is written atomically, so a killed computation leaves nothing half-written."""
    from filelock import FileLock

    from lft_core.atomic import write_json

    grid = read_recoupling_grid(entry, pairs, seed, drop_first)
    if grid is not None:
        return grid
    path = recoupling_grid_path(entry.key, pairs, seed, drop_first)
    with FileLock(str(path.with_name(f".{path.name}.lock"))):
        grid = read_recoupling_grid(entry, pairs, seed, drop_first)  # computed by another process meanwhile
        if grid is not None:
            return grid
        grid = recoupling_for_cache(entry, pairs=pairs, drop_first=drop_first, seed=seed, progress=progress)
        write_json(path, {"version": GRID_FILE_VERSION, "kind": "recoupling", "entry": entry.key,
                          "entry_created": str(entry.meta.get("created")), "model": entry.meta.get("model"),
                          "n_layers": grid.n_layers, "pairs": grid.pairs, "seed": int(seed),
                          "drop_first": bool(drop_first), "seconds": round(grid.seconds, 4),
                          "matrix": grid.to_json_matrix(), "token_index": grid.token_index.tolist()})
    return grid

