"""Figures read well: offline HTML, axis titles with units everywhere, an R colour scale that resolves the low
values, PCA axes with their share of variance, wall-time training curves, one colour per flow, a title the
toolbar cannot cover, no internal names, legends outside the data."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from app.figures.compare import params_nmse_scatter
from app.figures.coupling import crossings_figure, matching_figure
from app.figures.kl import kl_per_position
from app.figures.span import (affine_heatmap, colour_limit, log_colour_range, recoupling_heatmap, skip_kl_bars,
                              span_heatmap)
from lft_core.analysis.baselines import BASELINES
from app.figures.style import (FLOW_PALETTE, MODEBAR_BAND, STRAIGHT_COLOUR, TEACHER_COLOUR,
                               TITLE_CHARS, _finish, flow_colours, projection_axis_titles, readable_label, to_html)
from app.figures.training import training_curves
from app.figures.trajectories import trajectory_figure

SKIP_COLOUR, AFFINE_COLOUR = BASELINES["skip"].colour, BASELINES["affine"].colour  # the registry's colours

FLOWS = ["fw-6-12-k3", "sfm-6-12", "fw-12-18", "hybrid-4-10", "fw-6-12-long"]


# -- small synthetic inputs, shaped like the pages' ------------------------------------------------------------


def _span_matrix(L: int = 12, seed: int = 0) -> np.ndarray:
    """R-like values: most spans low (0 to 0.08), the spans from block 0 near 1, NaN where m >= n."""
    rng = np.random.default_rng(seed)
    matrix = np.full((L + 1, L + 1), np.nan)
    for m in range(L):
        for n in range(m + 1, L + 1):
            matrix[m, n] = round(0.006 * (n - m) * rng.random(), 4)
    matrix[0, 1:] = 0.9 + 0.1 * rng.random(L)
    matrix[5, 6] = 0.0
    return matrix


def _history(n: int = 120, seconds_per_step: float | None = 0.25, eval_every: int = 40) -> list[dict]:
    rng = np.random.default_rng(1)
    events = []
    for i in range(n):
        event = {"step": i + 1, "loss": float(np.exp(-i / 50) + 0.05 * rng.random()), "lr": 1e-3}
        if seconds_per_step is not None:
            event["elapsed_s"] = round(seconds_per_step * (i + 1), 3)
        if (i + 1) % eval_every == 0:
            event["heldout_nmse"] = float(0.4 * np.exp(-i / 60))
        events.append(event)
    return events


def _trajectory_table(with_projection: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    rows = []
    for position, token in ((2, " keeper"), (7, " lamp")):
        for kind, steps in (("teacher", 7), ("straight", 7), ("FW fw-6-12-k3", 4), ("FW fw-6-12-k3 (fine)", 13),
                            ("SFM sfm-6-12", 4), ("affine", 2)):
            for s in range(steps):
                t = s / (steps - 1)
                rows.append({"token": token, "position": position, "kind": kind, "step": s, "t": t,
                             "x": t * position + 0.1 * rng.standard_normal(),
                             "y": np.sin(3 * t) + 0.1 * rng.standard_normal()})
    df = pd.DataFrame(rows)
    if with_projection:
        df.attrs.update(projection="pca", explained_variance=[0.41, 0.22])
    return df


def _crossing_inputs(n: int = 16):
    rng = np.random.default_rng(3)
    p0, p1 = rng.standard_normal((n, 2)), rng.standard_normal((n, 2)) + 1.0
    p_hat = p1 + 0.2 * rng.standard_normal((n, 2))
    tokens = [f" w{i}" for i in range(n)]
    cost = ((p0[:, None] - p1[None]) ** 2).sum(-1)
    assignment = np.arange(n)
    assignment[[0, 1]] = [1, 0]
    return p0, p1, p_hat, tokens, cost, assignment


def _compare_table() -> pd.DataFrame:
    return pd.DataFrame({"name": FLOWS[:3], "span": ["6:12", "6:12", "12:18"], "blocks": [6, 6, 6],
                         "method": ["fw", "sfm", "fw"], "k": [3, 1, 3], "heldout_nmse": [0.12, 0.2, 0.31]})


@functools.lru_cache(maxsize=1)
def all_figures() -> dict[str, go.Figure]:
    """Every figure function of the app (except the teaching lab's toy_* figures), as the pages call them."""
    matrix = _span_matrix()
    p0, p1, p_hat, tokens, cost, assignment = _crossing_inputs()
    kl = {"LFT k=3": np.linspace(0.1, 0.9, 20), "affine": np.full(20, 0.5), "skip 2 @ 6": np.linspace(0.9, 0.2, 20)}
    return {
        "recoupling_heatmap": recoupling_heatmap(matrix, (1, 3), 512),
        "affine_heatmap": affine_heatmap(np.where(np.isfinite(matrix), 0.3 * matrix + 0.01, np.nan), (1, 3)),
        "span_heatmap": span_heatmap(matrix, None, "Some value of every span", "value", zmax=1.0),
        "skip_kl_bars": skip_kl_bars(pd.DataFrame({"k": [1, 2, 3], "kl": [0.2, 0.5, 0.9]})),
        "training_curves": training_curves({FLOWS[0]: _history(), FLOWS[1]: _history(20)}),
        "training_curves_seconds": training_curves({FLOWS[0]: _history()}, x="seconds"),
        "training_curves_toy": training_curves(
            {"SFM": [{"step": i + 1, "loss": 1.0 / (i + 1)} for i in range(50)]}, height=320),
        "trajectory_figure": trajectory_figure(_trajectory_table()),
        "crossings_figure": crossings_figure(p0, p1, tokens, np.arange(16) < 5, (0, 1), p_hat,
                                             np.arange(16) % 4 == 0, explained_variance=(0.3, 0.1)),
        "matching_figure": matching_figure(cost, assignment, tokens),
        "kl_per_position": kl_per_position([f" w{i}" for i in range(20)], kl, flow=FLOWS[0]),
        "params_nmse_scatter": params_nmse_scatter(_compare_table()),
    }


def _axes(fig: go.Figure) -> dict[str, go.layout.XAxis]:
    return {name: fig.layout[name] for name in fig.layout if re.fullmatch(r"[xy]axis\d*", name)}


# -- 1. offline HTML ----------------------------------------------------------------------------------------


def test_html_export_embeds_plotly_and_fetches_nothing():
    page = to_html(skip_kl_bars(pd.DataFrame({"k": [1, 2], "kl": [0.2, 0.4]})))
    assert "<html>" in page[:200].lower()
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, flags=re.IGNORECASE)  # no external script at all
    assert not re.search(r"src\s*=\s*[\"']?(https?:)?//", page, flags=re.IGNORECASE)
    assert ("plotly.js v" in page) is True and ("Plotly.newPlot" in page) is True  # the library, then the figure
    assert len(page) > 1_000_000


# -- 2, 5, 7, 8. titles, axis titles, room for the toolbar, no internal names, legends outside the data ---------


@pytest.mark.parametrize("name", list(all_figures()))
def test_every_figure_titles_its_axes_and_leaves_the_toolbar_room(name):
    fig = all_figures()[name]
    axes = _axes(fig)
    assert {"xaxis", "yaxis"} <= set(axes)
    for axis_name, axis in axes.items():
        if axis.domain is not None or axis_name in ("xaxis", "yaxis"):
            assert axis.title.text and axis.title.text.strip(), f"{name}: {axis_name} has no title"
    title = fig.layout.title.text
    assert title and title.strip(), f"{name} has no title"
    # the toolbar floats over the top MODEBAR_BAND px: the title starts below them, the plot below the title
    height = fig.layout.height
    assert fig.layout.title.yref == "container" and fig.layout.title.yanchor == "top"
    assert fig.layout.title.y <= 1 - MODEBAR_BAND / height + 1e-9
    lines = title.count("<br>") + 1
    assert fig.layout.margin.t >= MODEBAR_BAND + 20 * lines
    assert fig.layout.width is None  # the page decides the width (1280 px pages, half-page columns)
    # a legend never lies over the data: beside the plot (x >= 1) or under it
    if fig.layout.showlegend is not False and len([t for t in fig.data if t.showlegend is not False]) > 1:
        legend = fig.layout.legend
        beside = legend.x is not None and legend.x >= 1
        below = legend.orientation == "h" and legend.yref == "container" and legend.y == 0 \
            and legend.yanchor == "bottom"
        assert beside or below, f"{name}: legend at x={legend.x}, y={legend.y}"


def _words(fig: go.Figure) -> list[str]:
    texts = [fig.layout.title.text or ""]
    texts += [axis.title.text or "" for axis in _axes(fig).values()]
    texts += [t.name or "" for t in fig.data]
    texts += [t.colorbar.title.text or "" for t in fig.data if t.type == "heatmap"]
    return texts


@pytest.mark.parametrize("name", list(all_figures()))
def test_no_internal_names_in_titles_and_legends(name):
    for text in _words(all_figures()[name]):
        assert not re.search(r"\b[a-z]{2,}_[a-z_]{2,}\b", text), f"{name}: snake_case key in {text!r}"
        assert not re.search(r"\bk=\d", text), f"{name}: code-like 'k=' in {text!r}"
        assert not re.search(r"\s@\s", text), f"{name}: code-like '@' in {text!r}"


def test_readable_labels():
    assert readable_label("LFT k=3") == "LFT, k = 3"
    assert readable_label("skip 2 @ 6") == "skip 2 blocks from block 6"
    assert readable_label("skip 1 @ 0") == "skip 1 block from block 0"
    assert readable_label("heldout_nmse") == "held-out NMSE"
    assert readable_label("affine") == "affine"
    names = [t.name for t in all_figures()["kl_per_position"].data]
    assert names == ["LFT, k = 3", "affine", "skip 2 blocks from block 6"]


def test_long_titles_wrap_below_the_toolbar():
    long = "A very long title " * 8
    fig = _finish(go.Figure(), long, 400)
    assert fig.layout.title.text.count("<br>") >= 1
    assert max(len(line) for line in fig.layout.title.text.split("<br>")) <= TITLE_CHARS
    short = _finish(go.Figure(), "Short", 400)
    assert fig.layout.margin.t > short.layout.margin.t >= MODEBAR_BAND + 20


def test_span_heatmap_axis_titles_name_the_span_ends():
    fig = recoupling_heatmap(_span_matrix())
    assert fig.layout.xaxis.title.text == "end of span n (block)"
    assert fig.layout.yaxis.title.text == "start of span m (block)"


# -- 3. a colour scale for R that resolves the low values --------------------------------------------------------


def _colour_position(trace: go.Heatmap, value: float) -> float:
    """Where on the colour bar (0 = bottom, 1 = top) a value of the heatmap's matrix is drawn."""
    matrix = _span_matrix()
    L = matrix.shape[0] - 1
    shown = np.asarray(trace.z, dtype=float)
    raw = matrix[:L, 1:]
    i = np.nanargmin(np.abs(raw - value))
    drawn = shown.flat[i]
    return float(np.clip((drawn - trace.zmin) / (trace.zmax - trace.zmin), 0, 1))


def test_recoupling_colours_resolve_low_values_and_hover_keeps_exact_values():
    matrix = _span_matrix()
    finite = matrix[np.isfinite(matrix)]
    low = finite[finite < 0.1]
    assert low.size > 0.8 * finite.size  # most spans are low, a few (from block 0) near 1
    fig = recoupling_heatmap(matrix, (1, 3), 512)
    heat, cells = fig.data[0], fig.data[1]
    # the median span is drawn well up the colour bar (on a linear 0..1 scale it would sit at ~0.03) ...
    assert _colour_position(heat, float(np.median(finite))) > 0.3
    # ... and low values that differ by a factor of 4 get clearly different colours
    assert _colour_position(heat, 0.04) - _colour_position(heat, 0.01) > 0.15
    assert _colour_position(heat, float(finite.max())) == pytest.approx(1.0)
    assert "log" in heat.colorbar.title.text or "clipped" in heat.colorbar.title.text
    assert len(heat.colorbar.ticktext) >= 3 and all(re.fullmatch(r"(≤ |≥ )?[0-9.]+", t) for t in heat.colorbar.ticktext)
    # hover: every span's exact value (not its colour coordinate)
    custom = np.asarray(cells.customdata, dtype=float)
    np.testing.assert_array_equal(custom[:, 2], matrix[custom[:, 0].astype(int), custom[:, 1].astype(int)])
    assert "customdata[2]" in cells.hovertemplate and cells.hovertemplate.count("R = ") == 1


def test_affine_nmse_colour_scale_is_clipped_when_values_cluster():
    matrix = np.where(np.isfinite(_span_matrix()), 0.01 + 0.2 * _span_matrix(), np.nan)
    matrix[0, 3:] = 0.02  # two spans from block 0 stay high: most values cluster low
    finite = matrix[np.isfinite(matrix)]
    fig = affine_heatmap(matrix)
    heat, cells = fig.data[0], fig.data[1]
    assert heat.zmax < 0.5 * finite.max()
    assert "clipped at" in heat.colorbar.title.text and heat.colorbar.ticktext[-1].startswith("≥")
    custom = np.asarray(cells.customdata, dtype=float)
    np.testing.assert_array_equal(custom[:, 2], matrix[custom[:, 0].astype(int), custom[:, 1].astype(int)])
    # values spread evenly: no clipping
    even = np.where(np.isfinite(matrix), np.linspace(0.01, 0.3, matrix.size).reshape(matrix.shape), np.nan)
    assert "clipped" not in affine_heatmap(even).data[0].colorbar.title.text


def test_colour_limit():
    values = np.r_[np.full(95, 0.03), [0.9, 0.95, 1.0, 0.97, 0.99], [np.nan]]
    limit, clipped = colour_limit(values, quantile=0.9, floor=0.05)
    assert clipped and limit == 0.05
    limit, clipped = colour_limit(np.linspace(0, 0.8, 50))
    assert not clipped and limit >= 0.8
    assert colour_limit(np.array([np.nan]))[1] is False
    assert log_colour_range(np.array([0.0, 0.0039, 0.2, 1.0])) == (0.005, 1.0)
    assert log_colour_range(np.zeros(5))[0] > 0


# -- 4. PCA axes with their share of variance ------------------------------------------------------------------


def _states_table(seed: int = 0) -> pd.DataFrame:
    """A trajectory table with d = 8 states: wide along one direction, narrow along a second, noise elsewhere."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(8), rng.standard_normal(8)
    rows = []
    for position in (1, 4, 9):
        for kind in ("teacher", "straight"):
            for s in range(5):
                state = (5.0 * rng.standard_normal() * a + 1.5 * rng.standard_normal() * b
                         + 0.1 * rng.standard_normal(8)).astype(np.float32)
                rows.append({"token": f" t{position}", "position": position, "kind": kind, "step": s, "t": s / 4,
                             "state": state})
    return pd.DataFrame(rows)


def test_pca_explained_variance_reaches_the_trajectory_axis_titles():
    from sklearn.decomposition import PCA

    from lft_core.analysis.trajectories import project_table

    df = _states_table()
    points = np.stack(df["state"].to_numpy()).astype(np.float64)
    expected = PCA(n_components=2).fit(points).explained_variance_ratio_
    projected = project_table(df, "pca").drop(columns="state")  # as the trajectories page does
    assert projected.attrs["projection"] == "pca"
    np.testing.assert_allclose(projected.attrs["explained_variance"], expected, rtol=1e-4)
    fig = trajectory_figure(projected, axis="PC")
    assert fig.layout.xaxis.title.text == f"PC1 ({expected[0] * 100:.0f}% of variance)"
    assert fig.layout.yaxis.title.text == f"PC2 ({expected[1] * 100:.0f}%)"
    # a cache hit (the same points again) reports the same shares
    again = project_table(df, "pca")
    assert again.attrs["explained_variance"] == projected.attrs["explained_variance"]
    # row filters and pickling (st.cache_data) keep them
    import pickle

    kept = pickle.loads(pickle.dumps(projected[projected["kind"] == "teacher"]))
    assert trajectory_figure(kept).layout.xaxis.title.text == fig.layout.xaxis.title.text


def test_projection_axis_titles_without_variance_and_for_umap():
    df = _trajectory_table(with_projection=False)
    fig = trajectory_figure(df, axis="PC")
    assert (fig.layout.xaxis.title.text, fig.layout.yaxis.title.text) == ("PC1", "PC2")
    fig = trajectory_figure(df, axis="UMAP")
    assert (fig.layout.xaxis.title.text, fig.layout.yaxis.title.text) == ("UMAP 1", "UMAP 2")
    df.attrs.update(projection="umap")
    assert trajectory_figure(df, axis="PC").layout.xaxis.title.text == "UMAP 1"
    assert projection_axis_titles("PC", (0.004, 0.002)) == ("PC1 (0.4% of variance)", "PC2 (0.2%)")
    p0, p1, p_hat, tokens, _, _ = _crossing_inputs()
    fig = crossings_figure(p0, p1, tokens, np.zeros(16, bool), explained_variance=(0.3, 0.12))
    assert fig.layout.xaxis.title.text == "PC1 (30% of variance)" and fig.layout.yaxis.title.text == "PC2 (12%)"
    assert crossings_figure(p0, p1, tokens, np.zeros(16, bool)).layout.xaxis.title.text == "PC1"


# -- training curves: wall time, raw vs smoothed ---------------------------------------------------------------


def test_training_curves_against_wall_time():
    history = _history(120, seconds_per_step=0.25)
    fig = training_curves({FLOWS[0]: history}, x="seconds")
    assert fig.layout.xaxis.title.text == "wall time (s)" and fig.layout.xaxis2.title.text == "wall time (s)"
    raw = next(t for t in fig.data if t.name.endswith("(raw)"))
    np.testing.assert_allclose(raw.x, [e["elapsed_s"] for e in history])
    nmse = next(t for t in fig.data if t.xaxis == "x2")
    np.testing.assert_allclose(nmse.x, [e["elapsed_s"] for e in history if "heldout_nmse" in e])
    assert "s<br>" in raw.hovertemplate
    by_step = training_curves({FLOWS[0]: history})
    assert by_step.layout.xaxis.title.text == "training step"
    assert list(next(t for t in by_step.data if t.name.endswith("(raw)")).x) == [e["step"] for e in history]
    # runs that did not record wall time: steps, and the axis says why
    old = training_curves({FLOWS[0]: _history(seconds_per_step=None)}, x="seconds")
    assert old.layout.xaxis.title.text.startswith("training step") and "not recorded" in old.layout.xaxis.title.text
    mixed = training_curves({FLOWS[0]: history, FLOWS[1]: _history(seconds_per_step=None)}, x="seconds")
    assert "not recorded" in mixed.layout.xaxis.title.text  # never steps and seconds on one axis
    # a 'seconds' field (the other spelling lft_core.analysis.comparison reads) works too
    renamed = [{("seconds" if k == "elapsed_s" else k): v for k, v in e.items()} for e in history]
    fig = training_curves({FLOWS[0]: renamed}, x="seconds")
    assert fig.layout.xaxis.title.text == "wall time (s)"
    np.testing.assert_allclose(fig.data[0].x, [e["seconds"] for e in renamed])
    with pytest.raises(ValueError, match="x must be"):
        training_curves({FLOWS[0]: history}, x="tokens")


def test_training_curves_legend_says_raw_and_smoothed():
    fig = training_curves({FLOWS[0]: _history(120), FLOWS[1]: _history(20)})
    shown = [t.name for t in fig.data if t.showlegend is not False]
    assert f"{FLOWS[0]} (raw)" in shown and f"{FLOWS[0]} (smoothed, EMA 0.1)" in shown
    assert FLOWS[1] in shown  # 20 points: drawn as they are, nothing to smooth
    raw = next(t for t in fig.data if t.name == f"{FLOWS[0]} (raw)")
    smoothed = next(t for t in fig.data if t.name == f"{FLOWS[0]} (smoothed, EMA 0.1)")
    assert raw.opacity < 1 and smoothed.opacity in (None, 1) and raw.line.width < smoothed.line.width
    assert fig.layout.yaxis.title.text == "training loss (log scale)"
    assert fig.layout.yaxis2.title.text == "held-out NMSE"


# -- 6. one colour per flow -------------------------------------------------------------------------------------


def test_flow_colours_are_stable_across_subsets_and_orders():
    alone = {name: flow_colours([name])[name] for name in FLOWS}
    assert len(set(alone.values())) == len(FLOWS)  # these names hash to distinct colours
    rng = np.random.default_rng(0)
    for _ in range(20):
        subset = list(rng.permutation(FLOWS)[: rng.integers(1, len(FLOWS) + 1)])
        assert flow_colours(subset) == {name: alone[name] for name in subset}
    # decorated labels of a flow get its colour
    colours = flow_colours(["FW fw-6-12-k3", "FW fw-6-12-k3 (fine)", "fw-6-12-k3 (FW, k=3, span 6:12)"])
    assert set(colours.values()) == {alone["fw-6-12-k3"]}
    # references keep fixed colours that no flow gets
    fixed = flow_colours(["teacher", "straight", "skip 2 @ 6", "affine", *FLOWS])
    assert fixed["teacher"] == TEACHER_COLOUR and fixed["straight"] == STRAIGHT_COLOUR
    assert fixed["skip 2 @ 6"] == SKIP_COLOUR and fixed["affine"] == AFFINE_COLOUR
    reserved = {TEACHER_COLOUR, STRAIGHT_COLOUR, SKIP_COLOUR, AFFINE_COLOUR}
    assert not reserved & set(FLOW_PALETTE)
    # the same in another process: md5, not Python's salted hash()
    import subprocess
    import sys

    code = "from app.figures.style import flow_colours; print(flow_colours(['fw-6-12-k3']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert alone["fw-6-12-k3"] in out.stdout


def test_flows_shown_together_never_share_a_colour():
    names = [f"flow-{i}" for i in range(40)]
    alone = {name: flow_colours([name])[name] for name in names}
    a = names[0]
    b = next(n for n in names[1:] if alone[n] == alone[a])  # two names whose hashes pick the same colour
    together = flow_colours([a, b])
    assert together[a] != together[b] and together[min(a, b)] == alone[min(a, b)]
    many = flow_colours(names[: len(FLOW_PALETTE)])
    assert len(set(many.values())) == len(FLOW_PALETTE)


def _trace_colour(trace) -> str:
    if trace.type == "scatter" and trace.mode == "markers":
        return trace.marker.color
    return trace.line.color


def test_a_flow_has_one_colour_on_every_figure():
    colour = flow_colours([FLOWS[0]])[FLOWS[0]]
    curves = training_curves({FLOWS[0]: _history(), FLOWS[1]: _history()})
    assert {_trace_colour(t) for t in curves.data if t.legendgroup == FLOWS[0]} == {colour}
    scatter = params_nmse_scatter(_compare_table())
    assert next(t for t in scatter.data if t.name.startswith(FLOWS[0])).marker.color == colour
    trajectories = trajectory_figure(_trajectory_table())
    flow_markers = {t.marker.color for t in trajectories.data
                    if t.text is not None and len(t.text) and t.text[0] == "FW fw-6-12-k3"}
    assert flow_markers == {colour}
    legend = next(t for t in trajectories.data if t.legend == "legend2" and t.name == "FW fw-6-12-k3")
    assert legend.marker.color == colour
    affine = next(t for t in trajectories.data if t.legend == "legend2" and t.name.startswith("affine"))
    assert affine.marker.color == AFFINE_COLOUR
    kl = kl_per_position([" a", " b", " c"], {"LFT, k = 3": np.zeros(3), "skip 1 block from 2": np.ones(3),
                                                       "affine": np.ones(3)}, flow=FLOWS[0])
    assert [t.line.color for t in kl.data] == [colour, SKIP_COLOUR, AFFINE_COLOUR]
    assert skip_kl_bars(pd.DataFrame({"k": [1], "kl": [0.3]})).data[0].marker.color == SKIP_COLOUR


def test_presenter_figures_enlarge_every_text_and_keep_the_title_whole():
    from app.figures.kl import kl_per_position
    from app.figures.style import presenter_figure

    fig = kl_per_position(["a", "b", "c"], {"LFT, k = 3": [0.1, 0.2, 0.3], "skip 2": [0.2, 0.1, 0.5]}, flow="f")
    big = presenter_figure(fig)
    assert big.layout.font.size > (fig.layout.font.size or 12)
    assert big.layout.title.font.size > fig.layout.title.font.size
    assert big.layout.xaxis.tickfont.size > 12 and big.layout.legend.font.size > (fig.layout.legend.font.size or 12)
    lines = big.layout.title.text.count("<br>") + 1
    assert big.layout.margin.t >= 40 + lines * big.layout.title.font.size  # room for every line under the toolbar
    assert big.layout.height - big.layout.margin.t == fig.layout.height - fig.layout.margin.t  # the plot keeps its size
    assert fig.layout.title.font.size == 16  # the original is untouched
