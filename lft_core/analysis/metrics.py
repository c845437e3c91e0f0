"""Metrics of a replacement: how far the spliced model's predictions and the flow's end points are from the teacher's.

Next-token metrics (torch, float32):

* KL per token:  KL(P‖Q)_t = Σ_v P_t(v) · (log P_t(v) − log Q_t(v)), P = teacher, Q = model (LFT or skip-k)
* NLL per token: −log softmax(logits_t)[ids_{t+1}]          (position t predicts token t+1)
* Perplexity:    exp(mean NLL)

Hidden-state metrics (float64):

* NMSE = mean over tokens of ‖x̂_1 − x1‖² / ‖x1‖²

The coupling maths (recoupling ratio, crossings) is in ``coupling``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lft_core.errors import LFTError

__all__ = ["MetricError", "kl_per_token", "nll_per_token", "perplexity", "nmse", "nmse_per_token", "as_float64"]

_ROWS_PER_CHUNK = 256
"""Positions handled at once by the vocabulary-sized computations (bounds memory at ~V·256·4 bytes each: 50 MB
for a 49k vocabulary)."""


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


def as_float64(x: Any, name: str) -> np.ndarray:
    """A numpy float64 view/copy of a torch tensor or array-like."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0:
        raise MetricError(f"{name} must be an array of vectors, got a scalar")
    return arr


def nmse_per_token(pred: Any, target: Any) -> np.ndarray:
    """‖pred − target‖² / ‖target‖² of every token, vectors on the last dim: shape (tokens,), float64.

    pred, target: same shape (..., d), torch or numpy (any float dtype); accumulated in float64.
    Raises MetricError if a target vector is all zeros (its ratio is undefined).
    """
    p, q = as_float64(pred, "pred"), as_float64(target, "target")
    if p.shape != q.shape:
        raise MetricError(f"NMSE needs pred and target of the same shape, got {p.shape} and {q.shape}")
    p, q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    if p.shape[0] == 0:
        raise MetricError("NMSE needs at least one token")
    denom = np.einsum("nd,nd->n", q, q)
    if np.any(denom == 0):
        raise MetricError(f"NMSE is undefined: {int(np.sum(denom == 0))} target vector(s) are all zeros")
    diff = p - q
    return np.einsum("nd,nd->n", diff, diff) / denom


def nmse(pred: Any, target: Any) -> float:
    """Normalised mean squared error of predicted hidden states: NMSE = mean over tokens of
    ‖pred − target‖² / ‖target‖² (``nmse_per_token``, averaged)."""
    return float(np.mean(nmse_per_token(pred, target)))
