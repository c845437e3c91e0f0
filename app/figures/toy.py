"""Teaching lab: learned k-step 2-D flows of the same coupling side by side, animated by one time slider."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.figures.style import _finish, _segments


TOY_BLUE, TOY_RED, TOY_ORANGE, TOY_GREEN = "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c"
TOY_POINT_SIZE, TOY_MARK_SIZE, TOY_MARK_OPACITY = 8, 5, 0.35


def toy_pair_animation(x0: np.ndarray, x1: np.ndarray, times: np.ndarray,
                       panels: Mapping[str, tuple[np.ndarray, np.ndarray]],
                       cross_marks: np.ndarray | None = None, height: int = 600,
                       lims: tuple[float, float, float, float] | None = None) -> go.Figure:
    """Learned k-step flows of the same coupling side by side, animated together by one time slider.

    x0, x1: (n, 2), start i travels to target i; times: (F,) the animation times in [0, 1]. ``panels`` maps a
    subplot title to (frames (F, n, 2): the points' positions at ``times``, misrouted (n,) bool: the flow
    delivers the point nearer another point's target than its own). cross_marks: (c, 2), where crossing
    straight paths come closest. lims: (x_min, x_max, y_min, y_max), shared by every panel.

    Per panel, bottom to top: straight paths (faint), targets (open circles), crossing marks (small, thin,
    translucent orange crosses), then the moving points (blue: own target nearest; red: misrouted), so the
    marks never hide a point. Every animation frame updates the points of every panel.
    """
    times = np.asarray(times, dtype=float)
    assert panels, "panels must name at least one flow"
    for name, (frames, misrouted) in panels.items():
        assert frames.shape == (len(times), len(x0), 2), (
            f"{name}: frames must have shape ({len(times)}, {len(x0)}, 2), got {tuple(frames.shape)}")
        assert misrouted.shape == (len(x0),), f"{name}: misrouted must have shape ({len(x0)},)"
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=list(panels), horizontal_spacing=0.06)
    xs, ys = _segments(x0, x1)
    moving: list[int] = []  # indices of the point traces, in frame order
    layers: list[tuple[np.ndarray, np.ndarray, bool]] = []  # (frames, mask, red) of each point trace

    def points(state: np.ndarray, mask: np.ndarray, red: bool, legend: bool) -> go.Scatter:
        name = "point, misrouted by the flow" if red else "point, nearest its own target"
        return go.Scatter(x=np.round(state[mask, 0], 4), y=np.round(state[mask, 1], 4), mode="markers", name=name,
                          legendgroup=name, showlegend=legend,
                          marker=dict(size=TOY_POINT_SIZE, color=TOY_RED if red else TOY_BLUE, opacity=1.0,
                                      line=dict(color="white", width=0.8)),
                          hovertemplate=f"{name}<br>(%{{x:.2f}}, %{{y:.2f}})<extra></extra>")

    # each kind of point is in the legend once, from the first panel that has such points (an empty trace gets
    # no legend entry)
    legend_col = {red: next((col for col, (_, m) in enumerate(panels.values(), start=1)
                             if (np.asarray(m, dtype=bool) == red).any()), None) for red in (False, True)}
    for col, (frames, misrouted) in enumerate(panels.values(), start=1):
        first = col == 1
        misrouted = np.asarray(misrouted, dtype=bool)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="straight path x0 → x1", legendgroup="path",
                                 showlegend=first, line=dict(color="rgba(0,0,0,0.08)", width=1), hoverinfo="skip"),
                      row=1, col=col)
        fig.add_trace(go.Scatter(x=x1[:, 0], y=x1[:, 1], mode="markers", name="target x1", legendgroup="target",
                                 showlegend=first, marker=dict(symbol="circle-open", size=7, color=TOY_GREEN,
                                                               opacity=0.6, line=dict(width=1)),
                                 hoverinfo="skip"), row=1, col=col)
        if cross_marks is not None and len(cross_marks):
            fig.add_trace(go.Scatter(x=cross_marks[:, 0], y=cross_marks[:, 1], mode="markers",
                                     name="crossing (straight paths closest)", legendgroup="crossing",
                                     showlegend=first,
                                     marker=dict(symbol="x-thin", size=TOY_MARK_SIZE, opacity=TOY_MARK_OPACITY,
                                                 color=TOY_ORANGE, line=dict(width=1, color=TOY_ORANGE)),
                                     hoverinfo="skip"), row=1, col=col)
        for red in (False, True):
            mask = misrouted if red else ~misrouted
            moving.append(len(fig.data))
            layers.append((frames, mask, red))
            fig.add_trace(points(frames[0], mask, red, legend_col[red] == col), row=1, col=col)
    fig.frames = [go.Frame(name=f"f{i}", traces=moving,
                           data=[go.Scatter(x=np.round(frames[i][mask, 0], 4), y=np.round(frames[i][mask, 1], 4))
                                 for frames, mask, _ in layers])  # positions only: the style stays
                  for i in range(len(times))]
    if lims is None:
        allp = np.concatenate([x0, x1] + [f.reshape(-1, 2) for f, _ in panels.values()])
        lo, hi = allp.min(0), allp.max(0)
        pad = 0.08 * float((hi - lo).max())
        lims = (lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad)
    still = dict(frame=dict(duration=0, redraw=False), transition=dict(duration=0), mode="immediate")
    play = dict(label="▶ play", method="animate",
                args=[None, dict(frame=dict(duration=120, redraw=False), transition=dict(duration=0),
                                 fromcurrent=True, mode="immediate")])
    pause = dict(label="❚❚ pause", method="animate", args=[[None], still])
    _finish(fig, None, height,
            updatemenus=[dict(type="buttons", direction="left", x=0, y=-0.12, xanchor="left", yanchor="top",
                              buttons=[play, pause], showactive=False, pad=dict(t=0, r=10))],
            sliders=[dict(active=0, x=0.2, len=0.8, y=-0.12, yanchor="top", pad=dict(t=0),
                          currentvalue=dict(prefix="t = ", xanchor="right", font=dict(size=13, color="#444")),
                          font=dict(size=10, color="#444" if len(times) <= 25 else "rgba(0,0,0,0)"),  # crowded
                          steps=[dict(label=f"{t:.2f}", method="animate", args=[[f"f{i}"], still])
                                 for i, t in enumerate(times)])],
            legend=dict(orientation="h", y=1.08, yanchor="bottom", x=0, font=dict(size=11)), showlegend=True)
    fig.update_layout(margin=dict(l=50, r=20, t=110, b=130))
    for col in range(1, len(panels) + 1):
        fig.update_xaxes(title="x", range=[lims[0], lims[1]], zeroline=False, row=1, col=col)
        fig.update_yaxes(title="y", range=[lims[2], lims[3]], zeroline=False, row=1, col=col,
                         scaleanchor="x" if col == 1 else f"x{col}")
    return fig
