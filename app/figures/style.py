"""What every figure shares: template, palettes, the fixed colours of the references and baselines, one colour
per flow, title and legend placement, log-axis ticks, readable labels, and offline HTML export."""
from __future__ import annotations

import hashlib
import re
import textwrap
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from lft_core.analysis.baselines import BASELINES, get_baseline
from lft_core.flow.methods import METHODS


TEMPLATE = "plotly_white"
PALETTE = qualitative.D3 + qualitative.Set2  # tokens (trajectories) and other categories that are not flows


# Fixed colours of the references, the same on every figure; each baseline's is its registry entry's
# (``baseline_colour``). Flows take FLOW_PALETTE (none of these colours), through flow_colours().
TEACHER_COLOUR = "#222222"
STRAIGHT_COLOUR = "#8c8c8c"
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


PRESENTER_SCALE = 1.4  # presenter mode: every text of a figure this much larger (never smaller)
PRESENTER_TITLE_CHARS = 34  # characters per title line at that size


def presenter_figure(fig: go.Figure, scale: float = PRESENTER_SCALE) -> go.Figure:
    """A copy of ``fig`` for a projector: the base font and every font a figure sets itself (title, legend, axis
    titles and ticks, annotations, colour bars, trace labels) ``scale`` times larger; the title re-wrapped for its
    larger letters and the top margin and height grown with it, so no title is cut and the plot keeps its size."""
    out = go.Figure(fig)
    lay = out.layout

    def bigger(font, default: float) -> dict:
        size = font.size if font is not None and font.size else default
        return dict(size=round(size * scale, 1))

    out.update_layout(font=bigger(lay.font, 12))
    raw = (lay.title.text or "").replace("<br>", " ") if lay.title else ""
    if raw:
        # TITLE_CHARS fits a half-page column at the normal size; larger letters in a column that may be narrower
        # (Per-token KL's chart takes 3/5 of the page) fit about this many
        lines = textwrap.wrap(raw, PRESENTER_TITLE_CHARS, break_long_words=False, break_on_hyphens=False) or [raw]
        old_top = lay.margin.t if lay.margin and lay.margin.t is not None else MODEBAR_BAND + 34
        top = MODEBAR_BAND + 12 + int(22 * scale) * len(lines)
        height = (lay.height or 450) + max(0, top - old_top)
        out.update_layout(title=dict(text="<br>".join(lines), font=bigger(lay.title.font, 16),
                                     y=1 - MODEBAR_BAND / height), margin=dict(t=max(top, old_top)), height=height)
    if lay.legend is not None:
        out.update_layout(legend=dict(font=bigger(lay.legend.font, 12)))
    for name in [k for k in lay.to_plotly_json() if k.startswith(("xaxis", "yaxis"))]:
        axis = lay[name]
        out.layout[name].update(title=dict(font=bigger(axis.title.font if axis.title else None, 14)),
                                tickfont=bigger(axis.tickfont, 12))
    for annotation in out.layout.annotations or ():
        annotation.font = bigger(annotation.font, 12)
    for trace in out.data:
        if getattr(trace, "textfont", None) is not None and trace.textfont.size:
            trace.textfont.size = round(trace.textfont.size * scale, 1)
        colorbar = getattr(trace, "colorbar", None)
        if colorbar is not None and trace.type in ("heatmap", "contour"):
            trace.colorbar.tickfont = bigger(colorbar.tickfont, 12)
    return out


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


def baseline_colour(name: str) -> str:
    """The colour of a registered baseline (``baselines.BASELINES``), the same on every figure."""
    return get_baseline(name).colour


def method_symbol(method: str) -> str:
    """The marker of a training method's points (``methods.METHODS``; a circle for one no longer registered)."""
    return METHODS[method].symbol if method in METHODS else "circle"


def _is_baseline_label(low: str, name: str, label: str) -> bool:
    """True when the lower-case ``low`` names the baseline: its name or label, '<name> baseline' / '<name> map',
    '<name> (...)', or '<name>-k' / '<name> 2 ...' (skip-k's labels)."""
    return (low in (name, label.lower(), f"{name} baseline", f"{name} map") or low.startswith(f"{name} (")
            or re.match(rf"{re.escape(name)}(-k|\s*\d+)(\b|$)", low) is not None)


def _fixed_colour(label: str) -> str | None:
    """The fixed colour of a reference or baseline label (teacher, straight path, skip-k, affine, ...), else
    None."""
    low = label.strip().lower()
    if low == "teacher":
        return TEACHER_COLOUR
    if low in ("straight", "straight path"):
        return STRAIGHT_COLOUR
    for baseline in BASELINES.values():
        if _is_baseline_label(low, baseline.name, baseline.label):
            return baseline.colour
    return None


def _flow_key(label: str) -> str:
    """The flow name inside a label that decorates it: 'FW name' (a trajectory kind), 'name (fine)' and the
    listing label 'name (FW, k=3, span 6:12)' all stand for 'name'."""
    key = label.strip()
    if key.endswith(" (fine)"):
        key = key[: -len(" (fine)")]
    methods = "|".join(re.escape(m.upper()) for m in METHODS)
    key = re.sub(rf"\s+\(({methods}), k=[^)]*\)$", "", key)
    key = re.sub(rf"^({methods})\s+(?=\S)", "", key)
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
# Axes and geometry


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


def _segments(a: np.ndarray, b: np.ndarray) -> tuple[list, list]:
    """x and y of the segments a_i -> b_i as one line trace (None between segments)."""
    xs, ys = [], []
    for p, q in zip(a, b):
        xs += [p[0], q[0], None]
        ys += [p[1], q[1], None]
    return xs, ys
