"""Closed-form what-if baselines: a span replaced by one affine map fitted by ridge least squares, no training.

The cheapest learned replacement a flow must beat (ReplaceMe, arXiv 2505.02819, replaces a span by one linear
map solved by least squares). For a span [m, n) and tokens with x0 = h_m, x1 = h_n:

    x̂_1 = x0 + z W + b,        z = (x0 − mu) / sigma      (per-dimension standardisation of the input)

    W, b = argmin Σ_t w_t ‖x0_t + z_t W + b − x1_t‖² + λ ‖W‖²_F

solved from the normal equations (G + λ P) [W; b] = C with G = Σ_t w_t z̃_t z̃_tᵀ, C = Σ_t w_t z̃_t (x1_t − x0_t)ᵀ,
z̃ = [z, 1] and P = diag(1, …, 1, 0) (the bias is not penalised), accumulated in float64 over batches of windows
read from the activation cache, so memory does not grow with the number of tokens. The weights are the flows':
w_t = 1 / ‖x1_t‖² (the loss is the NMSE the flows are judged by) times ``seq_len / 2`` at position 0, the
attention sink (see ``training.loss_weight``). λ is chosen on held-out windows from a grid relative to the mean
eigenvalue of G, by held-out NMSE; the fit sees training windows only.

``AffineReplacement`` splices into a teacher exactly like a flow (``Replace(affine)``), so evaluation, per-token
KL, trajectories and Compare take it where they take a flow.

``affine_grid`` answers "how linear is each span?" for every span at once from one all-layer cache: plain
least squares (w_t = 1, position 0 dropped as for the recoupling grid) shares one Gram matrix and its
eigendecomposition per start layer m, so each span costs one cross product and a few small products.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lft_core.data.activations import ActivationCache, ensure_activations
from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.data.corpus import load_corpus
from lft_core.errors import LFTError
from lft_core.analysis.metrics import nmse, nmse_per_token
from lft_core.span import Span, all_spans

if TYPE_CHECKING:
    from lft_core.model.teacher import Teacher

RIDGE_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Candidate λ, relative to the mean eigenvalue of the (weighted) Gram matrix of the standardised inputs
(λ → ∞ leaves x0 + mean(x1 − x0); measured on SmolLM2 with 16 × 128 windows, most spans choose 0.1 to 10)."""

_BATCH_WINDOWS = 16
MASSIVE = 10.0
"""A token whose hidden-state norm exceeds this many times the layer's median is a massive activation."""


class AffineReplacement(nn.Module):
    """A span [m, n) replaced by h_n ≈ h_m + ((h_m − mu) / sigma) W + b.

    h_m: shape (batch, seq, d) -> shape (batch, seq, d), in h_m's dtype. W: shape (d, d); b, mu, sigma: shape (d,).
    ``k`` is accepted for the ``Replacement`` protocol and ignored (one closed-form step). ``ridge``: the λ
    chosen, relative to the mean eigenvalue of the fit's Gram matrix; ``heldout_nmse``: its held-out NMSE.
    """

    def __init__(self, span: Span | tuple[int, int], weight: Tensor, bias: Tensor, mu: Tensor, sigma: Tensor,
                 ridge: float = 0.0, heldout_nmse: float | None = None):
        super().__init__()
        d = weight.shape[0]
        assert weight.shape == (d, d) and bias.shape == mu.shape == sigma.shape == (d,), "W (d, d); b, mu, sigma (d,)"
        self.span = Span.of(span).check()
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())
        self.register_buffer("mu", mu.float())
        self.register_buffer("sigma", sigma.float())
        self.ridge = float(ridge)
        self.heldout_nmse = heldout_nmse

    @torch.no_grad()
    def forward(self, h_m: Tensor, k: int = 1) -> Tensor:
        z = (h_m.float() - self.mu) / self.sigma
        return (h_m.float() + z @ self.weight + self.bias).to(h_m.dtype)


# ---------------------------------------------------------------------------------------------------------
# Ridge on normal equations


def _standardisation(batches: Callable[[], Iterator[tuple[np.ndarray, ...]]], d: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (float64) of the x0 rows of every batch, std floored at 1e-3 · median."""
    total, s1, s2 = 0, np.zeros(d), np.zeros(d)
    for x0, *_ in batches():
        total += len(x0)
        s1 += x0.sum(0)
        s2 += np.einsum("nd,nd->d", x0, x0)
    if total < 2:
        raise LFTError("the affine fit needs at least 2 tokens")
    mu = s1 / total
    sigma = np.sqrt(np.maximum(s2 / total - mu**2, 0.0))
    return mu, np.maximum(sigma, max(float(np.median(sigma)) * 1e-3, 1e-8))


def _with_bias(z: np.ndarray) -> np.ndarray:
    return np.concatenate([z, np.ones((len(z), 1))], axis=1)


def _window_batches(cache: ActivationCache, m: int, n: int, sink_weight: float | None,
                    drop_first: bool = False) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """A re-iterable source of (x0, x1, w) token batches (float64) from a cache entry, ``_BATCH_WINDOWS`` windows
    at a time. w_t = 1 / ‖x1_t‖², times ``sink_weight`` at position 0 (or position 0 dropped)."""
    h_m, h_n = cache.layer(m), cache.layer(n)
    W, T, d = cache.shape
    first = 1 if drop_first else 0

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for s in range(0, W, _BATCH_WINDOWS):
            x0 = np.asarray(h_m[s : s + _BATCH_WINDOWS, first:], dtype=np.float64)
            x1 = np.asarray(h_n[s : s + _BATCH_WINDOWS, first:], dtype=np.float64)
            w = 1.0 / np.maximum(np.einsum("wtd,wtd->wt", x1, x1), 1e-30)
            if sink_weight is not None and not drop_first:
                w[:, 0] *= sink_weight
            yield x0.reshape(-1, d), x1.reshape(-1, d), w.reshape(-1)

    return batches


def fit_affine(span: Span | tuple[int, int], train: Callable[[], Iterator[tuple[np.ndarray, ...]]],
               heldout: Callable[[], Iterator[tuple[np.ndarray, ...]]], d: int,
               ridge_grid: Sequence[float] = RIDGE_GRID) -> AffineReplacement:
    """Weighted ridge fit of x1 − x0 on [standardised x0, 1] (see the module docstring), λ chosen by held-out NMSE.

    ``train()`` / ``heldout()`` yield batches (x0, x1, w): x0, x1 shape (tokens, d), w shape (tokens,) (float64);
    the held-out weights are ignored (held-out NMSE is the plain mean over tokens, as for the flows).
    """
    mu, sigma = _standardisation(train, d)
    G = np.zeros((d + 1, d + 1))
    C = np.zeros((d + 1, d))
    for x0, x1, w in train():
        z = _with_bias((x0 - mu) / sigma)
        zw = z * w[:, None]
        G += zw.T @ z
        C += zw.T @ (x1 - x0)
    if not (np.isfinite(G).all() and np.isfinite(C).all()):
        raise LFTError("the affine fit met non-finite hidden states (float16 overflow in the cache?)")
    penalty = np.ones(d + 1)
    penalty[-1] = 0.0
    scale = float(np.trace(G[:d, :d])) / d or 1.0
    candidates = []
    for r in ridge_grid:
        try:
            beta = np.linalg.solve(G + r * scale * np.diag(penalty), C)
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(beta).all():
            candidates.append((r, beta))
    if not candidates:
        raise LFTError("the affine fit is singular for every ridge strength tried")
    held = [(_with_bias((x0 - mu) / sigma), x0, x1) for x0, x1, _ in heldout()]
    if not held or sum(len(x0) for _, x0, _ in held) == 0:
        raise LFTError("the affine fit needs held-out tokens to choose its ridge strength")
    best = None
    for r, beta in candidates:
        errors = np.concatenate([nmse_per_token(x0 + z @ beta, x1) for z, x0, x1 in held])
        score = float(errors.mean())
        if np.isfinite(score) and (best is None or score < best[0]):
            best = (score, r, beta)
    if best is None:
        raise LFTError("the affine fit gives non-finite held-out errors for every ridge strength tried")
    score, r, beta = best
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return AffineReplacement(span, t(beta[:d]), t(beta[d]), t(mu), t(sigma), ridge=r, heldout_nmse=score)


def fit_affine_for_span(teacher: Teacher, span: Span | tuple[int, int], corpus_spec: str = DEFAULT_CORPUS,
                        seq_len: int = 128, windows: int = 256, heldout_windows: int = 16,
                        sink_weight: float | None = None, progress: bool = True) -> AffineReplacement:
    """Fit the affine replacement of ``span`` on the corpus's training windows (cached, like a flow's data) and
    choose λ on its held-out windows. ``sink_weight`` defaults to ``seq_len / 2``, the flows' rule."""
    m, n = span = teacher.check_span(*span)
    corpus = load_corpus(corpus_spec)
    train = ensure_activations(teacher, corpus, seq_len, windows, [m, n], "train", progress=progress)
    held = ensure_activations(teacher, corpus, seq_len, heldout_windows, [m, n], "heldout", progress=progress)
    sink = seq_len / 2 if sink_weight is None else sink_weight
    return fit_affine(span, _window_batches(train, m, n, sink), _window_batches(held, m, n, None), teacher.d_model)


# ---------------------------------------------------------------------------------------------------------
# Every span at once


@dataclass(frozen=True)
class AffineGrid:
    """Held-out NMSE of the affine replacement for many spans of one model.

    matrix: shape (L+1, L+1); matrix[m, n] = held-out NMSE of span [m, n) (NaN where m >= n or not computed).
    ridge:  shape (L+1, L+1); the λ (relative to the mean eigenvalue) chosen for each span.
    tokens / heldout_tokens: tokens fitted on / scored on (position 0 of each window and massive activations
    dropped); massive_dropped: how many massive-activation tokens were dropped (training and held-out).
    """

    matrix: np.ndarray
    ridge: np.ndarray
    n_layers: int
    tokens: int
    heldout_tokens: int
    massive_dropped: int
    seconds: float


def affine_grid(layer: Callable[[int], np.ndarray], heldout_layer: Callable[[int], np.ndarray], n_layers: int,
                spans: Sequence[Span] | None = None, ridge_grid: Sequence[float] = RIDGE_GRID,
                progress: Callable[[int, int], None] | None = None) -> AffineGrid:
    """Affine-replacement held-out NMSE for every span (or the given ones), plain least squares (w_t = 1) with
    position 0 of every window dropped, and every other token that is a *massive activation* (its norm above
    ``MASSIVE`` times the layer's median norm at any layer 0..L, so that a span's value does not depend on
    which other spans are asked): SmolLM2 grows a few such tokens
    (norm ~2·10⁴ against a median of ~130) from block 11 on, and in plain least squares those few tokens
    decide the fit of every span that ends after them. They are dropped from fitting and scoring alike.

    layer(i) / heldout_layer(i): h_i of the training / held-out windows, shape (windows, seq_len, d) (float16
    memmaps). Per start layer m the Gram matrix of the centred, standardised x0 and its eigendecomposition
    G = V diag(s) Vᵀ are computed once; for a span, B = Vᵀ C (C the cross product with x1 − x0), every λ's
    W = V diag(1 / (s + λ)) B, and the held-out predictions (Z_h V) diag(1 / (s + λ)) B are scored by NMSE.
    progress(done, total) is called after each span.
    """
    start = time.perf_counter()
    todo = all_spans(n_layers) if spans is None else [Span.of(s).check(n_layers) for s in spans]
    by_start: dict[int, list[int]] = {}
    for m, n in todo:
        by_start.setdefault(m, []).append(n)

    def massive(get: Callable[[int], np.ndarray]) -> np.ndarray:
        """Tokens (position 0 dropped) whose norm exceeds MASSIVE × the median at some layer."""
        out = None
        for i in range(n_layers + 1):
            h = get(i)
            norms = np.linalg.norm(np.asarray(h[:, 1:], dtype=np.float32).reshape(-1, h.shape[-1]), axis=1)
            big = ~(norms <= MASSIVE * np.median(norms))  # a non-finite norm counts as massive here
            out = big if out is None else out | big
        return out

    keep_train, keep_held = ~massive(layer), ~massive(heldout_layer)

    def rows(get: Callable[[int], np.ndarray], i: int, keep: np.ndarray) -> np.ndarray:
        h = get(i)
        x = np.asarray(h[:, 1:], dtype=np.float64).reshape(-1, h.shape[-1])[keep]
        if not np.isfinite(x).all():
            raise LFTError(f"layer {i} has non-finite hidden states (float16 overflow?)")
        return x

    matrix = np.full((n_layers + 1, n_layers + 1), np.nan)
    ridge = np.full_like(matrix, np.nan)
    done, tokens, held_tokens = 0, 0, 0
    train_cache: dict[int, np.ndarray] = {}
    held_cache: dict[int, np.ndarray] = {}

    def train_rows(i: int) -> np.ndarray:
        if i not in train_cache:
            train_cache[i] = rows(layer, i, keep_train)
        return train_cache[i]

    def held_rows(i: int) -> np.ndarray:
        if i not in held_cache:
            held_cache[i] = rows(heldout_layer, i, keep_held)
        return held_cache[i]

    for m in sorted(by_start):
        x0, x0h = train_rows(m), held_rows(m)
        tokens, held_tokens = len(x0), len(x0h)
        mu, sd = x0.mean(0), x0.std(0)
        sd = np.maximum(sd, max(float(np.median(sd)) * 1e-3, 1e-8))
        z, zh = (x0 - mu) / sd, (x0h - mu) / sd
        s, V = np.linalg.eigh(z.T @ z)
        s = np.maximum(s, 0.0)
        zv = (z @ V).astype(np.float32)  # the big products run in float32 (NMSE to ~1e-6 relative)
        lams = np.asarray(ridge_grid) * (float(s.mean()) or 1.0)
        # every λ's held-out inputs stacked: row block j is (Z_h V) diag(1 / (s + λ_j))
        scaled = np.concatenate([(zh @ V) / (s + lam) for lam in lams]).astype(np.float32)
        for n in by_start[m]:
            delta = train_rows(n) - x0
            b0 = delta.mean(0)  # the bias: z is centred, so it decouples from W
            B = zv.T @ (delta - b0).astype(np.float32)  # Vᵀ Zᵀ (Δ − b0), shape (d, d)
            x1h = held_rows(n)
            base = x0h + b0  # the held-out prediction of W = 0
            moves = (scaled @ B).reshape(len(lams), len(x0h), -1)  # each λ's Z_h W
            scores = [nmse(base + move, x1h) for move in moves]
            j = int(np.nanargmin(scores))
            matrix[m, n], ridge[m, n] = scores[j], ridge_grid[j]
            done += 1
            if progress is not None:
                progress(done, len(todo))
        # layers below the next start are no longer needed as inputs
        for cache in (train_cache, held_cache):
            for i in [i for i in cache if i <= m]:
                del cache[i]
    return AffineGrid(matrix=matrix, ridge=ridge, n_layers=n_layers, tokens=tokens, heldout_tokens=held_tokens,
                      massive_dropped=int((~keep_train).sum() + (~keep_held).sum()), seconds=time.perf_counter() - start)


def affine_grid_for_model(teacher: Teacher, corpus_spec: str = DEFAULT_CORPUS, seq_len: int = 128, windows: int = 16,
                          heldout_windows: int = 4, spans: Sequence[Span] | None = None, progress: bool = True,
                          callback: Callable[[int, int], None] | None = None) -> AffineGrid:
    """The affine grid from the all-layer caches of the corpus's training and held-out windows (computed when
    missing; the training one is the recoupling grid's)."""
    corpus = load_corpus(corpus_spec)
    layers = range(teacher.n_layers + 1)
    train = ensure_activations(teacher, corpus, seq_len, windows, layers, "train", progress=progress)
    held = ensure_activations(teacher, corpus, seq_len, heldout_windows, layers, "heldout", progress=progress)
    return affine_grid(train.layer, held.layer, teacher.n_layers, spans=spans, progress=callback)


# ---------------------------------------------------------------------------------------------------------
# The persisted full grid: computed once per pair of all-layer cache entries (training, held-out), then read back
# by every page, job and process (cache/grids/affine-<train key>-<held-out key>.json, written atomically).

GRID_FILE_VERSION = 1


def affine_grid_path(train_key: str, heldout_key: str) -> Path:
    """Where the persisted full affine grid of these two all-layer cache entries lives."""
    from lft_core.paths import cache_dir

    return cache_dir("grids") / f"affine-{train_key}-{heldout_key}.json"


def _matrix(rows: list) -> np.ndarray:
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=float)


def read_affine_grid(train: ActivationCache, heldout: ActivationCache) -> AffineGrid | None:
    """The persisted full grid of these entries, or None when there is none, it is damaged, it was computed with
    other constants (ridge grid, massive-activation threshold) or from an earlier build of either entry (their
    ``created`` stamps differ). Computes nothing."""
    from lft_core.atomic import DamagedRecord, read_record

    try:
        data = read_record(affine_grid_path(train.key, heldout.key),
                           {"version": int, "train_created": str, "heldout_created": str, "n_layers": int,
                            "matrix": list, "ridge": list, "tokens": int, "heldout_tokens": int,
                            "massive_dropped": int, "seconds": (int, float), "ridge_grid": list,
                            "massive": (int, float)})
        L = data["n_layers"]
        if (data["version"] != GRID_FILE_VERSION or data["train_created"] != str(train.meta.get("created"))
                or data["heldout_created"] != str(heldout.meta.get("created")) or L != train.meta.get("n_layers")
                or [float(x) for x in data["ridge_grid"]] != [float(x) for x in RIDGE_GRID]
                or float(data["massive"]) != MASSIVE):
            return None
        matrix, ridge = _matrix(data["matrix"]), _matrix(data["ridge"])
    except (DamagedRecord, TypeError, ValueError):
        return None
    if matrix.shape != (L + 1, L + 1) or ridge.shape != matrix.shape:
        return None
    return AffineGrid(matrix=matrix, ridge=ridge, n_layers=L, tokens=data["tokens"],
                      heldout_tokens=data["heldout_tokens"], massive_dropped=data["massive_dropped"],
                      seconds=float(data["seconds"]))


def affine_grid_from_caches(train: ActivationCache, heldout: ActivationCache,
                            callback: Callable[[int, int], None] | None = None) -> AffineGrid:
    """The affine grid of every span from an all-layer training entry and an all-layer held-out entry, as
    ``affine_grid`` computes it, computed once and persisted (``affine_grid_path``); later calls, from any
    process, read it back (equal values; ``seconds`` is the original computation's). Two processes asking at
    once compute it once (a file lock); the file is written atomically."""
    from filelock import FileLock

    from lft_core.atomic import write_json
    from lft_core.span import grid_json

    grid = read_affine_grid(train, heldout)
    if grid is not None:
        return grid
    path = affine_grid_path(train.key, heldout.key)
    with FileLock(str(path.with_name(f".{path.name}.lock"))):
        grid = read_affine_grid(train, heldout)  # computed by another process meanwhile
        if grid is not None:
            return grid
        grid = affine_grid(train.layer, heldout.layer, train.meta["n_layers"], progress=callback)
        write_json(path, {"version": GRID_FILE_VERSION, "kind": "affine", "train": train.key,
                          "heldout": heldout.key, "train_created": str(train.meta.get("created")),
                          "heldout_created": str(heldout.meta.get("created")), "model": train.meta.get("model"),
                          "n_layers": grid.n_layers, "ridge_grid": list(RIDGE_GRID), "massive": MASSIVE,
                          "tokens": grid.tokens, "heldout_tokens": grid.heldout_tokens,
                          "massive_dropped": grid.massive_dropped, "seconds": round(grid.seconds, 4),
                          "matrix": grid_json(grid.matrix), "ridge": grid_json(grid.ridge)})
    return grid


def affine_grid_cached(teacher: Teacher, corpus_spec: str = DEFAULT_CORPUS, seq_len: int = 128, windows: int = 16,
                       heldout_windows: int = 4, progress: bool = True,
                       callback: Callable[[int, int], None] | None = None) -> AffineGrid:
    """``affine_grid_for_model`` of every span, persisted: the two all-layer caches are computed when missing,
    the grid is read back when it was computed before (``affine_grid_from_caches``)."""
    corpus = load_corpus(corpus_spec)
    layers = range(teacher.n_layers + 1)
    train = ensure_activations(teacher, corpus, seq_len, windows, layers, "train", progress=progress)
    held = ensure_activations(teacher, corpus, seq_len, heldout_windows, layers, "heldout", progress=progress)
    return affine_grid_from_caches(train, held, callback=callback)
