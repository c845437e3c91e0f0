"""Crossings: which token pairs of a span break the straight-path pairing, and what a flow did with them.

* Crossings: pairs (i, j) whose targets are cheaper swapped, with the time t* where their straight paths are
  closest and that distance.
* Flow-misrouted tokens (``flow_recoupled``): those a trained flow delivered nearer another token's target than
  their own.
* ``span_coupling`` / ``text_coupling``: a span's sampled pairs with their recoupling ratio, crossings, matching
  and misrouted tokens; ``coupling_view``: what the Coupling crossings page draws.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lft_core.analysis.recoupling import Recoupling, cost_matrix, pair_arrays, recoupling_ratio, sq_cost
from lft_core.data.activations import ActivationCache
from lft_core.errors import LFTError
from lft_core.flow.latent import LatentFlow, check_replaces
from lft_core.analysis.metrics import MetricError
from lft_core.span import Span

if TYPE_CHECKING:
    import pandas as pd

    from lft_core.model.teacher import Teacher

MAX_CROSSING_TOKENS = 2000
"""crossings() looks at all n(n−1)/2 pairs; above this many tokens it refuses instead of eating memory."""

_ROWS_PER_CHUNK = 1024
"""Rows of a cost matrix handled at once by flow_recoupled (bounds memory at ~n·1024·8 bytes)."""




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
    a0, a1 = pair_arrays(x0, x1)
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
    xh, t = pair_arrays(x_hat, x1)
    n = xh.shape[0]
    out = np.zeros(n, dtype=bool)
    if n < 2:
        return out
    sq_h = np.einsum("nd,nd->n", xh, xh)
    sq_t = np.einsum("nd,nd->n", t, t)
    own = np.einsum("nd,nd->n", xh - t, xh - t)
    for s in range(0, n, _ROWS_PER_CHUNK):
        rows = slice(s, min(s + _ROWS_PER_CHUNK, n))
        cost = sq_cost(xh[rows], t, sq_h[rows], sq_t)
        idx = np.arange(rows.start, rows.stop)
        cost[idx - s, idx] = np.inf
        tol = 1e-9 * (sq_h[rows] + sq_t[rows])
        out[rows] = cost.min(axis=1) < own[rows] - tol
    return out


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
