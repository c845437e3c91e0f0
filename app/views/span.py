"""Choose a span: the recoupling ratio and the affine baseline of every span [m, n), and skip-k KL at the chosen one."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import engine, frame, pages, progress, state
from app.figures.span import affine_heatmap, recoupling_heatmap, skip_kl_bars
from lft_core.analysis.compare_eval import CompareRequest, read_skip_grid, skip_grid_path
from lft_core.errors import LFTError
from lft_core.run.jobs import running_job, start_unique_job
from lft_core.span import grid_frame, lowest_of_length

frame.page_intro(
    pages.SPAN,
    "For a span [m, n) every token gives a pair (x0, x1) = (h_m, h_n). The **recoupling ratio** R is the share of "
    "tokens that the optimal transport assignment of starts to targets sends to *another* token's target: at R = 0 "
    "straight paths agree with the true pairing, a high R means flow matching will mix tokens up. Beside it, the "
    "**affine baseline**: how well one linear map, fitted in closed form with no training, replaces the span.",
    "Click a cell or use the slider to pick the span; the link of this page keeps it (?span=m:n).",
)

teacher = engine.require_teacher()
span = state.current_span(teacher)
corpus = engine.corpus_or_error()
if corpus is None:
    st.stop()
L = teacher.n_layers


@st.cache_data(max_entries=8, show_spinner=False)
def recoupling_matrix(cache_key: str, pairs: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """R(m, n) for all spans from an all-layer cache entry (position 0 of each window excluded); computed once
    per cache entry on this server and saved (the demo saves the same grid)."""
    from lft_core.data.activations import open_activations
    from lft_core.analysis.recoupling import recoupling_grid_cached

    grid = recoupling_grid_cached(open_activations(cache_key), pairs=pairs, seed=seed, drop_first=True)
    return grid.matrix, grid.seconds


AFFINE_HELDOUT_WINDOWS = 4  # held-out windows that choose each span's ridge strength and score it
HEATMAP_HEIGHT = 760  # px: cells of about 20 px for 30 blocks


@st.cache_data(max_entries=8, show_spinner=False)
def affine_matrix(spec: str, corpus_spec: str, seq_len: int, windows: int, cache_key: str) -> np.ndarray:
    """Held-out NMSE of the affine replacement of every span (``cache_key``: the all-layer entry it reads, so a
    rebuilt cache gives a new result); computed once on this server and saved (the demo saves the same grid)."""
    from lft_core.analysis.affine import affine_grid_cached

    return affine_grid_cached(engine.get_teacher(spec), corpus_spec, seq_len, windows, AFFINE_HELDOUT_WINDOWS,
                              progress=False).matrix


# -- controls -----------------------------------------------------------------------------------------------
def _slider_changed() -> None:
    m, n = st.session_state["w_span_slider"]
    if m < n:
        state.set_span((m, n))


if st.session_state.get("w_span_slider") != span:
    st.session_state["w_span_slider"] = span
left, right = st.columns([3, 1], vertical_alignment="bottom")
left.slider("Span [m, n): blocks m … n−1 are replaced (m < n)", min_value=0, max_value=L, key="w_span_slider",
            persist_state=state.KEEP,
            on_change=_slider_changed, disabled=state.presenter())
right.metric("Blocks replaced", span.blocks, help=f"span {span} of {L} blocks")

# -- heatmap ------------------------------------------------------------------------------------------------
cache = engine.find_cache(teacher, corpus, state.seq_len(), state.n_windows())
if cache is None or len(cache.layers) < L + 1:
    st.info(f"The heatmap needs every hidden state h_0 … h_{L} of {state.n_windows()} windows × {state.seq_len()} "
            "tokens of the corpus. Cache them once (about half a minute for the embedded model):")
    if st.button("Cache all layers", type="primary", disabled=st.session_state.get("_cache_running", False)):
        with engine.engine_errors(stop=False):
            progress.start_cache_job(state.model_spec(), state.corpus_spec(), state.seq_len(), state.n_windows())
    progress.cache_jobs_panel()
else:
    available = cache.shape[0] * (cache.shape[1] - 1)
    options = [p for p in (64, 128, 256, 512, 1024) if p <= available] or [available]
    st.session_state.setdefault("w_pairs", 256 if 256 in options else options[-1])
    if st.session_state["w_pairs"] not in options:
        st.session_state["w_pairs"] = options[-1]
    col_pairs, col_note = st.columns([1, 3], vertical_alignment="bottom")
    pairs = col_pairs.selectbox("Token pairs per span", options, key="w_pairs", persist_state=state.KEEP,
                                help="More pairs: a steadier estimate, slower (512 pairs ~ 10-20 s on 2 cores).")
    col_note.caption(f"From the cached hidden states of {state.n_windows()} windows × {state.seq_len()} tokens. "
                     "Position 0 of every window is excluded from both maps: attention-sink "
                     "tokens have huge norms and would dominate the distances (the affine map also leaves out the "
                     "few other massive-activation tokens). The same tokens are used for every span.")
    with engine.engine_errors():
        matrix, seconds = progress.with_progress(f"Solving {L * (L + 1) // 2} optimal assignments of {pairs} tokens",
                                                 f"recoupling grid {L} blocks {pairs} pairs", recoupling_matrix,
                                                 cache.key, int(pairs))
    st.session_state["recoupling_matrix"] = matrix

    def pick_from(event, chart: str) -> None:
        """A click on a heatmap cell picks that span (a chart keeps its selection: act on a new one only)."""
        points = (event.selection.points if event is not None and event.selection else []) or []
        if points:
            picked = (int(round(points[0]["y"])), int(round(points[0]["x"])))
            if picked[0] < picked[1] and picked != span and picked != st.session_state.get(f"_last_click_{chart}"):
                st.session_state[f"_last_click_{chart}"] = picked
                state.set_span(picked)
                st.rerun()

    # one map per tab, each the page's full width: cells large enough to hit at 1280 px
    tab_r, tab_a = st.tabs(["Recoupling ratio R", "Affine baseline (held-out NMSE)"])
    with tab_r:
        event = frame.show_figure(recoupling_heatmap(matrix, span, int(pairs), height=HEATMAP_HEIGHT),
                                  f"recoupling_{state.model_spec()}", key="heatmap", on_select="rerun",
                                  selection_mode="points")
        pick_from(event, "r")
        st.markdown("**How much would flow matching mix tokens here?** R is the share of tokens that optimal "
                    "transport pairs with another token's target. Most spans have a small R, so the colours are on "
                    "a log scale; hover a cell for its exact value.")
    with tab_a:
        with engine.engine_errors():
            affine = progress.with_progress(f"Fitting the affine replacement of all {L * (L + 1) // 2} spans (ridge "
                                            "least squares)",
                                            f"affine grid {L} blocks {state.n_windows()}x{state.seq_len()}",
                                            affine_matrix, state.model_spec(), state.corpus_spec(), state.seq_len(),
                                            state.n_windows(), cache.key)
        st.session_state["affine_matrix"] = affine
        event = frame.show_figure(affine_heatmap(affine, span, height=HEATMAP_HEIGHT),
                                  f"affine_nmse_{state.model_spec()}", key="affine_heatmap", on_select="rerun",
                                  selection_mode="points")
        pick_from(event, "affine")
        st.markdown("**How linear is this span?** The held-out NMSE ‖x̂ − h_n‖² / ‖h_n‖² of h_n ≈ h_m + A·h_m + b "
                    "fitted in closed form: a flow must beat this to be worth training.")

    cols = st.columns(4)
    cols[0].metric(f"R at span {span}", f"{matrix[span.m, span.n]:.3f}")
    cols[1].metric(f"Affine NMSE at span {span}", f"{affine[span.m, span.n]:.3f}")
    for col, grid, name in ((cols[2], matrix, "R"), (cols[3], affine, "affine NMSE")):
        lowest = lowest_of_length(grid, span.blocks)
        if lowest is not None:
            col.metric(f"Lowest {name}, {span.blocks} blocks", f"{lowest[1]:.3f}", delta=f"at span {lowest[0]}",
                       delta_color="off", delta_arrow="off",
                       help=f"the {span.blocks}-block span with the lowest {name}")
    finite = matrix[np.isfinite(matrix)]
    st.caption(f"R over all {finite.size} spans: min {finite.min():.3f}, median {np.median(finite):.3f}, max "
               f"{finite.max():.3f}. The affine maps are fitted on the same {state.n_windows()} windows and scored on "
               f"{AFFINE_HELDOUT_WINDOWS} held-out windows; with few windows they overfit, so read the map for its "
               "pattern more than its values.")
    st.page_link(pages.TRAIN.file, label="Train a flow for this span", icon=pages.TRAIN.icon)
    table = grid_frame(matrix, "R").merge(grid_frame(affine, "affine NMSE"), on=["m", "n", "blocks"])
    with st.expander("All spans as a table"):
        frame.show_table(table, f"spans_{state.model_spec()}", key="recoupling_table")

# -- skip-k -------------------------------------------------------------------------------------------------
st.subheader("Reference: skipping blocks")
st.markdown(f"KL(teacher ‖ model) of next-token distributions when the first k blocks of the span are simply "
            f"removed (skip-k), on held-out windows. A flow replacing {span.blocks} blocks should beat "
            "skipping fewer blocks.")
SKIP_KS = (1, 2, 3)  # the grid the Compare page's default evaluation uses too: computed once, read by both
SKIP_EVAL_WINDOWS = 4  # held-out windows, as Compare's default
seq = min(state.seq_len(), 128)
with engine.engine_errors():
    grid_path = skip_grid_path(teacher, state.corpus_spec(), SKIP_EVAL_WINDOWS, seq, SKIP_KS)
grid = read_skip_grid(grid_path)
if grid is None:
    label = f"skip-k grid {grid_path.stem}"
    running = running_job("compare", label)
    if running is not None:
        progress.watch_job(running.id, "Skip-k at every position, in the background")
    elif st.button("Compute skip-k KL for k = 1, 2, 3 at every position (once, in the background)",
                   key="skip_button"):
        try:
            request = CompareRequest((), state.corpus_spec(), SKIP_EVAL_WINDOWS, seq, max(SKIP_KS))
            start_unique_job("compare", ["--skip-only", "--model", state.model_spec(), *request.cli_args()], label)
        except LFTError as e:
            st.error(str(e))
        else:
            st.rerun()
else:
    at = {(r.start, r.k): r for r in grid}
    skip_table = pd.DataFrame([{"k": k, "skipped blocks": f"{span.m}..{span.m + k - 1}", "kl": at[(span.m, k)].kl,
                                "ppl": at[(span.m, k)].ppl} for k in SKIP_KS
                               if k <= span.blocks and (span.m, k) in at])
    st.session_state["skip_table"] = skip_table
    col_t, col_f = st.columns([1, 1])
    with col_t:
        st.caption(f"{SKIP_EVAL_WINDOWS} held-out windows of {seq} tokens; computed once for every position (the "
                   "Compare page reads the same grid).")
        frame.show_table(skip_table, f"skip_kl_{span}", key="skip_table_df")
    with col_f:
        frame.show_figure(skip_kl_bars(skip_table), f"skip_kl_{span}", key="skip_fig")
