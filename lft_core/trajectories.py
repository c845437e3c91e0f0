"""Latent trajectories of chosen tokens through a span, as one tidy table.

Path kinds, for a token at position p of a window and a span [m, n):

* ``teacher``: h_m, h_{m+1}, ..., h_n at times t = (i - m) / (n - m);
* ``straight``: (1 - t) h_m + t h_n sampled at the same times (the flow-matching interpolant);
* ``<label>``: a trained flow's k-step Euler walk from h_m (times 0, 1/k, ..., 1);
* ``<label> (fine)``: the same flow integrated with many small steps, to show the continuous curve.

The flow sees the whole window (its attention is causal over the sequence), then the chosen positions are
selected. ``project_table`` adds 2-D coordinates fitted on the pooled states of every row.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .errors import LFTError
from .metrics import straight_path
from .projection import project

COLUMNS = ["token", "position", "kind", "step", "t", "state"]


def trajectory_table(
    teacher,
    ids: torch.Tensor,
    span: tuple[int, int],
    positions: Sequence[int],
    flows: dict | None = None,
    k: int = 3,
    fine_steps: int = 24,
) -> pd.DataFrame:
    """Rows (token, position, kind, step, t, state) for every chosen position and path kind.

    ``ids`` shape (1, T); ``flows`` maps a label ("SFM", "FW", a flow name) to a LatentFlow of this span.
    ``state`` holds a float32 array of shape (d,).
    """
    m, n = span
    teacher.check_span(m, n)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise LFTError("trajectories take one window of tokens, shape (1, T)")
    T = ids.shape[1]
    positions = sorted(set(int(p) for p in positions))
    if not positions:
        raise LFTError("pick at least one token")
    if positions[0] < 0 or positions[-1] >= T:
        raise LFTError(f"token positions must lie in 0..{T - 1}")
    if k < 1 or fine_steps < 1:
        raise LFTError("k and fine_steps must be at least 1")
    hs = teacher.hidden_states(ids, range(m, n + 1))
    words = [teacher.tokenizer.decode([int(i)]) for i in ids[0]]
    rows: list[dict] = []

    def add(kind: str, states: np.ndarray, times: np.ndarray) -> None:
        # states: (steps, T, d)
        for p in positions:
            for s, (t, state) in enumerate(zip(times, states[:, p])):
                rows.append({"token": words[p], "position": p, "kind": kind, "step": s, "t": float(t),
                             "state": state.astype(np.float32)})

    teacher_states = np.stack([hs[i][0].numpy() for i in range(m, n + 1)])
    times = np.linspace(0.0, 1.0, n - m + 1)
    add("teacher", teacher_states, times)
    add("straight", straight_path(teacher_states[0], teacher_states[-1], times), times)
    for label, flow in (flows or {}).items():
        if tuple(flow.span) != (m, n):
            raise LFTError(f"flow {label!r} replaces {flow.span[0]}:{flow.span[1]}, not {m}:{n}")
        with torch.no_grad():
            for kind, steps in ((label, k), (f"{label} (fine)", fine_steps)):
                path = flow(hs[m], k=steps, return_path=True)
                states = path.states[:, 0].float().numpy()
                t = path.times.float().numpy()
                add(kind, states, t if t.ndim == 1 else t[:, 0])
    return pd.DataFrame(rows, columns=COLUMNS)


def project_table(df: pd.DataFrame, method: str = "pca", seed: int = 0) -> pd.DataFrame:
    """A copy of ``df`` with columns x, y: one projection fitted on the pooled states of all rows (cached)."""
    if df.empty:
        raise LFTError("nothing to project")
    points = np.stack(df["state"].to_numpy()).astype(np.float32)
    coords = project(points, method=method, seed=seed).coords
    out = df.copy()
    out["x"], out["y"] = coords[:, 0], coords[:, 1]
    return out
