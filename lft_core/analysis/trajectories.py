"""Latent trajectories of chosen tokens through a span, as one tidy table.

Path kinds, for a token at position p of a window and a span [m, n):

* ``teacher``: h_m, h_{m+1}, ..., h_n at times t = (i - m) / (n - m);
* ``straight``: (1 - t) h_m + t h_n sampled at the same times (the flow-matching interpolant);
* ``<label>``: a trained flow's k-step Euler walk from h_m (times 0, 1/k, ..., 1);
* ``<label> (fine)``: the same flow integrated with many small steps, to show the continuous curve;
* an end-point replacement (the closed-form affine baseline): h_m at t = 0 and its estimate of h_n at t = 1.

The flow sees the whole window (its attention is causal over the sequence), then the chosen positions are
selected. ``project_table`` adds 2-D coordinates fitted on the pooled states of every row (and, for PCA, the
share of variance each axis shows, in ``attrs``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lft_core.errors import LFTError
from lft_core.flow.latent import LatentFlow, Replacement, check_replaces
from lft_core.flow.losses import straight_path
from lft_core.analysis.projection import project
from lft_core.span import Span

if TYPE_CHECKING:
    from lft_core.model.teacher import Teacher

COLUMNS = ["token", "position", "kind", "step", "t", "state"]


def trajectory_table(
    teacher: Teacher,
    ids: torch.Tensor,
    span: Span | tuple[int, int],
    positions: Sequence[int],
    flows: Mapping[str, LatentFlow] | None = None,
    k: int = 3,
    fine_steps: int = 24,
    endpoints: Mapping[str, Replacement] | None = None,
) -> pd.DataFrame:
    """Rows (token, position, kind, step, t, state) for every chosen position and path kind.

    ``ids`` shape (1, T); ``flows`` maps a label ("SFM", "FW", a flow name) to a LatentFlow of this span;
    ``endpoints`` maps a label to a one-step replacement of this span (e.g. "affine": an AffineReplacement),
    drawn from h_m straight to its estimate of h_n. ``state`` holds a float32 array of shape (d,).
    """
    m, n = teacher.check_span(*span)
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
    words = teacher.decode_tokens(ids[0])
    rows: list[dict] = []

    def add(kind: str, states: np.ndarray, times: np.ndarray) -> None:
        # states: (steps, T, d)
        for p in positions:
            for s, (t, state) in enumerate(zip(times, states[:, p])):
                rows.append({"token": words[p], "position": p, "kind": kind, "step": s, "t": float(t),
                             "state": state.astype(np.float32)})

    teacher_states = torch.stack([hs[i][0] for i in range(m, n + 1)])  # (n − m + 1, T, d)
    times = torch.linspace(0.0, 1.0, n - m + 1)
    add("teacher", teacher_states.numpy(), times.numpy())
    x0, x1 = teacher_states[:1].expand_as(teacher_states), teacher_states[-1:].expand_as(teacher_states)
    add("straight", straight_path(x0, x1, times).numpy(), times.numpy())
    for label, flow in (flows or {}).items():
        check_replaces(flow, (m, n), label=f"flow {label!r}")
        with torch.no_grad():
            for kind, steps in ((label, k), (f"{label} (fine)", fine_steps)):
                path = flow(hs[m], k=steps, return_path=True)
                states = path.states[:, 0].float().numpy()
                t = path.times.float().numpy()
                add(kind, states, t if t.ndim == 1 else t[:, 0])
    for label, replacement in (endpoints or {}).items():
        check_replaces(replacement, (m, n), label=f"{label!r}")
        with torch.no_grad():
            end = replacement(hs[m], k=1)[0].float()
        add(label, torch.stack([hs[m][0], end]).numpy(), np.array([0.0, 1.0]))
    return pd.DataFrame(rows, columns=COLUMNS)


def centred(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` where every state of a token has the token's h_m (its teacher state at step 0)
    subtracted, so that all paths start at 0 and a picture shows how they move, not where tokens sit."""
    start = df[(df["kind"] == "teacher") & (df["step"] == 0)].set_index("position")["state"]
    return df.assign(state=[s - start[p] for s, p in zip(df["state"], df["position"])])


def project_table(df: pd.DataFrame, method: str = "pca", seed: int = 0) -> pd.DataFrame:
    """A copy of ``df`` with columns x, y: one projection fitted on the pooled states of all rows (cached).

    ``attrs["projection"]`` names the method ("pca" or "umap"); for PCA ``attrs["explained_variance"]`` is the
    share of the pooled states' variance along x and along y, e.g. [0.41, 0.22] (pandas keeps attrs through
    copies, column drops, row filters and pickling, so a figure can title its axes with them)."""
    if df.empty:
        raise LFTError("nothing to project")
    points = np.stack(df["state"].to_numpy()).astype(np.float32)
    proj = project(points, method=method, seed=seed)
    out = df.copy()
    out["x"], out["y"] = proj.coords[:, 0], proj.coords[:, 1]
    out.attrs["projection"] = proj.method
    if proj.explained_variance is not None:
        out.attrs["explained_variance"] = [float(v) for v in proj.explained_variance[:2]]
    return out
