"""Coupling crossings: the straight paths x0 -> x1 of sampled tokens (crossing pairs, a flow's misrouted end
points) and the optimal matching of starts to targets."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from app.figures.style import (_bottom_margin, _finish, _legend_below, _legend_rows, _log_ticks, _segments,
                               projection_axis_titles)


def bulk_box(points: np.ndarray, lo: float = 5.0, hi: float = 95.0, pad: float = 0.35) -> tuple[np.ndarray, int]:
    """Axis limits [[x0, x1], [y0, y1]] around the bulk of 2-D points (percentiles, padded) and how many
    points fall outside them (outliers such as attention-sink-like tokens that would squash the picture)."""
    a, b = np.percentile(points, lo, axis=0), np.percentile(points, hi, axis=0)
    span = np.maximum(b - a, 1e-9)
    box = np.stack([a - pad * span, b + pad * span], axis=1)
    outside = ~((points >= box[:, 0]) & (points <= box[:, 1])).all(axis=1)
    return box, int(outside.sum())


def crossings_figure(p0: np.ndarray, p1: np.ndarray, tokens: Sequence[str], crossing: np.ndarray,
                     highlight: tuple[int, int] | None = None, p_hat: np.ndarray | None = None,
                     recoupled: np.ndarray | None = None, box: np.ndarray | None = None,
                     height: int = 600, explained_variance: Sequence[float] | None = None) -> go.Figure:
    """Straight paths x0 -> x1 of sampled tokens in a 2-D projection.

    p0, p1 (and p_hat, the flow's end points): shape (n, 2). ``crossing``: (n,) bool, the token is in at least
    one crossing pair. ``highlight`` (i, j) draws one crossing pair in red. ``recoupled``: (n,) bool from
    ``flow_recoupled``. ``box`` [[x0, x1], [y0, y1]] zooms the axes (see ``bulk_box``). ``explained_variance``:
    the PCA's share of variance per axis (``Projection.explained_variance``), shown in the axis titles.
    """
    fig = go.Figure()
    calm = ~crossing
    for mask, color, name in ((calm, "rgba(120,120,120,0.35)", "straight path (no crossing)"),
                              (crossing, "rgba(255,127,14,0.55)", "straight path in a crossing pair")):
        if mask.any():
            xs, ys = _segments(p0[mask], p1[mask])
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name, line=dict(color=color, width=1.2),
                                     hoverinfo="skip"))
    labels = [f"{i}: {t!r}" for i, t in enumerate(tokens)]
    fig.add_trace(go.Scatter(x=p0[:, 0], y=p0[:, 1], mode="markers", name="x0 = h_m",
                             marker=dict(symbol="circle", size=7, color="#1f77b4"), text=labels,
                             hovertemplate="%{text}<br>x0 (start)<extra></extra>"))
    fig.add_trace(go.Scatter(x=p1[:, 0], y=p1[:, 1], mode="markers", name="x1 = h_n",
                             marker=dict(symbol="square", size=7, color="#2ca02c"), text=labels,
                             hovertemplate="%{text}<br>x1 (target)<extra></extra>"))
    if p_hat is not None:
        rec = recoupled if recoupled is not None else np.zeros(len(p_hat), dtype=bool)
        for mask, color, name in ((~rec, "#9467bd", "flow end point (own target nearest)"),
                                  (rec, "#d62728", "flow end point, misrouted (another target nearer)")):
            if mask.any():
                fig.add_trace(go.Scatter(x=p_hat[mask, 0], y=p_hat[mask, 1], mode="markers", name=name,
                                         marker=dict(symbol="diamond", size=8, color=color,
                                                     line=dict(color="white", width=0.5)),
                                         text=[labels[i] for i in np.nonzero(mask)[0]],
                                         hovertemplate="%{text}<br>flow end point<extra></extra>"))
    if highlight is not None:
        i, j = highlight
        xs, ys = _segments(p0[[i, j]], p1[[i, j]])
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"selected pair {i} × {j}",
                                 line=dict(color="#e4002b", width=4), marker=dict(size=11, color="#e4002b"),
                                 hoverinfo="skip"))
    rows = _legend_rows([t.name for t in fig.data])
    _finish(fig, "Straight paths x0 → x1 (PCA)", height, legend=_legend_below(rows))
    fig.update_layout(margin=dict(b=_bottom_margin(rows)))
    x_title, y_title = projection_axis_titles("PC", explained_variance)
    fig.update_xaxes(title=x_title, zeroline=False, range=None if box is None else list(box[0]))
    fig.update_yaxes(title=y_title, zeroline=False, range=None if box is None else list(box[1]))
    return fig


def matching_figure(cost: np.ndarray, assignment: np.ndarray, tokens: Sequence[str], height: int = 560) -> go.Figure:
    """Squared-distance cost ‖x0_i − x1_j‖² (rows i = starts, columns j = targets) with the optimal assignment σ.

    Colour is log10 of the cost, ticks labelled in cost units (a few huge-norm tokens would otherwise flatten
    everything else). White dots: σ(i) = i (straight pairing kept); red crosses: σ(i) ≠ i (optimal transport
    recouples i).
    """
    n = cost.shape[0]
    labels = [f"{i}: {t!r}" for i, t in enumerate(tokens)]
    positive = cost[cost > 0]
    floor = float(positive.min()) if positive.size else 1.0
    ticks = _log_ticks([floor, float(cost.max()) if cost.size else 1.0])
    fig = go.Figure(go.Heatmap(
        z=np.log10(np.maximum(cost, floor)), customdata=cost, colorscale="Blues", reversescale=True,
        colorbar=dict(title=dict(text="squared distance ‖x0_i − x1_j‖² (log scale)", side="right"), thickness=14,
                      tickvals=[math.log10(t) for t in ticks] or None, ticktext=[f"{t:g}" for t in ticks] or None),
        hovertemplate="start %{y} → target %{x}<br>‖x0_i − x1_j‖² = %{customdata:.4g}<extra></extra>",
    ))
    rows = np.arange(n)
    kept = assignment == rows
    for mask, style, name in ((kept, dict(symbol="circle", color="white", size=5,
                                             line=dict(color="black", width=0.5)), "σ(i) = i"),
                              (~kept, dict(symbol="x", color="#e4002b", size=8), "σ(i) ≠ i (recoupled)")):
        if mask.any():
            fig.add_trace(go.Scatter(x=assignment[mask], y=rows[mask], mode="markers", marker=style, name=name,
                                     text=[labels[i] for i in rows[mask]],
                                     hovertemplate="%{text} → target %{x}<extra>" + name + "</extra>"))
    _finish(fig, "Optimal assignment of starts to targets", height, legend=_legend_below(1), showlegend=True)
    fig.update_layout(margin=dict(b=_bottom_margin(1)))
    fig.update_xaxes(title="target token j (its x1 = h_n)", range=[-0.5, n - 0.5], constrain="domain")
    fig.update_yaxes(title="start token i (its x0 = h_m)", range=[n - 0.5, -0.5], scaleanchor="x",
                     constrain="domain")
    return fig
