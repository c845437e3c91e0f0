"""Per-token KL: the text coloured by KL (HTML), its colour legend, and KL at every position."""
from __future__ import annotations

import html
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from app.figures.style import (_bottom_margin, _finish, _fixed_colour, _legend_below, _legend_rows, flow_colours,
                               readable_label)


KL_COLORSCALE = "YlOrRd"
KL_CLASS = "lft-token"  # the CSS class of every coloured token span (the browser test looks for it)


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
