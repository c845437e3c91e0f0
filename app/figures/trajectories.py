"""Latent trajectories: the teacher's path, the straight path and trained flows of chosen tokens through a span,
in a 2-D projection."""
from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from app.figures.style import PALETTE, _finish, flow_colours, projection_axis_titles
from lft_core.analysis.baselines import BASELINES


_KIND_STYLE = {
    "teacher": dict(dash="solid", width=2.5, symbol="circle", size=8),
    "straight": dict(dash="dot", width=1.5, symbol="circle-open", size=6),
}


def _reference_style(base: str) -> dict | None:
    """The line style of the teacher, the straight path or a baseline's end point (kind = its registered name)."""
    if base in _KIND_STYLE:
        return dict(_KIND_STYLE[base])
    if base in BASELINES:
        return dict(dash="dashdot", width=1.5, symbol=BASELINES[base].symbol, size=10)
    return None
_FLOW_DASH = ["dash", "dashdot", "longdash", "longdashdot"]
_FLOW_SYMBOL = ["diamond", "square", "triangle-up", "star"]


def _kind_style(kind: str, flow_kinds: Sequence[str]) -> dict:
    fine = kind.endswith(" (fine)")
    base = kind[: -len(" (fine)")] if fine else kind
    style = _reference_style(base)
    if style is None:
        j = list(flow_kinds).index(base) if base in flow_kinds else 0
        style = dict(dash=_FLOW_DASH[j % 4], width=2, symbol=_FLOW_SYMBOL[j % 4], size=8)
    if fine:
        style.update(width=1, size=0)
    style["fine"] = fine
    return style


def _kind_label(kind: str) -> str:
    """How a path kind reads in the legend and hover: 'straight' -> 'straight path', a baseline's name ('affine')
    -> 'affine baseline (end point)', 'FW name (fine)' -> 'FW name (fine steps)'."""
    fine = kind.endswith(" (fine)")
    base = kind[: -len(" (fine)")] if fine else kind
    base = "straight path" if base == "straight" else f"{base} baseline (end point)" if base in BASELINES else base
    return f"{base} (fine steps)" if fine else base


def trajectory_figure(df: pd.DataFrame, kinds: Sequence[str] | None = None, axis: str = "PC",
                      height: int = 620) -> go.Figure:
    """Lines + markers per token and path kind in a 2-D projection.

    ``df`` has columns token, position, kind, step, t, x, y (from ``trajectories.project_table``). Colour =
    token, line style = kind (teacher solid, straight dotted, each flow its own dash; '(fine)' thin, no
    markers); a flow's markers are filled with its colour (``flow_colours``, the same on every page), the
    end point of a baseline with its registry colour. The first point of every path is h_m, the last the (predicted) h_n.
    The first legend lists the tokens (click to hide one), the second explains the line styles. Axis titles
    come from ``df.attrs`` (set by ``project_table``): "PC1 (41% of variance)" for PCA, "UMAP 1" for UMAP;
    ``axis`` ("PC" or "UMAP") is used when the attrs are missing.
    """
    kinds = list(kinds) if kinds is not None else list(dict.fromkeys(df["kind"]))
    flow_kinds = [k for k in dict.fromkeys(df["kind"]) if _reference_style(k) is None and not k.endswith(" (fine)")]
    kind_colours = flow_colours(flow_kinds)
    kind_colours.update({k: BASELINES[k].colour for k in dict.fromkeys(df["kind"]) if k in BASELINES})

    def fill(kind: str) -> str | None:
        return kind_colours.get(kind[: -len(" (fine)")] if kind.endswith(" (fine)") else kind)

    positions = list(dict.fromkeys(df.sort_values("position")["position"]))
    fig = go.Figure()
    for pi, pos in enumerate(positions):
        color = PALETTE[pi % len(PALETTE)]
        rows = df[df["position"] == pos]
        token = rows["token"].iloc[0]
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=html.escape(f"{pos}: {token!r}"),
                                 legendgroup=f"pos{pos}", line=dict(color=color, width=4), legend="legend"))
        for kind in kinds:
            part = rows[rows["kind"] == kind].sort_values("step")
            if part.empty:
                continue
            style = _kind_style(kind, flow_kinds)
            marker = dict(color=color, symbol=style["symbol"], size=style["size"])
            if fill(kind):
                marker.update(color=fill(kind), line=dict(color=color, width=1.5))
            fig.add_trace(go.Scatter(
                x=part["x"], y=part["y"], mode="lines" if style["fine"] else "lines+markers", showlegend=False,
                legendgroup=f"pos{pos}", opacity=0.5 if style["fine"] else 1.0,
                line=dict(color=color, dash=style["dash"], width=style["width"]), marker=marker,
                customdata=np.stack([part["position"], part["t"], part["step"]], axis=1),
                text=[html.escape(_kind_label(kind))] * len(part),
                hovertemplate=(f"token {html.escape(repr(token))}<br>position %{{customdata[0]}}<br>"
                               "path: %{text}<br>t = %{customdata[1]:.3f} (step %{customdata[2]})<extra></extra>"),
            ))
        start = rows[(rows["kind"] == "teacher") & (rows["step"] == 0)]
        if not start.empty:
            fig.add_trace(go.Scatter(x=start["x"], y=start["y"], mode="markers", showlegend=False, hoverinfo="skip",
                                     legendgroup=f"pos{pos}",
                                     marker=dict(size=15, color="rgba(0,0,0,0)", line=dict(color=color, width=2))))
    for kind in kinds:
        style = _kind_style(kind, flow_kinds)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines" if style["fine"] else "lines+markers",
                                 name=html.escape(_kind_label(kind)), legend="legend2",
                                 line=dict(color="#555", dash=style["dash"], width=style["width"]),
                                 marker=dict(color=fill(kind) or "#555", symbol=style["symbol"], size=style["size"],
                                             line=dict(color="#555", width=1.5 if fill(kind) else 0))))
    _finish(fig, "Latent trajectories through the span (ringed: h_m at t = 0)", height,
            legend=dict(title=dict(text="tokens"), y=1.0, yanchor="top", x=1.02, font=dict(size=12)),
            legend2=dict(title=dict(text="paths"), y=0.45, yanchor="top", x=1.02, font=dict(size=12)))
    method = str(df.attrs.get("projection", axis))
    x_title, y_title = projection_axis_titles("UMAP" if method.lower() == "umap" else "PC",
                                              df.attrs.get("explained_variance") if method.lower() != "umap" else None)
    fig.update_xaxes(title=x_title, zeroline=False)
    fig.update_yaxes(title=y_title, zeroline=False)
    return fig
