"""Compare spans: held-out NMSE of every flow against blocks replaced, recipes over seeds (curves and error bars),
and the paper's plot (KL against blocks removed or replaced), with the styles of the training methods and the
baselines."""
from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lft_core.analysis.baselines import get_baseline

from app.figures.style import (FLOW_PALETTE, _bottom_margin, _finish, _legend_below, baseline_colour, method_symbol,
                               _legend_rows, _log_ticks, flow_colours)


def params_nmse_scatter(table: pd.DataFrame, height: int = 360) -> go.Figure:
    """Held-out NMSE against blocks replaced, one marker per flow: colour = the flow (``flow_colours``, as on the
    training curves), symbol = its method's (``methods.METHODS``: FW diamond, SFM circle, hybrid square).

    ``table`` has columns name, method, blocks and heldout_nmse (or 'held-out NMSE'); span and k when present
    go into the hover."""
    nmse = "heldout_nmse" if "heldout_nmse" in table.columns else "held-out NMSE"
    colours = flow_colours([str(n) for n in table["name"]])
    fig = go.Figure()
    for _, row in table.iterrows():
        name, method = str(row["name"]), str(row["method"])
        extra = "".join(f"<br>{label} {html.escape(str(row[col]))}" for col, label in (("span", "span"), ("k", "k ="))
                        if col in table.columns and pd.notna(row[col]))
        fig.add_trace(go.Scatter(x=[row["blocks"]], y=[row[nmse]], mode="markers",
                                 name=html.escape(f"{name} ({method.upper()})"),
                                 marker=dict(size=12, color=colours[name], line=dict(color="white", width=1),
                                             symbol=method_symbol(method.lower())),
                                 hovertemplate=(f"{html.escape(name)} ({html.escape(method.upper())}){extra}<br>"
                                                "blocks replaced %{x}<br>held-out NMSE %{y:.4f}<extra></extra>")))
    rows = _legend_rows([t.name for t in fig.data])
    _finish(fig, "Held-out NMSE against blocks replaced", height + 22 * (rows - 1), legend=_legend_below(rows),
            showlegend=True)
    fig.update_layout(margin=dict(b=_bottom_margin(rows)))
    fig.update_xaxes(title="blocks replaced (n − m)", dtick=1)
    fig.update_yaxes(title="held-out NMSE", rangemode="tozero")
    return fig


# -------------------------------------------------------------------------------------------------------------
# Recipes over seeds, and the paper's plot (KL against blocks removed or replaced)


CMP_PAPER_COLOUR = "#7f7f7f"  # the paper's reference points (another model): grey, open markers


def _rgba(colour: str, alpha: float) -> str:
    """``#rrggbb`` -> ``rgba(r,g,b,alpha)`` (bands drawn in a curve's colour)."""
    c = colour.lstrip("#")
    r, g, b = (int(c[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def recipe_curves(curves: pd.DataFrame, x_title: str = "training step", height: int = 400) -> go.Figure:
    """Training loss (log scale) and held-out NMSE of each recipe: the mean over its seeds (line) and ± one
    standard deviation (band, where there are two seeds or more).

    ``curves``: columns recipe, metric ("loss" or "heldout_nmse"), x, mean, std, n (``comparison.curves_frame``).
    """
    with_nmse = bool((curves["metric"] == "heldout_nmse").any()) if len(curves) else False
    fig = make_subplots(rows=1, cols=2 if with_nmse else 1, horizontal_spacing=0.12,
                        subplot_titles=("training loss", "held-out NMSE") if with_nmse else ("training loss",))
    recipes = list(dict.fromkeys(curves["recipe"])) if len(curves) else []
    losses: list[float] = []
    for i, recipe in enumerate(recipes):
        colour = FLOW_PALETTE[i % len(FLOW_PALETTE)]
        for col, metric in ((1, "loss"), (2, "heldout_nmse")):
            part = curves[(curves["recipe"] == recipe) & (curves["metric"] == metric)].sort_values("x")
            if part.empty or (col == 2 and not with_nmse):
                continue
            x, mean, std = part["x"].to_numpy(), part["mean"].to_numpy(), part["std"].to_numpy()
            n = int(part["n"].max())
            if metric == "loss":
                losses.extend(mean[np.isfinite(mean)].tolist())
            seeds = f"{n} seeds" if n > 1 else "1 seed"
            if n > 1 and np.isfinite(std).any():
                lo = mean - np.nan_to_num(std)
                if metric == "loss":  # a log axis: keep the band above zero
                    lo = np.maximum(lo, mean * 0.05)
                hi = mean + np.nan_to_num(std)
                fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([hi, lo[::-1]]),
                                         fill="toself", fillcolor=_rgba(colour, 0.18), line=dict(width=0),
                                         mode="lines", hoverinfo="skip", showlegend=False, legendgroup=recipe),
                              row=1, col=col)
            name = "NMSE" if metric == "heldout_nmse" else "loss"
            fig.add_trace(go.Scatter(
                x=x, y=mean, mode="lines+markers" if metric == "heldout_nmse" else "lines", name=f"{recipe} ({seeds})",
                legendgroup=recipe, showlegend=col == 1, line=dict(color=colour, width=2),
                customdata=np.stack([np.nan_to_num(std)], axis=1),
                hovertemplate=f"{html.escape(recipe)} ({seeds})<br>{html.escape(x_title)} %{{x:.4g}}<br>{name} "
                              "%{y:.4g} ± %{customdata[0]:.2g}<extra></extra>"),
                row=1, col=col)
    rows = max(1, len(recipes))
    _finish(fig, "Training curves of each recipe (mean ± std over its seeds)", height + 22 * (rows - 1),
            legend=_legend_below(rows), showlegend=True)
    fig.update_layout(margin=dict(b=_bottom_margin(rows), t=fig.layout.margin.t + 26))  # room for the panel titles
    ticks = _log_ticks(losses)
    fig.update_yaxes(type="log", title="training loss (log scale)", tickvals=ticks or None,
                     ticktext=[f"{t:g}" for t in ticks] or None, row=1, col=1)
    if with_nmse:
        fig.update_yaxes(title="held-out NMSE", rangemode="tozero", row=1, col=2)
    fig.update_xaxes(title=x_title)
    return fig


def recipe_nmse_errorbars(table: pd.DataFrame, height: int = 400) -> go.Figure:
    """Held-out NMSE against blocks replaced, one marker per recipe: the mean over its seeds with ± one standard
    deviation as an error bar. ``table``: columns recipe, method, blocks, n, NMSE mean, NMSE std
    (``comparison.groups_table``)."""
    fig = go.Figure()
    table = table.dropna(subset=["NMSE mean"])
    for i, (method, part) in enumerate(table.groupby("method", sort=True)):
        colour = FLOW_PALETTE[i % len(FLOW_PALETTE)]
        std = part["NMSE std"].fillna(0.0).to_numpy()
        fig.add_trace(go.Scatter(
            x=part["blocks"], y=part["NMSE mean"], mode="markers", name=str(method).upper(),
            marker=dict(size=11, color=colour, symbol="diamond"),
            error_y=dict(type="data", array=std, visible=True, thickness=1.5, width=6, color=colour),
            customdata=np.stack([part["recipe"], part["n"], std], axis=1),
            hovertemplate="%{customdata[0]}<br>blocks replaced %{x}<br>NMSE %{y:.4f} ± %{customdata[2]:.4f}"
                          "<br>seeds %{customdata[1]}<extra></extra>"))
    _finish(fig, "Held-out NMSE (mean ± std over seeds)", height,
            legend=_legend_below(1), showlegend=True)
    fig.update_layout(margin=dict(b=_bottom_margin(1)))
    fig.update_xaxes(title="blocks replaced (n − m)", dtick=1)
    fig.update_yaxes(title="held-out NMSE", rangemode="tozero")
    return fig


def _cmp_style(kind: str) -> dict:
    """The style of a baseline's points: skip-k in the span (open) and at its best position (joined), or a
    fitted baseline's marker and colour from the registry (``kind`` is its name)."""
    skip = baseline_colour("skip")
    if kind == "skip in span":
        return dict(mode="markers", marker=dict(symbol="circle-open", size=10, color=skip, line=dict(width=2)))
    if kind == "skip best":
        return dict(mode="lines+markers", marker=dict(symbol="circle", size=9, color=skip),
                    line=dict(color=skip, width=2))
    baseline = get_baseline(kind)
    return dict(mode="markers", marker=dict(symbol=baseline.symbol, size=11, color=baseline.colour))


def kl_vs_blocks_figure(points: pd.DataFrame, height: int = 460) -> go.Figure:
    """The paper's comparison: KL(teacher ‖ model) against the number of blocks removed (skip-k: k) or replaced
    (a flow or the affine map of span [m, n): n − m). Trained flows are the mean over a recipe's seeds with ± one
    standard deviation; the paper's Pythia-410M numbers are grey open markers, labelled as such.

    ``points``: columns series, kind, x, KL, err, n, text, reference (``comparison.kl_vs_blocks``)."""
    fig = go.Figure()
    flow_series = list(dict.fromkeys(points[points["kind"] == "flow"]["series"]))
    for series in dict.fromkeys(points["series"]):
        part = points[points["series"] == series].sort_values("x")
        kind = part["kind"].iloc[0]
        if kind == "flow":
            colour = FLOW_PALETTE[flow_series.index(series) % len(FLOW_PALETTE)]
            style = dict(mode="markers", marker=dict(symbol="diamond", size=12, color=colour),
                         error_y=dict(type="data", array=part["err"].fillna(0.0).to_numpy(), visible=True,
                                      thickness=1.5, width=6, color=colour))
        elif kind == "paper":
            skip = "skip" in series
            right = float(points["x"].max())  # the rightmost label goes to the left of its marker
            style = dict(mode="markers+text", text=[f"  {t.split(': ', 1)[-1]}  " for t in part["text"]],
                         textposition=["middle left" if x >= right else "middle right" for x in part["x"]],
                         textfont=dict(size=10, color=CMP_PAPER_COLOUR),
                         marker=dict(symbol="square-open" if skip else "star-open", size=12, color=CMP_PAPER_COLOUR,
                                     line=dict(width=2)))
        else:
            style = _cmp_style(kind)
        fig.add_trace(go.Scatter(
            x=part["x"], y=part["KL"], name=series,
            customdata=np.stack([part["text"], part["err"].fillna(0.0)], axis=1),
            hovertemplate="%{customdata[0]}<br>blocks %{x}<br>KL %{y:.4f}"
                          + (" ± %{customdata[1]:.4f}" if kind == "flow" else "") + "<extra></extra>",
            **style))
    rows = 2
    _finish(fig, "KL against blocks removed (skip-k) or replaced (flows, affine)", height, legend=_legend_below(rows),
            showlegend=True)
    fig.update_layout(margin=dict(b=_bottom_margin(rows)))
    fig.update_xaxes(title="blocks removed (skip-k) or replaced by one layer (n − m)", dtick=1, rangemode="tozero")
    fig.update_yaxes(title="KL(teacher ‖ model) per token (nats)", rangemode="tozero")
    return fig
