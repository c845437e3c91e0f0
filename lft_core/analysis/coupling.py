"""Coupling: how far the straight-path pairing of a span's tokens is from optimal transport, and where it breaks.

The maths (numpy, float64), on token pairs (x0_i, x1_i) = (h_m, h_n) of a span [m, n):

* Recoupling ratio: σ = argmin over permutations of Σ_i ‖x0_i − x1_σ(i)‖² (exact, Hungarian-type solver);
  R = #{i : σ(i) ≠ i} / n. R = 0 means straight paths agree with the teacher's pairing; a high R means
  flow matching will *recouple* tokens (its marginal paths average over crossing pairs).
* Sinkhorn recoupling: the same question under entropic OT (a soft, cheaper-to-scale variant).
* Recoupling grid: R for every span (m, n) of a model, from cached hidden states.
* Crossings: pairs (i, j) whose targets are cheaper swapped, with the time t* where their straight paths are
  closest and that distance.
* Flow-recoupled tokens: those a trained flow delivered nearer another token's target than their own.

The analysis composes it with the activation cache so that the CLI and the app ask one function each:
``recoupling_for_model`` (every span's R), ``span_coupling`` / ``text_coupling`` (a span's sampled pairs,
crossings, matching, and which tokens a trained flow recoupled) and ``coupling_view`` (what the Coupling
crossings page draws).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

from lft_core.data.activations import ActivationCache, ensure_activations
from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.data.corpus import load_corpus
from lft_core.errors import LFTError
from lft_core.flow.latent import LatentFlow, check_replaces
from lft_core.analysis.metrics import MetricError, as_float64
from lft_core.span import Span, all_spans, grid_json

if TYPE_CHECKING:
    import pandas as pd

    from lft_core.model.teacher import Teacher

MAX_CROSSING_TOKENS = 2000
"""crossings() looks at all n(n−1)/2 pairs; above this many tokens it refuses instead of eating memory."""

_ROWS_PER_CHUNK = 1024
"""Rows of a cost matrix handled at once by flow_recoupled (bounds memory at ~n·1024·8 bytes)."""




def _pair_arrays(x0: Any, x1: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_float64(x0, "x0"), as_float64(x1, "x1")
    if a.ndim != 2 or a.shape != b.shape:
        raise MetricError(f"expected x0 and x1 of the same shape (n, d), got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise MetricError("x0 / x1 contain non-finite values (inf or NaN); float16 overflow in the cache?")
    return a, b


def _sq_cost(a: np.ndarray, b: np.ndarray, sq_a: np.ndarray | None = None, sq_b: np.ndarray | None = None) -> np.ndarray:
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
    a, b = _pair_arrays(x0, x1)
    return _sq_cost(a, b)


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
    a, b = _pair_arrays(x0, x1)
    if a.shape[0] < 1:
        raise MetricError("the recoupling ratio needs at least one token pair")
    ratio, sigma = _ratio_from_cost(_sq_cost(a, b))
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
    a, b = _pair_arrays(x0, x1)
    n = a.shape[0]
    if n < 1:
        raise MetricError("Sinkhorn recoupling needs at least one token pair")
    cost = _sq_cost(a, b)
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
# Crossings
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crossings:
    """Pairs of tokens whose straight paths' targets are cheaper swapped.

    pairs:    shape (c, 2), int, i < j.
    delta:    shape (c,), cost decrease of swapping the targets:
              ‖x0_i−x1_i‖² + ‖x0_j−x1_j‖² − ‖x0_i−x1_j‖² − ‖x0_j−x1_i‖² (> 0).
    t_star:   shape (c,), in [0, 1]: time at which the two straight paths are closest.
    distance: shape (c,): that closest distance ‖p_i(t*) − p_j(t*)‖.
    n:        number of tokens.
    """

    pairs: np.ndarray
    delta: np.ndarray
    t_star: np.ndarray
    distance: np.ndarray
    n: int

    @property
    def involved(self) -> np.ndarray:
        """Shape (n,), bool: the tokens that are in at least one crossing."""
        out = np.zeros(self.n, dtype=bool)
        out[self.pairs[:, 0]] = True
        out[self.pairs[:, 1]] = True
        return out

    @property
    def share(self) -> float:
        """Fraction of the n tokens that are in at least one crossing."""
        return float(self.involved.mean()) if self.n else 0.0

    def to_frame(self) -> pd.DataFrame:
        """A pandas DataFrame with columns i, j, delta, t_star, distance (one row per crossing)."""
        import pandas as pd

        return pd.DataFrame({
            "i": self.pairs[:, 0], "j": self.pairs[:, 1],
            "delta": self.delta, "t_star": self.t_star, "distance": self.distance,
        })


_CROSS_RTOL = 1e-9
_CHUNK_PAIRS = 8192


def crossings(x0: Any, x1: Any) -> Crossings:
    """All crossing pairs of the straight-path coupling x0_i -> x1_i.

    (i, j) crosses when Δ_ij = ‖x0_i−x1_i‖² + ‖x0_j−x1_j‖² − ‖x0_i−x1_j‖² − ‖x0_j−x1_i‖²
    = −2 (x0_i − x0_j)·(x1_i − x1_j) > tol, with tol = 1e-9 · (‖x0_i‖² + ‖x0_j‖² + ‖x1_i‖² + ‖x1_j‖²).
    (In one dimension this is exactly "the two straight paths cross".)

    For a crossing pair, with straight paths p_i(t) = x0_i + t (x1_i − x0_i), the difference is
    D(t) = a + t b, a = x0_i − x0_j, b = (x1_i − x0_i) − (x1_j − x0_j); ‖D(t)‖² is a quadratic in t, minimal at
    t* = clip(−a·b / ‖b‖², 0, 1) (t* = 0 if b = 0); distance = ‖a + t* b‖.

    x0, x1: shape (n, d) with n ≤ 2000 (all pairs are examined).
    """
    a0, a1 = _pair_arrays(x0, x1)
    n = a0.shape[0]
    if n > MAX_CROSSING_TOKENS:
        raise MetricError(f"crossings examines all token pairs; {n} tokens is too many (the limit is "
                          f"{MAX_CROSSING_TOKENS}); pick fewer tokens")
    # Δ_ij = 2 (G_ij + G_ji − G_ii − G_jj), G = x0 · x1ᵀ.
    gram = a0 @ a1.T
    diag = np.diag(gram)
    delta_all = 2.0 * (gram + gram.T - diag[:, None] - diag[None, :])
    sq = np.einsum("nd,nd->n", a0, a0) + np.einsum("nd,nd->n", a1, a1)
    tol = _CROSS_RTOL * (sq[:, None] + sq[None, :]) + 1e-300
    mask = np.triu(delta_all > tol, k=1)
    ii, jj = np.nonzero(mask)
    delta = delta_all[ii, jj]
    del gram, delta_all, tol, mask

    v = a1 - a0
    t_star = np.empty(ii.shape[0])
    distance = np.empty(ii.shape[0])
    for s in range(0, ii.shape[0], _CHUNK_PAIRS):
        i, j = ii[s:s + _CHUNK_PAIRS], jj[s:s + _CHUNK_PAIRS]
        a = a0[i] - a0[j]
        b = v[i] - v[j]
        bb = np.einsum("cd,cd->c", b, b)
        ab = np.einsum("cd,cd->c", a, b)
        t = np.zeros_like(bb)
        nz = bb > 0
        t[nz] = np.clip(-ab[nz] / bb[nz], 0.0, 1.0)
        closest = a + t[:, None] * b
        t_star[s:s + _CHUNK_PAIRS] = t
        distance[s:s + _CHUNK_PAIRS] = np.sqrt(np.einsum("cd,cd->c", closest, closest))
    return Crossings(pairs=np.stack([ii, jj], axis=1).astype(np.int64).reshape(-1, 2), delta=delta,
                     t_star=t_star, distance=distance, n=n)


def flow_recoupled(x_hat: Any, x1: Any) -> np.ndarray:
    """Which tokens the flow delivered closer to another token's target than to their own.

    out_i = min_{j ≠ i} ‖x̂_i − x1_j‖² < ‖x̂_i − x1_i‖² (strictly, beyond a 1e-9 relative tolerance).

    x_hat (the flow's end points x̂_1), x1 (the teacher's targets): shape (n, d). Returns shape (n,), bool.
    """
    xh, t = _pair_arrays(x_hat, x1)
    n = xh.shape[0]
    out = np.zeros(n, dtype=bool)
    if n < 2:
        return out
    sq_h = np.einsum("nd,nd->n", xh, xh)
    sq_t = np.einsum("nd,nd->n", t, t)
    own = np.einsum("nd,nd->n", xh - t, xh - t)
    for s in range(0, n, _ROWS_PER_CHUNK):
        rows = slice(s, min(s + _ROWS_PER_CHUNK, n))
        cost = _sq_cost(xh[rows], t, sq_h[rows], sq_t)
        idx = np.arange(rows.start, rows.stop)
        cost[idx - s, idx] = np.inf
        tol = 1e-9 * (sq_h[rows] + sq_t[rows])
        out[rows] = cost.min(axis=1) < own[rows] - tol
    return out


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


@dataclass
class SpanCoupling:
    """Sampled token pairs of one span and what the coupling maths says about them.

    token_index: shape (n, 2), (window, position) of each token; tokens: their text.
    x0, x1: shape (n, d), float64: h_m and h_n of each token.
    flow_recoupled: shape (n,), bool, when a flow was given; x_hat: shape (n, d), the flow's end points.
    """

    span: Span
    token_index: np.ndarray
    tokens: list[str]
    x0: np.ndarray
    x1: np.ndarray
    recoupling: Recoupling
    crossings: Crossings
    flow_recoupled: np.ndarray | None = None
    x_hat: np.ndarray | None = None


def span_coupling(teacher: Teacher, cache: ActivationCache, span: Span | tuple[int, int], n_tokens: int = 64,
                  flow: LatentFlow | None = None, k: int = 3, seed: int = 0, drop_first: bool = True) -> SpanCoupling:
    """Sample ``n_tokens`` tokens of the cache (position 0 excluded by default) and analyse span [m, n).

    With a trained ``flow`` (of this span) its k-step end points are computed on the whole windows the tokens
    come from, and ``flow_recoupled`` marks tokens sent nearer another token's target than their own.
    """
    m, n = span = teacher.check_span(*span)
    for layer in (m, n):
        if layer not in cache.layers:
            raise LFTError(f"layer {layer} is not cached in {cache.key}; cache all layers first")
    W, T, _ = cache.shape
    first = 1 if drop_first else 0
    available = W * (T - first)
    if not 2 <= n_tokens <= available:
        raise LFTError(f"pick between 2 and {available} tokens, got {n_tokens}")
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(available, size=n_tokens, replace=False))
    index = np.stack([flat // (T - first), flat % (T - first) + first], axis=1)
    h_m, h_n = cache.layer(m), cache.layer(n)
    x0 = np.asarray(h_m[index[:, 0], index[:, 1]], dtype=np.float64)
    x1 = np.asarray(h_n[index[:, 0], index[:, 1]], dtype=np.float64)
    toks = cache.tokens
    words = teacher.decode_tokens([toks[w, p] for w, p in index])
    result = SpanCoupling(span, index, words, x0, x1, recoupling_ratio(x0, x1), crossings(x0, x1))
    if flow is not None:
        check_replaces(flow, span)
        rows = np.unique(index[:, 0])
        with torch.no_grad():
            ends = flow(torch.from_numpy(np.asarray(h_m[rows], dtype=np.float32)), k=k).float().numpy()
        where = {w: i for i, w in enumerate(rows)}
        x_hat = np.stack([ends[where[w], p] for w, p in index]).astype(np.float64)
        result.x_hat = x_hat
        result.flow_recoupled = flow_recoupled(x_hat, x1)
    return result


def text_coupling(teacher: Teacher, ids: torch.Tensor, span: Span | tuple[int, int], flow: LatentFlow | None = None,
                  k: int = 3, drop_first: bool = True) -> SpanCoupling:
    """The same analysis for every token of one text, ``ids`` shape (1, T) (position 0 dropped by default)."""
    m, n = span = teacher.check_span(*span)
    first = 1 if drop_first else 0
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] - first < 2:
        raise LFTError("the text needs at least two tokens besides the first")
    if flow is not None:
        check_replaces(flow, span)
    hs = teacher.hidden_states(ids, [m, n])
    x0 = hs[m][0, first:].double().numpy()
    x1 = hs[n][0, first:].double().numpy()
    positions = np.arange(first, ids.shape[1])
    words = teacher.decode_tokens(ids[0, first:])
    index = np.stack([np.zeros_like(positions), positions], axis=1)
    result = SpanCoupling(span, index, words, x0, x1, recoupling_ratio(x0, x1), crossings(x0, x1))
    if flow is not None:
        with torch.no_grad():
            result.x_hat = flow(hs[m], k=k)[0, first:].double().numpy()
        result.flow_recoupled = flow_recoupled(result.x_hat, x1)
    return result


@dataclass
class CouplingView:
    """What the Coupling crossings page shows of a ``SpanCoupling``: one PCA of all points, the cost matrix and
    its optimal assignment, the crossing pairs, and how the flow's recoupling splits over crossing tokens.

    p0, p1, p_hat: shape (n, 2): x0, x1 and the flow's end points in one PCA fitted on all of them.
    cost: shape (n, n); assignment: shape (n,); in_crossing: shape (n,), bool.
    recoupled_in_crossing / recoupled_elsewhere: share of tokens the flow recoupled among tokens that are /
    are not in a crossing (None without a flow, or when the group is empty).
    """

    coupling: SpanCoupling
    p0: np.ndarray
    p1: np.ndarray
    p_hat: np.ndarray | None
    cost: np.ndarray
    recoupled_in_crossing: float | None
    recoupled_elsewhere: float | None
    explained_variance: tuple[float, ...] | None = None  # of the two PCA axes

    @property
    def in_crossing(self) -> np.ndarray:
        return self.coupling.crossings.involved

    @property
    def tokens(self) -> list[str]:
        return self.coupling.tokens

    @property
    def ratio(self) -> float:
        return self.coupling.recoupling.ratio

    @property
    def assignment(self) -> np.ndarray:
        return self.coupling.recoupling.assignment

    @property
    def recoupled(self) -> np.ndarray | None:
        return self.coupling.flow_recoupled

    def crossing_table(self) -> pd.DataFrame:
        """Crossing pairs with their tokens, largest saving first: i, token_i, j, token_j, t*, distance, saving."""
        cross = self.coupling.crossings.to_frame()
        tokens = self.tokens
        table = cross.assign(token_i=[repr(tokens[i]) for i in cross["i"]],
                             token_j=[repr(tokens[j]) for j in cross["j"]])
        table = table[["i", "token_i", "j", "token_j", "t_star", "distance", "delta"]]
        table = table.sort_values("delta", ascending=False).rename(columns={"t_star": "t*", "delta": "saving"})
        return table.reset_index(drop=True)


def coupling_view(sc: SpanCoupling) -> CouplingView:
    """The page's numbers for a span's coupling (see ``CouplingView``); the projection is cached on disk."""
    from lft_core.analysis.projection import project

    pooled = np.concatenate([sc.x0, sc.x1] + ([sc.x_hat] if sc.x_hat is not None else []))
    projection = project(pooled.astype(np.float32), method="pca")
    coords = projection.coords
    N = len(sc.x0)
    involved = sc.crossings.involved
    share = lambda mask: float(sc.flow_recoupled[mask].mean()) if mask.any() else None  # noqa: E731
    return CouplingView(
        coupling=sc, p0=coords[:N], p1=coords[N:2 * N], p_hat=coords[2 * N:] if sc.x_hat is not None else None,
        cost=cost_matrix(sc.x0, sc.x1),
        recoupled_in_crossing=share(involved) if sc.flow_recoupled is not None else None,
        recoupled_elsewhere=share(~involved) if sc.flow_recoupled is not None else None,
        explained_variance=tuple(projection.explained_variance) if projection.explained_variance is not None
        else None,
    )
