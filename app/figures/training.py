"""Training curves: loss (log scale; raw and smoothed) and held-out NMSE against step or wall time, one colour
per run."""
from __future__ import annotations

import html
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.figures.style import _bottom_margin, _finish, _legend_below, _legend_rows, _log_ticks, flow_colours
from lft_core.analysis.recipes import TIME_FIELDS  # the wall-time fields of a training event (x="seconds")


def smooth(values: Sequence[float], alpha: float = 0.1) -> np.ndarray:
    """Exponential moving average (bias-corrected), to show the trend of a noisy training loss."""
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = (1 - alpha) * avg + alpha * float(v)
        out[i] = avg / (1 - (1 - alpha) ** (i + 1))
    return out


SMOOTHING = 0.1  # the EMA weight of the smoothed loss curves


def training_curves(histories: Mapping[str, Sequence[Mapping]], height: int = 360, x: str = "step") -> go.Figure:
    """Loss (log scale; raw faint, smoothed bold when long) and held-out NMSE, one colour per run (``flow_colours``).

    ``histories`` maps a label (a flow's name) to a list of events with ``step``, ``loss`` and (on evaluation
    steps) ``heldout_nmse``. ``x``: "step" (training step) or "seconds" (wall time since the run started, read
    from each event's ``elapsed_s``, or ``seconds`` / ``elapsed``; when some run's events do not record it, all
    curves fall back to steps and the axis title says so). The legend names each line: '<name> (raw)' faint,
    '<name> (smoothed, EMA 0.1)' bold.
    """
    if x not in ("step", "seconds"):
        raise ValueError(f"x must be 'step' or 'seconds', got {x!r}")
    runs = {label: [e for e in history if e.get("loss") is not None or e.get("heldout_nmse") is not None]
            for label, history in histories.items()}

    def time_field(events: Sequence[Mapping]) -> str | None:
        return next((f for f in TIME_FIELDS if all(isinstance(e.get(f), (int, float)) for e in events)), None)

    fields = {label: time_field(events) if x == "seconds" else None for label, events in runs.items()}
    timed = x == "seconds" and any(runs.values()) and all(fields[label] for label, ev in runs.items() if ev)
    if timed:
        x_title, x_hover = "wall time (s)", "%{x:.1f} s"
    elif x == "seconds":
        x_title, x_hover = "training step (wall time not recorded)", "step %{x}"
    else:
        x_title, x_hover = "training step", "step %{x}"
    with_nmse = any(e.get("heldout_nmse") is not None for h in runs.values() for e in h)
    fig = make_subplots(rows=1, cols=2 if with_nmse else 1, horizontal_spacing=0.12)
    colours = flow_colours(list(runs))
    all_losses: list[float] = []
    for label, history in runs.items():
        color = colours[label]
        name = html.escape(str(label))
        field = fields[label] if timed else "step"
        xs = [e[field] for e in history if e.get("loss") is not None]
        losses = [e["loss"] for e in history if e.get("loss") is not None]
        noisy = len(losses) > 30
        fig.add_trace(go.Scatter(x=xs, y=losses, mode="lines", name=f"{name} (raw)" if noisy else name,
                                 legendgroup=name, opacity=0.3 if noisy else 1.0,
                                 line=dict(color=color, width=1 if noisy else 2),
                                 hovertemplate=f"{name}{' (raw)' if noisy else ''}<br>{x_hover}<br>"
                                               "loss %{y:.4g}<extra></extra>"),
                      row=1, col=1)
        if noisy:
            smoothed = f"{name} (smoothed, EMA {SMOOTHING:g})"
            fig.add_trace(go.Scatter(x=xs, y=smooth(losses, SMOOTHING), mode="lines", name=smoothed,
                                     legendgroup=name, line=dict(color=color, width=2.5),
                                     hovertemplate=f"{smoothed}<br>{x_hover}<br>loss %{{y:.4g}}<extra></extra>"),
                          row=1, col=1)
        all_losses.extend(losses)
        ev = [e for e in history if e.get("heldout_nmse") is not None]
        if not with_nmse:
            continue
        fig.add_trace(go.Scatter(x=[e[field] for e in ev], y=[e["heldout_nmse"] for e in ev], mode="lines+markers",
                                 name=f"{name}: held-out NMSE", legendgroup=name, showlegend=False,
                                 line=dict(color=color, width=2),
                                 hovertemplate=f"{name}<br>{x_hover}<br>held-out NMSE %{{y:.4f}}<extra></extra>"),
                      row=1, col=2)
    rows = _legend_rows([t.name for t in fig.data if t.showlegend is not False])
    _finish(fig, "Training loss and held-out NMSE" if with_nmse else "Training loss", height + 22 * (rows - 1),
            legend=_legend_below(rows, traceorder="normal"), showlegend=True)
    fig.update_layout(margin=dict(b=_bottom_margin(rows)))
    ticks = _log_ticks(all_losses)
    fig.update_yaxes(type="log", tickvals=ticks or None, ticktext=[f"{t:g}" for t in ticks] or None,
                     title="training loss (log scale)", row=1, col=1)
    if with_nmse:
        fig.update_yaxes(rangemode="tozero", title="held-out NMSE", row=1, col=2)
    fig.update_xaxes(title=x_title)
    return fig
