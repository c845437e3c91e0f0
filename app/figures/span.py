"""Choose a span: a value for every span [m, n) as a heatmap (recoupling ratio R on a log scale, affine NMSE
clipped), the colour limits that resolve their low values, and the skip-k KL bars."""
from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from app.figures.style import _finish, _log_ticks, baseline_colour


def _ceil_2_digits(x: float) -> float:
    """x rounded up to two significant digits (0.1234 -> 0.13), for a colour-scale limit a reader can quote."""
    if not x > 0:
        return 0.0
    unit = 10.0 ** (math.floor(math.log10(x)) - 1)
    return float(f"{math.ceil(x / unit - 1e-9) * unit:.6g}")


def colour_limit(values: np.ndarray, quantile: float = 0.95, floor: float = 0.0,
                 ceiling: float = math.inf) -> tuple[float, bool]:
    """The top of a colour scale that resolves where most values lie, and whether any value lies above it.

    The ``quantile`` of the finite values, rounded up to two significant digits, kept in [floor, ceiling] (and
    never above the largest value): when most spans have R < 0.1 and a few are near 1, the colours spread over
    the many low values and the few high ones are drawn at the top colour (clipped). When the quantile is above
    half the largest value, clipping would gain little: the scale then ends at the largest value (rounded up)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or not finite.max() > 0:
        return (floor if floor > 0 else 1.0), False
    top = float(finite.max())
    limit = min(max(_ceil_2_digits(float(np.quantile(finite, quantile))), floor), ceiling)
    if limit >= 0.5 * top:
        limit = min(max(_ceil_2_digits(top), floor), ceiling)
    return limit, top > limit


def _nice_up(x: float) -> float:
    """The smallest 1, 2 or 5 × 10^k at or above x > 0 (0.00195 -> 0.002, 0.03 -> 0.05)."""
    e = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * 10.0 ** e >= x * (1 - 1e-9):
            return float(f"{m * 10.0 ** e:.6g}")
    return float(f"{10.0 ** (e + 1):.6g}")


def log_colour_range(values: np.ndarray, lowest: float = 1e-3, highest_floor: float = 0.05) -> tuple[float, float]:
    """(floor, top) of a log colour scale for non-negative values with many zeros and small values: floor = the
    smallest positive value rounded up to 1, 2 or 5 × 10^k, kept in [lowest, highest_floor]; top = the largest
    value (at least 10 × floor, so the scale never collapses)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    positive = v[v > 0]
    floor = min(max(_nice_up(float(positive.min())), lowest), highest_floor) if positive.size else highest_floor
    top = max(float(positive.max()) if positive.size else 0.0, 10 * floor)
    return floor, top


PLOT_MARGIN_PX = 150  # title, axis titles and ticks: the part of a heatmap's height that is not cells


def marker_size(L: int, height: int) -> int:
    """The click marker of a cell: 60% of the cell's height in pixels (the cells are square, and the figure is at
    least as wide as it is tall: a full-width chart), at least 3 px."""
    cell = (height - PLOT_MARGIN_PX) / max(L, 1)
    return max(3, int(cell * 0.6))


def span_heatmap(matrix: np.ndarray, span: tuple[int, int] | None, title: str, value: str, zmax: float,
                 colorscale: str = "Viridis", height: int = 620, fmt: str = ".4g", clipped: bool = False,
                 log_floor: float | None = None) -> go.Figure:
    """A value for every span [m, n): x = end n, y = start m (m grows downwards); only m < n is filled.

    ``matrix`` shape (L+1, L+1) with NaN where m >= n. A transparent marker sits on every cell so that a
    click selects the span (plotly heatmaps do not report clicks), smaller than the cell: plotly gives a click to
    any marker that covers the cursor, so a marker wider than its cell would hand clicks on a cell's centre to the
    neighbouring span. The chosen span is outlined. Colour scale:
    linear from 0 to ``zmax``; ``clipped``: some values exceed ``zmax`` (they take the top colour; the colour
    bar says so, its top tick reads '≥ zmax'). With ``log_floor``, the colour is log10 of the value from
    log_floor (values at or below it, zeros included, share the lowest colour; tick '≤ log_floor') to zmax,
    with ticks labelled in the value's own units. The hover always shows the exact value.
    """
    L = matrix.shape[0] - 1
    z = matrix[:L, 1:]  # rows m = 0..L-1, columns n = 1..L
    m_idx, n_idx = np.nonzero(np.isfinite(z))
    m_vals, n_vals = m_idx, n_idx + 1
    v_vals = z[m_idx, n_idx]
    if log_floor:  # colour = log10(value), values at or below the floor share the lowest colour
        shown = np.log10(np.maximum(z, log_floor))
        zmin, ztop = math.log10(log_floor), math.log10(max(zmax, 10 * log_floor))
        tick_values = sorted({log_floor, *(t for t in _log_ticks([log_floor, zmax]) if t > log_floor)})
        ticks = [math.log10(t) for t in tick_values]
        ticktext = [f"≤ {log_floor:g}"] + [f"{t:g}" for t in tick_values[1:]]
        bar_title = f"{value} (log scale)"
    else:
        shown, zmin, ztop = z, 0.0, zmax
        step = _nice_up(zmax / 6) if zmax > 0 else 1.0
        ticks = [float(f"{i * step:.6g}") for i in range(int(zmax / step + 1e-9) + 1)]
        if clipped:  # the top of the scale is labelled '≥ zmax': every larger value has that colour
            ticks = [t for t in ticks if t < zmax - 0.3 * step] + [zmax]
        ticktext = [f"{t:g}" for t in ticks[:-1]] + [f"≥ {ticks[-1]:g}" if clipped else f"{ticks[-1]:g}"]
        bar_title = f"{value} (clipped at {zmax:g})" if clipped else value
    fig = go.Figure()
    fig.add_trace(go.Heatmap(
        z=shown, x=list(range(1, L + 1)), y=list(range(L)), zmin=zmin, zmax=ztop, colorscale=colorscale,
        colorbar=dict(title=dict(text=bar_title, side="right"), thickness=14, tickvals=ticks, ticktext=ticktext),
        hoverinfo="skip", name=value,
    ))
    fig.add_trace(go.Scatter(
        x=n_vals, y=m_vals, mode="markers", name="spans", showlegend=False,
        marker=dict(symbol="square", size=marker_size(L, height), color="rgba(0,0,0,0)"),
        customdata=np.stack([m_vals, n_vals, v_vals, n_vals - m_vals], axis=1),
        hovertemplate=("span %{customdata[0]}:%{customdata[1]}<br>m = %{customdata[0]}, n = %{customdata[1]}"
                       f"<br>blocks replaced: %{{customdata[3]}}<br>{html.escape(value)} = %{{customdata[2]:{fmt}}}"
                       "<extra></extra>"),
    ))
    if span is not None:
        m, n = span
        fig.add_shape(type="rect", x0=n - 0.5, x1=n + 0.5, y0=m - 0.5, y1=m + 0.5,
                      line=dict(color="#e4002b", width=3))
    _finish(fig, title, height)
    fig.update_xaxes(title="end of span n (block)", dtick=max(1, L // 15), range=[0.5, L + 0.5],
                     showgrid=False, constrain="domain")
    fig.update_yaxes(title="start of span m (block)", dtick=max(1, L // 15), range=[L - 0.5, -0.5],
                     showgrid=False, scaleanchor="x", constrain="domain")
    return fig


def recoupling_heatmap(matrix: np.ndarray, span: tuple[int, int] | None = None, pairs: int | None = None,
                       height: int = 620) -> go.Figure:
    """The recoupling ratio R(m, n) of every span, on a log colour scale ('R (log scale)').

    R spreads over orders of magnitude: on SmolLM2 39% of spans have R = 0, the median is 0.07, a quarter are
    above 0.2 and the spans from block 0 are near 1 (so a clip at a high percentile would still squash the low
    values). The colour is log10 R from the smallest non-zero R (rounded up to 1, 2 or 5 × 10^k, between 0.001
    and 0.05: R = 0 and the values below it share the lowest colour, tick '≤ 0.002') to the largest R, with
    ticks labelled in R (0.002, 0.005, 0.01, ..., 1). Hovering a span shows its exact R."""
    title = "Recoupling ratio R of every span [m, n)" + (f" ({pairs} pairs)" if pairs else "")
    floor, top = log_colour_range(matrix)
    return span_heatmap(matrix, span, title, "R", zmax=top, height=height, log_floor=floor)


def affine_heatmap(matrix: np.ndarray, span: tuple[int, int] | None = None, height: int = 620) -> go.Figure:
    """Held-out NMSE of the closed-form affine replacement of every span (0 = the span is exactly affine), the
    colour scale clipped at the 95th percentile like ``recoupling_heatmap`` (exact values on hover)."""
    zmax, clipped = colour_limit(matrix, quantile=0.95, floor=1e-6)
    return span_heatmap(matrix, span, "Affine baseline: held-out NMSE of every span", "held-out NMSE", zmax=zmax,
                        colorscale="Cividis", height=height, clipped=clipped)


def skip_kl_bars(table: pd.DataFrame, height: int = 300) -> go.Figure:
    """KL(teacher || skip-k) for a few k; ``table`` has columns k, kl."""
    ks = [int(k) for k in table["k"]]
    fig = go.Figure(go.Bar(x=[str(k) for k in ks], y=table["kl"], marker_color=baseline_colour("skip"), name="skip-k",
                           text=[f"{v:.3f}" for v in table["kl"]], textposition="outside",
                           customdata=[f"{k} block{'s' if k != 1 else ''}" for k in ks],
                           hovertemplate="skip %{customdata}: mean KL %{y:.4f} nats<extra></extra>"))
    _finish(fig, "Skipping blocks at the start of the span", height)
    fig.update_xaxes(title="blocks skipped (removed from the start of the span)", type="category")
    fig.update_yaxes(title="mean KL (nats)", rangemode="tozero")
    return fig
