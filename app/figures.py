"""Every figure of the app, built from engine results with plotly only (this module never imports Streamlit).

Functions take plain numbers (numpy arrays, lists, DataFrames) and return a ``plotly.graph_objects.Figure``
(or, for the per-token KL view, an HTML string). Pages decide what to compute; this module decides how it
looks, so the same figure can be saved as HTML, shown in the app, or checked in a test.
"""
from __future__ import annotations

import html
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

TEMPLATE = "plotly_white"
PALETTE = qualitative.D3 + qualitative.Set2
KL_COLORSCALE = "YlOrRd"
KL_CLASS = "lft-token"  # the CSS class of every coloured token span (the browser test looks for it)


def _finish(fig: go.Figure, title: str | None, height: int, **layout) -> go.Figure:
    fig.update_layout(template=TEMPLATE, height=height, margin=dict(l=60, r=20, t=60 if title else 30, b=50),
                      title=dict(text=title, x=0, xanchor="left", y=0.985, yanchor="top") if title else None,
                      **layout)
    return fig


def to_html(fig: go.Figure) -> str:
    """A standalone HTML page of the figure (plotly.js from the CDN)."""
    return fig.to_html(include_plotlyjs="cdn", full_html=True)


# -------------------------------------------------------------------------------------------------------------
# Choose a span


def span_heatmap(matrix: np.ndarray, span: tuple[int, int] | None, title: str, value: str, zmax: float,
                 colorscale: str = "Viridis", height: int = 620, fmt: str = ".3f") -> go.Figure:
    """A value for every span [m, n): x = end n, y = start m (m grows downwards); only m < n is filled.

    ``matrix`` shape (L+1, L+1) with NaN where m >= n. A transparent marker sits on every cell so that a
    click selects the span (plotly heatmaps do not report clicks); the chosen span is outlined.
    """
    L = matrix.shape[0] - 1
    z = matrix[:L, 1:]  # rows m = 0..L-1, columns n = 1..L
    m_idx, n_idx = np.nonzero(np.isfinite(z))
    m_vals, n_vals = m_idx, n_idx + 1
    v_vals = z[m_idx, n_idx]
    fig = go.Figure()
    fig.add_trace(go.Heatmap(
        z=z, x=list(range(1, L + 1)), y=list(range(L)), zmin=0.0, zmax=zmax, colorscale=colorscale,
        colorbar=dict(title=dict(text=value, side="right"), thickness=14), hoverinfo="skip", name=value,
    ))
    fig.add_trace(go.Scatter(
        x=n_vals, y=m_vals, mode="markers", name="spans", showlegend=False,
        marker=dict(symbol="square", size=max(6, min(22, 560 // max(L, 1))), color="rgba(0,0,0,0)"),
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
    fig.update_xaxes(title="n (first block after the span)", dtick=max(1, L // 15), range=[0.5, L + 0.5],
                     showgrid=False, constrain="domain")
    fig.update_yaxes(title="m (first replaced block)", dtick=max(1, L // 15), range=[L - 0.5, -0.5],
                     showgrid=False, scaleanchor="x", constrain="domain")
    return fig


def recoupling_heatmap(matrix: np.ndarray, span: tuple[int, int] | None = None, pairs: int | None = None,
                       height: int = 620) -> go.Figure:
    """The recoupling ratio R(m, n) of every span, on a fixed 0..1 scale."""
    title = "Recoupling ratio R of every span [m, n)" + (f" ({pairs} pairs)" if pairs else "")
    return span_heatmap(matrix, span, title, "R", zmax=1.0, height=height)


def affine_heatmap(matrix: np.ndarray, span: tuple[int, int] | None = None, height: int = 620) -> go.Figure:
    """Held-out NMSE of the closed-form affine replacement of every span (0 = the span is exactly affine)."""
    finite = matrix[np.isfinite(matrix)]
    zmax = float(np.quantile(finite, 0.98)) if finite.size else 1.0
    return span_heatmap(matrix, span, "Affine baseline: held-out NMSE of every span", "NMSE", zmax=max(zmax, 1e-6),
                        colorscale="Cividis", height=height)


def skip_kl_bars(table: pd.DataFrame, height: int = 300) -> go.Figure:
    """KL(teacher || skip-k) for a few k; ``table`` has columns k, kl."""
    fig = go.Figure(go.Bar(x=[f"skip {k}" for k in table["k"]], y=table["kl"], marker_color=PALETTE[1],
                           text=[f"{v:.3f}" for v in table["kl"]], textposition="outside",
                           hovertemplate="%{x}: KL %{y:.4f}<extra></extra>"))
    _finish(fig, "Skipping blocks at the start of the span", height)
    fig.update_yaxes(title="mean KL (nats)", rangemode="tozero")
    return fig


# -------------------------------------------------------------------------------------------------------------
# Training


def _log_ticks(values: Sequence[float]) -> list[float]:
    """Readable tick values for a log axis inside the data range: 1, 2, 5 x 10^k (every digit when the range is
    narrow, decades only when it is wide)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0], dtype=float)
    if v.size == 0:
        return []
    lo, hi = v.min(), v.max()
    decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
    for mantissas in ((1, 2, 5), tuple(range(1, 10))):
        ticks = [float(m) * 10.0 ** e for e in decades for m in mantissas]
        ticks = [t for t in ticks if lo * 0.999 <= t <= hi * 1.001]
        if len(ticks) >= 3:
            break
    if len(ticks) > 9:
        ticks = [10.0 ** e for e in decades if lo <= 10.0 ** e <= hi]
    return [float(f"{t:.6g}") for t in ticks]


def smooth(values: Sequence[float], alpha: float = 0.1) -> np.ndarray:
    """Exponential moving average (bias-corrected), to show the trend of a noisy training loss."""
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = (1 - alpha) * avg + alpha * float(v)
        out[i] = avg / (1 - (1 - alpha) ** (i + 1))
    return out


def training_curves(histories: Mapping[str, Sequence[Mapping]], height: int = 360) -> go.Figure:
    """Loss (log scale; raw faint, smoothed bold when long) and held-out NMSE against step, one colour per run.

    ``histories`` maps a label to a list of events with ``step``, ``loss`` and (on evaluation steps)
    ``heldout_nmse``.
    """
    with_nmse = any(e.get("heldout_nmse") is not None for h in histories.values() for e in h)
    fig = make_subplots(rows=1, cols=2 if with_nmse else 1, horizontal_spacing=0.1,
                        subplot_titles=("training loss", "held-out NMSE") if with_nmse else ("training loss",))
    all_losses: list[float] = []
    for i, (label, history) in enumerate(histories.items()):
        color = PALETTE[i % len(PALETTE)]
        steps = [e["step"] for e in history if e.get("loss") is not None]
        losses = [e["loss"] for e in history if e.get("loss") is not None]
        noisy = len(losses) > 30
        fig.add_trace(go.Scatter(x=steps, y=losses, mode="lines", name=label, legendgroup=label,
                                 showlegend=not noisy, opacity=0.3 if noisy else 1.0,
                                 line=dict(color=color, width=1 if noisy else 2),
                                 hovertemplate=f"{html.escape(label)}<br>step %{{x}}<br>"
                                               "loss %{y:.4g}<extra></extra>"),
                      row=1, col=1)
        if noisy:
            fig.add_trace(go.Scatter(x=steps, y=smooth(losses), mode="lines", name=label, legendgroup=label,
                                     line=dict(color=color, width=2.5),
                                     hovertemplate=f"{html.escape(label)} (smoothed)<br>step %{{x}}<br>"
                                                   "loss %{y:.4g}<extra></extra>"),
                          row=1, col=1)
        all_losses.extend(losses)
        ev = [e for e in history if e.get("heldout_nmse") is not None]
        if not with_nmse:
            continue
        fig.add_trace(go.Scatter(x=[e["step"] for e in ev], y=[e["heldout_nmse"] for e in ev], mode="lines+markers",
                                 name=label, legendgroup=label, showlegend=False, line=dict(color=color, width=2),
                                 hovertemplate=f"{html.escape(label)}<br>step %{{x}}<br>"
                                               "NMSE %{y:.4f}<extra></extra>"),
                      row=1, col=2)
    _finish(fig, None, height, legend=dict(orientation="h", y=-0.2))
    ticks = _log_ticks(all_losses)
    fig.update_yaxes(type="log", tickvals=ticks or None, ticktext=[f"{t:g}" for t in ticks] or None, row=1, col=1)
    if with_nmse:
        fig.update_yaxes(rangemode="tozero", row=1, col=2)
    fig.update_xaxes(title="step")
    return fig


# -------------------------------------------------------------------------------------------------------------
# Latent trajectories

_KIND_STYLE = {
    "teacher": dict(dash="solid", width=2.5, symbol="circle", size=8),
    "straight": dict(dash="dot", width=1.5, symbol="circle-open", size=6),
    "affine": dict(dash="dashdot", width=1.5, symbol="x", size=10),
}
_FLOW_DASH = ["dash", "dashdot", "longdash", "longdashdot"]
_FLOW_SYMBOL = ["diamond", "square", "triangle-up", "star"]


def _kind_style(kind: str, flow_kinds: Sequence[str]) -> dict:
    fine = kind.endswith(" (fine)")
    base = kind[: -len(" (fine)")] if fine else kind
    if base in _KIND_STYLE:
        style = dict(_KIND_STYLE[base])
    else:
        j = list(flow_kinds).index(base) if base in flow_kinds else 0
        style = dict(dash=_FLOW_DASH[j % 4], width=2, symbol=_FLOW_SYMBOL[j % 4], size=8)
    if fine:
        style.update(width=1, size=0)
    style["fine"] = fine
    return style


def trajectory_figure(df: pd.DataFrame, kinds: Sequence[str] | None = None, axis: str = "PC",
                      height: int = 620) -> go.Figure:
    """Lines + markers per token and path kind in a 2-D projection.

    ``df`` has columns token, position, kind, step, t, x, y (from ``trajectories.project_table``). Colour =
    token, line style = kind (teacher solid, straight dotted, each flow its own dash; '(fine)' thin, no
    markers). The first point of every path is h_m, the last the (predicted) h_n. The first legend lists the
    tokens (click to hide one), the second explains the line styles.
    """
    kinds = list(kinds) if kinds is not None else list(dict.fromkeys(df["kind"]))
    flow_kinds = [k for k in dict.fromkeys(df["kind"]) if k not in _KIND_STYLE and not k.endswith(" (fine)")]
    positions = list(dict.fromkeys(df.sort_values("position")["position"]))
    fig = go.Figure()
    for pi, pos in enumerate(positions):
        color = PALETTE[pi % len(PALETTE)]
        rows = df[df["position"] == pos]
        token = rows["token"].iloc[0]
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"{pos}: {token!r}", legendgroup=f"pos{pos}",
                                 line=dict(color=color, width=4), legend="legend"))
        for kind in kinds:
            part = rows[rows["kind"] == kind].sort_values("step")
            if part.empty:
                continue
            style = _kind_style(kind, flow_kinds)
            fig.add_trace(go.Scatter(
                x=part["x"], y=part["y"], mode="lines" if style["fine"] else "lines+markers", showlegend=False,
                legendgroup=f"pos{pos}", opacity=0.5 if style["fine"] else 1.0,
                line=dict(color=color, dash=style["dash"], width=style["width"]),
                marker=dict(color=color, symbol=style["symbol"], size=style["size"]),
                customdata=np.stack([part["position"], part["t"], part["step"]], axis=1),
                text=[kind] * len(part),
                hovertemplate=(f"token {html.escape(repr(token))}<br>position %{{customdata[0]}}<br>"
                               "kind %{text}<br>t = %{customdata[1]:.3f} (step %{customdata[2]})<extra></extra>"),
            ))
        start = rows[(rows["kind"] == "teacher") & (rows["step"] == 0)]
        if not start.empty:
            fig.add_trace(go.Scatter(x=start["x"], y=start["y"], mode="markers", showlegend=False, hoverinfo="skip",
                                     legendgroup=f"pos{pos}",
                                     marker=dict(size=15, color="rgba(0,0,0,0)", line=dict(color=color, width=2))))
    for kind in kinds:
        style = _kind_style(kind, flow_kinds)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines" if style["fine"] else "lines+markers", name=kind,
                                 legend="legend2", line=dict(color="#555", dash=style["dash"], width=style["width"]),
                                 marker=dict(color="#555", symbol=style["symbol"], size=style["size"])))
    _finish(fig, "Latent trajectories through the span (ringed: h_m at t = 0)", height,
            legend=dict(title=dict(text="tokens"), y=1.0, yanchor="top", x=1.02, font=dict(size=12)),
            legend2=dict(title=dict(text="paths"), y=0.45, yanchor="top", x=1.02, font=dict(size=12)))
    fig.update_xaxes(title=f"{axis} 1", zeroline=False)
    fig.update_yaxes(title=f"{axis} 2", zeroline=False)
    return fig


# -------------------------------------------------------------------------------------------------------------
# Coupling crossings


def _segments(a: np.ndarray, b: np.ndarray) -> tuple[list, list]:
    xs, ys = [], []
    for p, q in zip(a, b):
        xs += [p[0], q[0], None]
        ys += [p[1], q[1], None]
    return xs, ys


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
                     height: int = 600) -> go.Figure:
    """Straight paths x0 -> x1 of sampled tokens in a 2-D projection.

    p0, p1 (and p_hat, the flow's end points): shape (n, 2). ``crossing``: (n,) bool, the token is in at least
    one crossing pair. ``highlight`` (i, j) draws one crossing pair in red. ``recoupled``: (n,) bool from
    ``flow_recoupled``. ``box`` [[x0, x1], [y0, y1]] zooms the axes (see ``bulk_box``).
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
                                  (rec, "#d62728", "flow end point, recoupled")):
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
    _finish(fig, "Straight paths of sampled tokens (PCA of pooled x0, x1)", height,
            legend=dict(orientation="h", y=-0.15))
    fig.update_xaxes(title="PC 1", zeroline=False, range=None if box is None else list(box[0]))
    fig.update_yaxes(title="PC 2", zeroline=False, range=None if box is None else list(box[1]))
    return fig


def matching_figure(cost: np.ndarray, assignment: np.ndarray, tokens: Sequence[str], height: int = 560) -> go.Figure:
    """Squared-distance cost ‖x0_i − x1_j‖² (rows i = starts, columns j = targets) with the optimal assignment σ.

    Colour is log10 of the cost (a few huge-norm tokens would otherwise flatten everything else). White dots:
    σ(i) = i (straight pairing kept); red crosses: σ(i) ≠ i (optimal transport recouples i).
    """
    n = cost.shape[0]
    labels = [f"{i}: {t!r}" for i, t in enumerate(tokens)]
    positive = cost[cost > 0]
    floor = float(positive.min()) if positive.size else 1.0
    fig = go.Figure(go.Heatmap(
        z=np.log10(np.maximum(cost, floor)), customdata=cost, colorscale="Blues", reversescale=True,
        colorbar=dict(title=dict(text="log10 cost", side="right"), thickness=14),
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
    _finish(fig, "Optimal assignment of starts to targets", height, legend=dict(orientation="h", y=-0.12))
    fig.update_xaxes(title="target j (x1)", range=[-0.5, n - 0.5], constrain="domain")
    fig.update_yaxes(title="start i (x0)", range=[n - 0.5, -0.5], scaleanchor="x", constrain="domain")
    return fig


# -------------------------------------------------------------------------------------------------------------
# Per-token KL


def kl_color(value: float, vmax: float) -> str:
    """Background colour of a token with this KL (0 -> white-ish, vmax and above -> dark red)."""
    frac = 0.0 if not np.isfinite(value) else float(np.clip(value / vmax, 0.0, 1.0)) if vmax > 0 else 0.0
    return sample_colorscale(KL_COLORSCALE, [0.02 + 0.98 * frac])[0]


def _text_color(value: float, vmax: float) -> str:
    return "white" if vmax > 0 and value / vmax > 0.7 else "#111"


def _top_lines(label: str, top: Sequence[tuple[str, float]]) -> str:
    return f"{label}: " + ", ".join(f"{tok!r} {p:.2f}" for tok, p in top)


def token_kl_html(tokens: Sequence[str], kl: np.ndarray, tops: Mapping[str, Sequence[Sequence[tuple[str, float]]]],
                  vmax: float, colour_label: str) -> str:
    """The text as coloured spans (class ``lft-token``): background = KL at that position.

    Position t's colour is the KL of the next-token distribution computed after reading token t (the last
    token predicts beyond the text). The title attribute lists each model's top-5 next tokens.
    """
    parts = ['<div class="lft-kl-text" style="line-height:2.1;font-family:ui-monospace,Menlo,monospace;'
             'font-size:0.95rem;white-space:pre-wrap;word-break:break-word">']
    for t, tok in enumerate(tokens):
        value = float(kl[t])
        tip = [f"position {t}: {tok!r}", f"KL(teacher || {colour_label}) = {value:.4f}", "next token, top 5:"]
        tip += [_top_lines(label, top[t]) for label, top in tops.items()]
        shown = html.escape(tok).replace("\n", "↵\n")
        if not shown.strip():
            shown = shown.replace(" ", "&nbsp;") or "&nbsp;"
        parts.append(
            f'<span class="{KL_CLASS}" data-pos="{t}" data-kl="{value:.5f}" '
            f'title="{html.escape(chr(10).join(tip), quote=True)}" '
            f'style="background:{kl_color(value, vmax)};color:{_text_color(value, vmax)};border-radius:3px;'
            f'padding:1px 0;margin:0 1px">{shown}</span>'
        )
    parts.append("</div>")
    return "".join(parts)


def kl_legend_html(vmax: float, label: str) -> str:
    """A colour bar from 0 to vmax nats for the coloured text."""
    stops = ", ".join(f"{kl_color(v * vmax, vmax)} {v * 100:.0f}%" for v in np.linspace(0, 1, 6))
    return (f'<div class="lft-kl-legend" style="display:flex;align-items:center;gap:8px;font-size:0.85rem">'
            f'<span>KL(teacher ‖ {html.escape(label)}):</span><span>0</span>'
            f'<span style="display:inline-block;width:220px;height:12px;border-radius:3px;'
            f'background:linear-gradient(to right, {stops})"></span><span>≥ {vmax:.2f} nats</span>'
            f'<span style="color:#666">(hover a token for the top-5 next tokens)</span></div>')


def kl_per_position(tokens: Sequence[str], kl: Mapping[str, np.ndarray], height: int = 320) -> go.Figure:
    """KL(teacher || model) at every position, one line per model (the teacher itself is left out)."""
    fig = go.Figure()
    x = np.arange(len(tokens))
    for i, (label, values) in enumerate(kl.items()):
        fig.add_trace(go.Scatter(x=x, y=values, mode="lines+markers", name=label, text=[repr(t) for t in tokens],
                                 line=dict(color=PALETTE[(i + 1) % len(PALETTE)]), marker=dict(size=5),
                                 hovertemplate=f"{html.escape(label)}<br>position %{{x}}: %{{text}}<br>"
                                               "KL %{y:.4f}<extra></extra>"))
    _finish(fig, "KL per position", height, legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(title="position")
    fig.update_yaxes(title="KL (nats)", rangemode="tozero")
    return fig


# -------------------------------------------------------------------------------------------------------------
# Compare spans


def params_nmse_scatter(table: pd.DataFrame, height: int = 360) -> go.Figure:
    """Held-out NMSE against blocks replaced, one marker per flow (colour = method)."""
    fig = go.Figure()
    for i, (method, part) in enumerate(table.groupby("method")):
        fig.add_trace(go.Scatter(x=part["blocks"], y=part["heldout_nmse"], mode="markers", name=method,
                                 marker=dict(size=11, color=PALETTE[i % len(PALETTE)]), text=part["name"],
                                 hovertemplate="%{text}<br>blocks %{x}<br>NMSE %{y:.4f}<extra></extra>"))
    _finish(fig, "Held-out NMSE against blocks replaced", height)
    fig.update_xaxes(title="blocks replaced (n − m)", dtick=1)
    fig.update_yaxes(title="held-out NMSE", rangemode="tozero")
    return fig


# -------------------------------------------------------------------------------------------------------------
# Teaching lab


def toy_animation(x0: np.ndarray, x1: np.ndarray, frames: np.ndarray, times: np.ndarray, recoupled: np.ndarray,
                  cross_marks: np.ndarray | None = None, title: str = "", height: int = 520,
                  lims: tuple[float, float, float, float] | None = None) -> go.Figure:
    """Points moving along a learned k-step flow, with their straight paths drawn faintly.

    x0, x1: (n, 2); frames: (F, n, 2) positions at ``times`` (F,); recoupled: (n,) bool (red when the walk
    ended nearer another point's target); cross_marks: (c, 2) where crossing straight paths come closest.
    """
    fig = go.Figure()
    xs, ys = _segments(x0, x1)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="straight path",
                             line=dict(color="rgba(0,0,0,0.08)", width=1),
                             hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=x1[:, 0], y=x1[:, 1], mode="markers", name="target x1",
                             marker=dict(symbol="circle-open", size=6, color="rgba(44,160,44,0.6)"), hoverinfo="skip"))
    if cross_marks is not None and len(cross_marks):
        fig.add_trace(go.Scatter(x=cross_marks[:, 0], y=cross_marks[:, 1], mode="markers", name="crossing",
                                 marker=dict(symbol="x-thin", size=7, color="rgba(255,127,14,0.7)",
                                             line=dict(width=1.5, color="rgba(255,127,14,0.7)")),
                                 hoverinfo="skip"))
    colors = np.where(recoupled, "#d62728", "#1f77b4")
    moving = len(fig.data)

    def points(state: np.ndarray) -> go.Scatter:
        return go.Scatter(x=state[:, 0], y=state[:, 1], mode="markers", name="point (red: recoupled)",
                          marker=dict(size=6, color=colors, line=dict(width=0)),
                          hovertemplate="(%{x:.2f}, %{y:.2f})<extra></extra>")

    fig.add_trace(points(frames[0]))
    fig.frames = [go.Frame(data=[points(f)], traces=[moving], name=f"{t:.2f}") for f, t in zip(frames, times)]
    if lims is None:
        allp = np.concatenate([x0, x1, frames.reshape(-1, 2)])
        lo, hi = allp.min(0), allp.max(0)
        pad = 0.08 * (hi - lo).max()
        lims = (lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad)
    play = dict(label="▶ play", method="animate",
                args=[None, dict(frame=dict(duration=120, redraw=False), transition=dict(duration=0),
                                 fromcurrent=True, mode="immediate")])
    pause = dict(label="❚❚", method="animate",
                 args=[[None], dict(frame=dict(duration=0, redraw=False), mode="immediate")])
    _finish(fig, title, height,
            updatemenus=[dict(type="buttons", direction="left", x=0, y=-0.1, xanchor="left", yanchor="top",
                              buttons=[play, pause], showactive=False, pad=dict(t=0, r=10))],
            sliders=[dict(active=0, x=0.24, len=0.76, y=-0.1, yanchor="top", pad=dict(t=0),
                          currentvalue=dict(prefix="t = ", xanchor="right", font=dict(size=12)),
                          steps=[dict(label=f"{t:.2f}", method="animate",
                                      args=[[f"{t:.2f}"], dict(frame=dict(duration=0, redraw=False), mode="immediate")])
                                 for t in times])],
            legend=dict(orientation="h", y=1.01, yanchor="bottom", x=0, font=dict(size=11)), showlegend=True)
    fig.update_layout(margin=dict(l=40, r=20, t=105, b=120))
    fig.update_xaxes(range=[lims[0], lims[1]], zeroline=False)
    fig.update_yaxes(range=[lims[2], lims[3]], zeroline=False, scaleanchor="x")
    return fig
