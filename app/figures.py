"""Every figure of the app, built from engine results with plotly only (this module never imports Streamlit).

Functions take plain numbers (numpy arrays, lists, DataFrames) and return a ``plotly.graph_objects.Figure``
(or, for the per-token KL view, an HTML string). Pages decide what to compute; this module decides how it
looks, so the same figure can be saved as HTML, shown in the app, or checked in a test.
"""
from __future__ import annotations

import hashlib
import html
import math
import re
import textwrap
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from lft_core.analysis.comparison import TIME_FIELDS  # the wall-time fields of a training event (x="seconds")

TEMPLATE = "plotly_white"
PALETTE = qualitative.D3 + qualitative.Set2  # tokens (trajectories) and other categories that are not flows
KL_COLORSCALE = "YlOrRd"
KL_CLASS = "lft-token"  # the CSS class of every coloured token span (the browser test looks for it)

# Fixed colours of the references and baselines, the same on every figure. Flows take FLOW_PALETTE (none of
# these colours), through flow_colours().
TEACHER_COLOUR = "#222222"
STRAIGHT_COLOUR = "#8c8c8c"
SKIP_COLOUR = "#8c564b"
AFFINE_COLOUR = "#bcbd22"
FLOW_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#e377c2", "#17becf", "#393b79", "#1b9e77",
                "#7b4173")

MODEBAR_BAND = 40  # px at the top of every figure kept free of text: plotly's toolbar floats over the top right
TITLE_CHARS = 80  # a longer title is wrapped onto a second line (a half-page column at 1280 px holds ~80)


def _wrap_title(title: str) -> tuple[str, int]:
    """The title with <br> between lines of at most TITLE_CHARS characters, and its number of lines."""
    lines = textwrap.wrap(title, TITLE_CHARS, break_long_words=False, break_on_hyphens=False) or [title]
    return "<br>".join(lines), len(lines)


def _finish(fig: go.Figure, title: str | None, height: int, **layout) -> go.Figure:
    """Template, height and margins shared by every figure.

    Plotly's toolbar (modebar) floats over the top right corner of the figure: the top MODEBAR_BAND pixels
    hold nothing else, and the title starts below them (in pixels, whatever the height), so the toolbar never
    covers the title however long it is. Long titles wrap. The width is left to the page (responsive)."""
    text, lines = _wrap_title(title) if title else ("", 0)
    top = MODEBAR_BAND + (6 if not title else 12 + 22 * lines)
    fig.update_layout(template=TEMPLATE, height=height, margin=dict(l=60, r=20, t=top, b=50),
                      title=dict(text=text, x=0, xanchor="left", pad=dict(l=12), yref="container",
                                 y=1 - MODEBAR_BAND / height, yanchor="top", font=dict(size=16)) if title else None,
                      modebar=dict(orientation="h", bgcolor="rgba(255,255,255,0.7)"),
                      **layout)
    return fig


def _legend_below(rows: int = 1, **extra) -> dict:
    """A horizontal legend under the x-axis title (so it never covers data): positioned in pixels below the plot
    area through ``yref='container'`` at the bottom of the figure; pair with ``_bottom_margin(rows)``."""
    return dict(orientation="h", x=0, xanchor="left", yref="container", y=0, yanchor="bottom",
                font=dict(size=12), **extra)


def _legend_rows(names: Sequence[str | None], chars_per_row: int = 70) -> int:
    """About how many rows a horizontal legend of these entries takes in a half-page column (~600 px)."""
    row, rows = 0, 1
    for name in names:
        width = len(str(name or "")) + 6  # the line sample and the gap
        if row and row + width > chars_per_row:
            rows, row = rows + 1, 0
        row += width
    return rows


def _bottom_margin(rows: int = 1) -> int:
    """Bottom margin for tick labels, the x-axis title and ``rows`` rows of a legend below them."""
    return 62 + 22 * rows


def to_html(fig: go.Figure) -> str:
    """A standalone HTML page of the figure that works offline: plotly.js (~4.6 MB) is embedded, nothing is
    fetched from a CDN (a downloaded figure must open on a machine without internet)."""
    return fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False})


# -------------------------------------------------------------------------------------------------------------
# Colours and labels shared by the figures


def _fixed_colour(label: str) -> str | None:
    """The fixed colour of a reference or baseline label (teacher, straight path, skip-k, affine), else None."""
    low = label.strip().lower()
    if low == "teacher":
        return TEACHER_COLOUR
    if low in ("straight", "straight path"):
        return STRAIGHT_COLOUR
    if low in ("affine", "affine baseline", "affine map") or low.startswith("affine ("):
        return AFFINE_COLOUR
    if re.match(r"skip(-k|\s*\d+)(\b|$)", low):
        return SKIP_COLOUR
    return None


def _flow_key(label: str) -> str:
    """The flow name inside a label that decorates it: 'FW name' (a trajectory kind), 'name (fine)' and the
    listing label 'name (FW, k=3, span 6:12)' all stand for 'name'."""
    key = label.strip()
    if key.endswith(" (fine)"):
        key = key[: -len(" (fine)")]
    key = re.sub(r"\s+\((SFM|FW|HYBRID), k=[^)]*\)$", "", key)
    key = re.sub(r"^(SFM|FW|HYBRID)\s+(?=\S)", "", key)
    return key


def flow_colours(names: Sequence[str]) -> dict[str, str]:
    """One colour per flow, the same on every figure and page.

    A flow's colour is picked by a hash (md5, not Python's per-process salted hash) of its name, so it does not
    depend on which other flows are shown or in what order. Should two flows shown together hash to the same
    colour, the one later in alphabetical order takes the next free colour (only such a pair can change colour
    with the selection; the others never do). Labels that decorate a flow name ('FW name', 'name (fine)',
    'name (FW, k=3, span 6:12)') get the name's colour. The teacher, the straight path, skip-k and the affine
    baseline keep their fixed colours (TEACHER_COLOUR, ...), which no flow gets.
    """
    names = list(dict.fromkeys(str(n) for n in names))
    fixed = {n: _fixed_colour(n) for n in names}
    keys = {n: _flow_key(n) for n in names if fixed[n] is None}
    size = len(FLOW_PALETTE)
    chosen: dict[str, str] = {}
    used: set[int] = set()
    for key in sorted(set(keys.values())):
        if len(used) == size:  # more flows than colours: they share colours again, in the same order
            used.clear()
        slot = int.from_bytes(hashlib.md5(key.encode("utf-8")).digest()[:8], "big") % size
        slot = next((slot + j) % size for j in range(size) if (slot + j) % size not in used)
        used.add(slot)
        chosen[key] = FLOW_PALETTE[slot]
    return {n: fixed[n] or chosen[keys[n]] for n in names}


_WORDS = {"heldout_nmse": "held-out NMSE", "nmse": "NMSE", "kl": "KL", "ppl": "perplexity", "lr": "learning rate",
          "tokens_per_s": "tokens / s", "t_star": "t*"}


def readable_label(label: str) -> str:
    """A label for a reader, not a programmer: 'LFT k=3' -> 'LFT, k = 3', 'skip 2 @ 6' -> 'skip 2 blocks from
    block 6', 'heldout_nmse' -> 'held-out NMSE', other snake_case keys -> words. Anything else is unchanged."""
    text = str(label).strip()
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    match = re.fullmatch(r"LFT\s*k\s*=\s*(\d+)", text, flags=re.IGNORECASE)
    if match:
        return f"LFT, k = {match.group(1)}"
    match = re.fullmatch(r"skip\s*(\d+)\s*@\s*(\d+)", text, flags=re.IGNORECASE)
    if match:
        k = int(match.group(1))
        return f"skip {k} block{'s' if k != 1 else ''} from block {match.group(2)}"
    if re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)+", text):
        return " ".join(_WORDS.get(w, w) for w in text.split("_"))
    return text


def _percent(share: float) -> str:
    """41% (or 0.4% below one per cent)."""
    return f"{share * 100:.0f}%" if share >= 0.01 else f"{share * 100:.1g}%"


def projection_axis_titles(axis: str = "PC", explained: Sequence[float] | None = None) -> tuple[str, str]:
    """Axis titles of a 2-D projection: 'PC1 (41% of variance)', 'PC2 (22%)' when the PCA's explained variance
    is known; 'PC1', 'PC2' without it; 'UMAP 1', 'UMAP 2' for UMAP (its axes carry no variance)."""
    if axis.upper().startswith("UMAP"):
        return "UMAP 1", "UMAP 2"
    if explained is not None and len(explained) >= 2 and all(np.isfinite(v) for v in explained[:2]):
        return f"PC1 ({_percent(explained[0])} of variance)", f"PC2 ({_percent(explained[1])})"
    return "PC1", "PC2"


# -------------------------------------------------------------------------------------------------------------
# Choose a span


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


def span_heatmap(matrix: np.ndarray, span: tuple[int, int] | None, title: str, value: str, zmax: float,
                 colorscale: str = "Viridis", height: int = 620, fmt: str = ".4g", clipped: bool = False,
                 log_floor: float | None = None) -> go.Figure:
    """A value for every span [m, n): x = end n, y = start m (m grows downwards); only m < n is filled.

    ``matrix`` shape (L+1, L+1) with NaN where m >= n. A transparent marker sits on every cell so that a
    click selects the span (plotly heatmaps do not report clicks); the chosen span is outlined. Colour scale:
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
    fig = go.Figure(go.Bar(x=[str(k) for k in ks], y=table["kl"], marker_color=SKIP_COLOUR, name="skip-k",
                           text=[f"{v:.3f}" for v in table["kl"]], textposition="outside",
                           customdata=[f"{k} block{'s' if k != 1 else ''}" for k in ks],
                           hovertemplate="skip %{customdata}: mean KL %{y:.4f} nats<extra></extra>"))
    _finish(fig, "Skipping blocks at the start of the span", height)
    fig.update_xaxes(title="blocks skipped (removed from the start of the span)", type="category")
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


def _kind_label(kind: str) -> str:
    """How a path kind reads in the legend and hover: 'straight' -> 'straight path', 'affine' -> 'affine
    baseline (end point)', 'FW name (fine)' -> 'FW name (fine steps)'."""
    fine = kind.endswith(" (fine)")
    base = kind[: -len(" (fine)")] if fine else kind
    base = {"straight": "straight path", "affine": "affine baseline (end point)"}.get(base, base)
    return f"{base} (fine steps)" if fine else base


def trajectory_figure(df: pd.DataFrame, kinds: Sequence[str] | None = None, axis: str = "PC",
                      height: int = 620) -> go.Figure:
    """Lines + markers per token and path kind in a 2-D projection.

    ``df`` has columns token, position, kind, step, t, x, y (from ``trajectories.project_table``). Colour =
    token, line style = kind (teacher solid, straight dotted, each flow its own dash; '(fine)' thin, no
    markers); a flow's markers are filled with its colour (``flow_colours``, the same on every page), the
    affine end point with AFFINE_COLOUR. The first point of every path is h_m, the last the (predicted) h_n.
    The first legend lists the tokens (click to hide one), the second explains the line styles. Axis titles
    come from ``df.attrs`` (set by ``project_table``): "PC1 (41% of variance)" for PCA, "UMAP 1" for UMAP;
    ``axis`` ("PC" or "UMAP") is used when the attrs are missing.
    """
    kinds = list(kinds) if kinds is not None else list(dict.fromkeys(df["kind"]))
    flow_kinds = [k for k in dict.fromkeys(df["kind"]) if k not in _KIND_STYLE and not k.endswith(" (fine)")]
    kind_colours = flow_colours(flow_kinds)
    kind_colours["affine"] = AFFINE_COLOUR

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


def kl_per_position(tokens: Sequence[str], kl: Mapping[str, np.ndarray], height: int = 320,
                    flow: str | None = None) -> go.Figure:
    """KL(teacher || model) at every position, one line per model (the teacher itself is left out).

    Labels are shown readably ('LFT k=3' -> 'LFT, k = 3', 'skip 2 @ 6' -> 'skip 2 blocks from block 6').
    Colours: skip-k and affine their fixed colours; the LFT line the colour of ``flow`` (the flow's name, as on
    the other pages' figures) when given, else of its label."""
    fig = go.Figure()
    x = np.arange(len(tokens))
    labels = [label for label in kl if label != "teacher"]
    colours = flow_colours(labels)
    if flow is not None:
        colours.update({label: flow_colours([flow])[flow] for label in labels if _fixed_colour(label) is None})
    for label in labels:
        name = html.escape(readable_label(label))
        fig.add_trace(go.Scatter(x=x, y=kl[label], mode="lines+markers", name=name,
                                 text=[html.escape(repr(t)) for t in tokens],
                                 line=dict(color=colours[label]), marker=dict(size=5),
                                 hovertemplate=f"{name}<br>position %{{x}}: %{{text}}<br>"
                                               "KL %{y:.4f} nats<extra></extra>"))
    rows = _legend_rows([t.name for t in fig.data])
    _finish(fig, "KL(teacher ‖ model) of the next-token prediction at each position", height + 22 * (rows - 1),
            legend=_legend_below(rows), showlegend=True)
    fig.update_layout(margin=dict(b=_bottom_margin(rows)))
    fig.update_xaxes(title="token position")
    fig.update_yaxes(title="KL (nats)", rangemode="tozero")
    return fig


# -------------------------------------------------------------------------------------------------------------
# Compare spans


_METHOD_SYMBOL = {"fw": "diamond", "sfm": "circle", "hybrid": "square"}


def params_nmse_scatter(table: pd.DataFrame, height: int = 360) -> go.Figure:
    """Held-out NMSE against blocks replaced, one marker per flow: colour = the flow (``flow_colours``, as on the
    training curves), symbol = its method (FW diamond, SFM circle, hybrid square).

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
                                             symbol=_METHOD_SYMBOL.get(method.lower(), "circle")),
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
# Teaching lab


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


# -------------------------------------------------------------------------------------------------------------
# Compare spans: recipes over seeds, and the paper's plot (KL against blocks removed or replaced)

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


_CMP_STYLE = {
    "skip in span": dict(mode="markers", marker=dict(symbol="circle-open", size=10, color=SKIP_COLOUR,
                                                    line=dict(width=2))),
    "skip best": dict(mode="lines+markers", marker=dict(symbol="circle", size=9, color=SKIP_COLOUR),
                      line=dict(color=SKIP_COLOUR, width=2)),
    "affine": dict(mode="markers", marker=dict(symbol="x", size=11, color=AFFINE_COLOUR)),
}


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
            style = _CMP_STYLE[kind]
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
