"""Coupling crossings: token pairs whose straight paths through the span cross, and what a flow did with them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import engine, frame, pages, progress, state
from app.figures.coupling import bulk_box, crossings_figure, matching_figure
from lft_core.analysis.crossings import CouplingView
from lft_core.span import Span

frame.page_intro(
    pages.CROSSINGS,
    "Two tokens i, j **cross** in a span when swapping their targets makes the straight paths cheaper: "
    "‖x0_i − x1_i‖² + ‖x0_j − x1_j‖² > ‖x0_i − x1_j‖² + ‖x0_j − x1_i‖². Near such a pair flow matching sees "
    "two different velocities at almost the same point and learns their average, so it may deliver a token to "
    "the other's target: the flow *misroutes* it.",
    "t* is the time at which the two straight paths come closest, and 'distance' how close they get.",
)

story = engine.story_opening()
teacher, span = story.teacher, story.span
m, n = span
flows = story.here  # only the flows of this span
by_name = {f.name: f for f in flows}
NONE = "(none)"

col_src, col_n, col_flow, col_k = st.columns([2, 1, 2, 1])
source = col_src.radio("Tokens from", ["Corpus windows", "My text"], horizontal=True, key="w_cross_source",
                       persist_state=state.KEEP)
n_tokens = col_n.slider("Tokens", 16, 256, 64, step=16, key="w_cross_n", persist_state=state.KEEP,
                        disabled=source == "My text")
best = story.best()
options = [NONE] + list(by_name)
if (asked := state.linked_flows(list(by_name))) is not None:  # a link names the flow
    st.session_state["w_cross_flow"] = next((name for name in asked if name in by_name), NONE)
    st.session_state["_cross_flow_span"] = span
elif st.session_state.get("_cross_flow_span") != span:  # the span changed since the flow was chosen
    st.session_state["w_cross_flow"] = best.name if best else NONE
    st.session_state["_cross_flow_span"] = span
state.valid_choice("w_cross_flow", options, best.name if best else NONE)
flow_choice = col_flow.selectbox("Trained flow (optional)", options, key="w_cross_flow", persist_state=state.KEEP,
                                 format_func=lambda name: by_name[name].label if name in by_name else name,
                                 disabled=state.presenter(),
                                 help="Flows trained for this span (the best-trained FW flow is preselected).")
state.link_flows([flow_choice] if flow_choice in by_name else [])
flow_cfg = by_name.get(flow_choice)
k = state.story_k(col_k, "cross", "k", (flow_cfg.k or 3) if flow_cfg else 3, disabled=flow_cfg is None,
                  help="the flow's integration steps")
if not flows:
    st.info(story.no_flow_here() + " The crossings below are the data's own; a flow shows which of them it "
            "misroutes.", icon=":material/info:")
text = None
if source == "My text":
    text = state.story_text("Text", height=90)
    if not text.strip():
        st.error("Enter some text: its tokens (position 0 excluded) are the pairs.")
        st.stop()


@st.cache_data(max_entries=16, show_spinner=False)
def from_cache(spec: str, corpus_spec: str, seq_len: int, windows: int, span: Span, n_tokens: int,
               flow_key: tuple[str, float] | None, k: int) -> tuple[CouplingView, list[str]]:
    from lft_core.data.activations import ensure_activations
    from lft_core.analysis.crossings import coupling_view, span_coupling

    teacher = engine.get_teacher(spec)
    cache = ensure_activations(teacher, engine.get_corpus(corpus_spec), seq_len, windows, list(span), progress=False)
    flow = engine.load_flow(flow_key[0], spec, flow_key[1])[0] if flow_key else None
    sc = span_coupling(teacher, cache, span, n_tokens=min(n_tokens, windows * (seq_len - 1)), flow=flow, k=k)
    return coupling_view(sc), [f"window {w}, position {p}" for w, p in sc.token_index]


@st.cache_data(max_entries=16, show_spinner=False)
def from_text(spec: str, text: str, span: Span, flow_key: tuple[str, float] | None,
              k: int) -> tuple[CouplingView, list[str]]:
    from lft_core.analysis.crossings import coupling_view, text_coupling

    teacher = engine.get_teacher(spec)
    flow = engine.load_flow(flow_key[0], spec, flow_key[1])[0] if flow_key else None
    sc = text_coupling(teacher, teacher.encode(text, max_tokens=256), span, flow=flow, k=k)
    return coupling_view(sc), [f"position {p}" for _, p in sc.token_index]  # position 0 excluded (attention sink)


flow_key = engine.flow_key(flow_cfg)
with engine.engine_errors():
    label = f"Reading h_{m} and h_{n} (computing them if they are not cached) and solving the assignment"
    if text is None:
        result, where = progress.with_progress(label, f"crossings cache {int(n_tokens)} tokens", from_cache,
                                               state.model_spec(), state.corpus_spec(), state.seq_len(),
                                               state.n_windows(), span, int(n_tokens), flow_key, int(k))
    else:
        result, where = progress.with_progress(label, "crossings text", from_text, state.model_spec(), text, span,
                                               flow_key, int(k))
st.session_state["crossings_result"] = result
tokens, involved = result.tokens, result.in_crossing
N = len(tokens)
table = result.crossing_table().round({"t*": 3, "distance": 2, "saving": 1})

cols = st.columns(4)
cols[0].metric("Tokens", N)
cols[1].metric("Recoupling ratio R", f"{result.ratio:.3f}",
               help=f"Share of these {N} tokens the optimal assignment moves. R depends on the tokens it is "
                    "measured on: the Choose a span page measures it on its own sample (256 token pairs of the "
                    "cached windows by default), so the two pages give different values for one span; more "
                    "tokens give a steadier value.")
cols[2].metric("Crossing pairs", f"{len(table)} of {N * (N - 1) // 2}")
cols[3].metric("Tokens in a crossing", f"{result.coupling.crossings.share:.0%}")

st.caption(f"R here is measured on these {N} tokens; the **Choose a span** page measures it on its own larger sample "
           "of token pairs, so the two differ for the same span (a sampling difference, not a contradiction).")

col_fig, col_tab = st.columns([1, 1])
with col_tab:
    st.markdown("**Crossing pairs**, largest saving first (saving = cost decrease if i and j swapped targets); "
                "select one to highlight it")
    event = frame.show_table(table.head(500), f"crossings_{m}-{n}", key="cross_table", on_select="rerun",
                             selection_mode="single-row", height=420)
    if len(table) > 500:
        st.caption(f"The 500 pairs with the largest saving of {len(table)} are listed.")
selected = event.selection.rows if event is not None else []
highlight = (int(table.iloc[selected[0]]["i"]), int(table.iloc[selected[0]]["j"])) if selected else None
with col_fig:
    pooled = np.concatenate([result.p0, result.p1] + ([result.p_hat] if result.p_hat is not None else []))
    box, outside = bulk_box(pooled)
    zoom = st.toggle("Zoom on the bulk of the tokens", value=outside > 0, key="w_cross_zoom", persist_state=state.KEEP,
                     help="A few tokens with very large hidden states can squash the picture; zooming leaves them "
                          "outside the view (the numbers and tables still include them).")
    fig = crossings_figure(result.p0, result.p1, tokens, involved, highlight, result.p_hat,
                           result.recoupled, box=box if zoom else None,
                           explained_variance=result.explained_variance)
    frame.show_figure(fig, f"crossings_{m}-{n}", key="cross_fig")
    if zoom and outside:
        st.caption(f"{outside} of {len(pooled)} points lie outside the zoomed view.")

col_match, col_flow_res = st.columns([3, 2])
with col_match:
    st.markdown("**Matching matrix**: cost of sending start i to target j, with the optimal assignment.")
    frame.show_figure(matching_figure(result.cost, result.assignment, tokens), f"matching_{m}-{n}",
                      key="match_fig")
with col_flow_res:
    st.markdown("**What the flow did**")
    if result.recoupled is None:
        st.info("Choose a trained flow of this span above to see which tokens its k-step walk delivers nearer "
                "another token's target than its own.")
    else:
        rec = np.asarray(result.recoupled, dtype=bool)
        st.metric("Tokens misrouted by the flow", f"{rec.mean():.0%}", help="x̂_1 nearer another token's h_n")
        moved = np.asarray(result.assignment) != np.arange(N)
        st.caption(f"Of the tokens in a crossing, {result.recoupled_in_crossing or 0:.0%} were misrouted; "
                   f"of the others {result.recoupled_elsewhere or 0:.0%}.")
        flow_table = pd.DataFrame({"token": [repr(t) for t in tokens], "where": where,
                                   "in a crossing": involved,
                                   "re-paired by optimal transport": moved, "misrouted by the flow": rec})
        frame.show_table(flow_table, f"flow_misrouted_{m}-{n}", key="flow_rec_table", height=320)
