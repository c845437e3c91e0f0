"""Coupling analysis of a model over a corpus: the recoupling grid and a span's crossings, from the cache.

This composes the activation cache with the maths in ``metrics`` so that the CLI and the app ask one
function each: ``recoupling_for_model`` (every span's R) and ``span_coupling`` (a span's sampled pairs,
crossings, matching, and which tokens a trained flow recoupled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .activations import ActivationCache, ensure_activations
from .corpus import load_corpus
from .errors import LFTError, check_span
from .metrics import Crossings, Recoupling, RecouplingGrid, crossings, flow_recoupled, recoupling_grid, recoupling_ratio


def all_layer_cache(teacher, corpus_spec: str = "builtin", seq_len: int = 128, windows: int = 16,
                    progress: bool = True, callback: Callable[[int, int], None] | None = None) -> ActivationCache:
    """The train-split cache with every layer 0..L (computed once, then read from disk)."""
    corpus = load_corpus(corpus_spec)
    return ensure_activations(teacher, corpus, seq_len, windows, range(teacher.n_layers + 1), "train",
                              progress=progress, callback=callback)


def parse_spans(text: str | None, n_layers: int) -> list[tuple[int, int]] | None:
    """``all`` / None -> None (every span); else ``M:N,M:N`` checked against 0 <= M < N <= L."""
    if text is None or text.strip().lower() == "all":
        return None
    spans = []
    for part in text.split(","):
        try:
            m, n = (int(x) for x in part.split(":"))
        except ValueError:
            raise LFTError(f"cannot read span {part!r}: use M:N") from None
        check_span(m, n, n_layers)
        spans.append((m, n))
    return spans


def recoupling_for_model(teacher, corpus_spec: str = "builtin", pairs: int = 512,
                         spans: Sequence[tuple[int, int]] | None = None, seq_len: int = 128, windows: int = 16,
                         drop_first: bool = True, seed: int = 0,
                         progress: Callable[[int, int], None] | None = None) -> RecouplingGrid:
    """R for every span (or the given ones) from one all-layer cache of the corpus."""
    cache = all_layer_cache(teacher, corpus_spec, seq_len, windows)
    return recoupling_grid(cache.layer, teacher.n_layers, pairs=pairs, spans=spans, drop_first=drop_first,
                           seed=seed, progress=progress)


@dataclass
class SpanCoupling:
    """Sampled token pairs of one span and what the coupling maths says about them."""

    span: tuple[int, int]
    token_index: np.ndarray  # (n, 2) window, position
    tokens: list[str]
    x0: np.ndarray  # (n, d) float64
    x1: np.ndarray  # (n, d)
    recoupling: Recoupling
    crossings: Crossings
    flow_recoupled: np.ndarray | None = None  # (n,) bool, when a flow was given
    x_hat: np.ndarray | None = None  # (n, d) the flow's end points


def span_coupling(teacher, cache: ActivationCache, span: tuple[int, int], n_tokens: int = 64, flow=None, k: int = 3,
                  seed: int = 0, drop_first: bool = True) -> SpanCoupling:
    """Sample ``n_tokens`` tokens of the cache (position 0 excluded by default) and analyse span [m, n).

    With a trained ``flow`` its k-step end points are computed on the whole windows the tokens come from,
    and ``flow_recoupled`` marks tokens sent nearer another token's target than their own.
    """
    m, n = span
    teacher.check_span(m, n)
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
    words = [teacher.tokenizer.decode([int(toks[w, p])]) for w, p in index]
    result = SpanCoupling((m, n), index, words, x0, x1, recoupling_ratio(x0, x1), crossings(x0, x1))
    if flow is not None:
        if tuple(flow.span) != (m, n):
            raise LFTError(f"the flow replaces {flow.span[0]}:{flow.span[1]}, not {m}:{n}")
        rows = np.unique(index[:, 0])
        with torch.no_grad():
            ends = flow(torch.from_numpy(np.asarray(h_m[rows], dtype=np.float32)), k=k).float().numpy()
        where = {w: i for i, w in enumerate(rows)}
        x_hat = np.stack([ends[where[w], p] for w, p in index]).astype(np.float64)
        result.x_hat = x_hat
        result.flow_recoupled = flow_recoupled(x_hat, x1)
    return result


def text_coupling(teacher, ids: torch.Tensor, span: tuple[int, int], flow=None, k: int = 3,
                  drop_first: bool = True) -> SpanCoupling:
    """The same analysis for every token of one text, ``ids`` shape (1, T) (position 0 dropped by default)."""
    m, n = span
    teacher.check_span(m, n)
    first = 1 if drop_first else 0
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] - first < 2:
        raise LFTError("the text needs at least two tokens besides the first")
    hs = teacher.hidden_states(ids, [m, n])
    x0 = hs[m][0, first:].double().numpy()
    x1 = hs[n][0, first:].double().numpy()
    positions = np.arange(first, ids.shape[1])
    words = [teacher.tokenizer.decode([int(i)]) for i in ids[0, first:]]
    index = np.stack([np.zeros_like(positions), positions], axis=1)
    result = SpanCoupling((m, n), index, words, x0, x1, recoupling_ratio(x0, x1), crossings(x0, x1))
    if flow is not None:
        if tuple(flow.span) != (m, n):
            raise LFTError(f"the flow replaces {flow.span[0]}:{flow.span[1]}, not {m}:{n}")
        with torch.no_grad():
            result.x_hat = flow(hs[m], k=k)[0, first:].double().numpy()
        result.flow_recoupled = flow_recoupled(result.x_hat, x1)
    return result
