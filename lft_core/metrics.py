"""Metrics: how good a replacement is, and how hard a span is for flow matching.

Next-token metrics (torch, float32):

* KL per token:  KL(P‖Q)_t = Σ_v P_t(v) · (log P_t(v) − log Q_t(v)), P = teacher, Q = model (LFT or skip-k)
* NLL per token: −log softmax(logits_t)[ids_{t+1}]          (position t predicts token t+1)
* Perplexity:    exp(mean NLL)

Hidden-state metrics (float64):

* NMSE = mean over tokens of ‖x̂_1 − x1‖² / ‖x1‖²

Coupling metrics (numpy, float64), on token pairs (x0_i, x1_i) = (h_m, h_n) of a span [m, n):

* Recoupling ratio: σ = argmin over permutations of Σ_i ‖x0_i − x1_σ(i)‖² (exact, Hungarian-type solver);
  R = #{i : σ(i) ≠ i} / n. R = 0 means straight paths agree with the teacher's pairing; a high R means
  flow matching will *recouple* tokens (its marginal paths average over crossing pairs).
* Sinkhorn recoupling: the same question under entropic OT (a soft, cheaper-to-scale variant).
* Recoupling grid: R for every span (m, n) of a model, from cached hidden states.
* Crossings: pairs (i, j) whose targets are cheaper swapped, with the time t* where their straight paths are
  closest and that distance.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp
from torch import Tensor

from .errors import LFTError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "MetricError",
    "kl_per_token",
    "nll_per_token",
    "perplexity",
    "nmse",
    "cost_matrix",
    "Recoupling",
    "recoupling_ratio",
    "SinkhornRecoupling",
    "sinkhorn_recoupling",
    "RecouplingGrid",
    "recoupling_grid",
    "Crossings",
    "crossings",
    "flow_recoupled",
    "straight_path",
]

MAX_CROSSING_TOKENS = 2000
"""crossings() looks at all n(n−1)/2 pairs; above this many tokens it refuses instead of eating memory."""

_ROWS_PER_CHUNK = 1024
"""Positions handled at once by the vocabulary-sized computations (bounds memory at ~V·1024·4 bytes each)."""


class MetricError(LFTError):
    """Inputs a metric cannot be computed on (mismatched shapes, too few tokens, non-finite values)."""


# --------------------------------------------------------------------------------------------------------------
# Next-token metrics (torch)
# --------------------------------------------------------------------------------------------------------------


def kl_per_token(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(P‖Q) of the next-token distributions at every position.

    KL_t = Σ_v P_t(v) (log P_t(v) − log Q_t(v)) with log P = log_softmax(logits_p), log Q = log_softmax(logits_q).

    logits_p, logits_q: shape (..., V) (any dtype; cast to float32 first). Returns shape (...), float32, ≥ 0.
    Computed with log_softmax (no exp of raw logits), so logits of magnitude 1e4 or long texts give finite
    values; entries with P = 0 contribute 0; tiny negative round-off is clamped to 0.
    """
    if logits_p.shape != logits_q.shape:
        raise MetricError(f"KL needs logits of the same shape, got {tuple(logits_p.shape)} and {tuple(logits_q.shape)}")
    if logits_p.ndim < 1 or logits_p.shape[-1] < 1:
        raise MetricError(f"KL needs logits of shape (..., V) with V >= 1, got {tuple(logits_p.shape)}")
    lead, vocab = logits_p.shape[:-1], logits_p.shape[-1]
    p_rows = logits_p.reshape(-1, vocab)
    q_rows = logits_q.reshape(-1, vocab).to(p_rows.device)
    out = []
    for start in range(0, p_rows.shape[0], _ROWS_PER_CHUNK):
        log_p = torch.log_softmax(p_rows[start:start + _ROWS_PER_CHUNK].float(), dim=-1)
        log_q = torch.log_softmax(q_rows[start:start + _ROWS_PER_CHUNK].float(), dim=-1)
        p = log_p.exp()
        terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
        out.append(terms.sum(dim=-1).clamp_min(0.0))
    if not out:
        return torch.zeros(lead, dtype=torch.float32, device=logits_p.device)
    return torch.cat(out).reshape(lead)


def nll_per_token(logits: Tensor, ids: Tensor) -> Tensor:
    """Negative log-likelihood of each next token.

    nll[b, t] = −log softmax(logits[b, t])[ids[b, t+1]]

    logits: shape (B, T, V); ids: shape (B, T), integer. Returns shape (B, T−1), float32.
    """
    if logits.ndim != 3 or ids.ndim != 2 or logits.shape[:2] != ids.shape:
        raise MetricError(f"expected logits (B, T, V) and ids (B, T), got {tuple(logits.shape)} and {tuple(ids.shape)}")
    batch, seq, vocab = logits.shape
    if seq < 2:
        raise MetricError(f"next-token NLL needs sequences of at least 2 tokens, got T={seq}")
    pred = logits[:, :-1].reshape(-1, vocab)
    target = ids[:, 1:].reshape(-1).to(device=pred.device, dtype=torch.long)
    out = []
    for start in range(0, pred.shape[0], _ROWS_PER_CHUNK):
        chunk = pred[start:start + _ROWS_PER_CHUNK].float()
        out.append(torch.nn.functional.cross_entropy(chunk, target[start:start + _ROWS_PER_CHUNK], reduction="none"))
    return torch.cat(out).reshape(batch, seq - 1)


def perplexity(logits: Tensor, ids: Tensor) -> float:
    """exp(mean NLL) of next-token prediction: logits[:, :-1] predict ids[:, 1:].

    logits: shape (B, T, V); ids: shape (B, T). Float32 arithmetic; a uniform predictor over V tokens gives V.
    """
    return float(torch.exp(nll_per_token(logits, ids).mean()).item())


def _as_float64(x: Any, name: str) -> np.ndarray:
    """A numpy float64 view/copy of a torch tensor or array-like."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0:
        raise MetricError(f"{name} must be an array of vectors, got a scalar")
    return arr


def nmse(pred: Any, target: Any) -> float:
    """Normalised mean squared error of predicted hidden states.

    NMSE = mean over tokens of ‖pred − target‖² / ‖target‖², vectors on the last dim.

    pred, target: same shape (..., d), torch or numpy (any float dtype); accumulated in float64.
    Raises MetricError if a target vector is all zeros (its ratio is undefined).
    """
    p, q = _as_float64(pred, "pred"), _as_float64(target, "target")
    if p.shape != q.shape:
        raise MetricError(f"NMSE needs pred and target of the same shape, got {p.shape} and {q.shape}")
    p, q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    if p.shape[0] == 0:
        raise MetricError("NMSE needs at least one token")
    denom = np.einsum("nd,nd->n", q, q)
    if np.any(denom == 0):
        raise MetricError(f"NMSE is undefined: {int(np.sum(denom == 0))} target vector(s) are all zeros")
    diff = p - q
    return float(np.mean(np.einsum("nd,nd->n", diff, diff) / denom))


# --------------------------------------------------------------------------------------------------------------
# Coupling (numpy, float64)
# --------------------------------------------------------------------------------------------------------------


def _pair_arrays(x0: Any, x1: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_float64(x0, "x0"), _as_float64(x1, "x1")
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
        return [[None if np.isnan(v) else float(v) for v in row] for row in self.matrix]


_GRID_BLOCK_ELEMENTS = 8_000_000
"""Largest Gram block recoupling_grid builds at once (float64 entries, ~64 MB)."""


def _check_spans(spans: Sequence[tuple[int, int]] | None, n_layers: int) -> list[tuple[int, int]]:
    if spans is None:
        return [(m, n) for m in range(n_layers) for n in range(m + 1, n_layers + 1)]
    out = []
    for span in spans:
        try:
            m, n = (int(v) for v in span)
        except (TypeError, ValueError):
            raise MetricError(f"a span must be a pair (m, n) of integers, got {span!r}") from None
        if not 0 <= m < n <= n_layers:
            raise MetricError(f"span {m}:{n} is out of range: need 0 <= m < n <= {n_layers} (the model has {n_layers} blocks)")
        out.append((m, n))
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
    share:    fraction of the n tokens that are in at least one crossing.
    n:        number of tokens.
    """

    pairs: np.ndarray
    delta: np.ndarray
    t_star: np.ndarray
    distance: np.ndarray
    share: float
    n: int

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
    involved = np.zeros(n, dtype=bool)
    involved[ii] = True
    involved[jj] = True
    return Crossings(pairs=np.stack([ii, jj], axis=1).astype(np.int64).reshape(-1, 2), delta=delta,
                     t_star=t_star, distance=distance, share=float(involved.mean()) if n else 0.0, n=n)


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


def straight_path(x0: Any, x1: Any, ts: Any) -> np.ndarray:
    """Points of the straight path x_t = (1 − t) x0 + t x1 at the given times.

    x0, x1: same shape (any); ts: shape (k,). Returns shape (k, *x0.shape), float64.
    """
    a, b = _as_float64(x0, "x0"), _as_float64(x1, "x1")
    if a.shape != b.shape:
        raise MetricError(f"straight_path needs x0 and x1 of the same shape, got {a.shape} and {b.shape}")
    t = np.asarray(ts, dtype=np.float64).reshape(-1)
    t = t.reshape((-1,) + (1,) * a.ndim)
    return (1.0 - t) * a[None] + t * b[None]
