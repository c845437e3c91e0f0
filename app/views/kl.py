"""Per-token KL: where in a text does the LFT (or skipping blocks) change the teacher's next-token prediction?"""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import common as c
from app import figures
from lft_core.span import Span

c.page_intro(
    "Per-token KL",
    "For every token, KL(P_teacher ‖ P_model) of the next-token distributions: the model is the teacher with the "
    "span replaced by the flow (LFT, k steps) or with k blocks simply removed (skip-k). 0 means the same "
    "prediction; the paper reports the mean over held-out text.",
)

teacher = c.require_teacher()
span = c.current_span(teacher)
flows = c.flows_for(teacher)
by_name = {f.name: f for f in flows}
NO_FLOW = "(no flow: skip-k only)"
if not flows:
    st.info("No flow is trained for this model yet: only the skip-k baseline can be compared. Prepare the demo on "
            "the **Start here** page or train a flow on the **Train** page.")
options = list(by_name) + [NO_FLOW]
here = [f for f in flows if f.span == span]
best = max(here, key=lambda f: (f.method == "fw", f.steps_done or 0), default=None)
default_flow = best.name if best else (flows[0].name if flows else NO_FLOW)
if (asked := c.linked_flows()) is not None:  # a link names the flow
    st.session_state["w_kl_flow"] = next((name for name in asked if name in by_name), default_flow)
    st.session_state["_kl_span"] = span
elif st.session_state.get("_kl_span") != span:  # the span changed: its flow and a quarter of its blocks skipped
    st.session_state["w_kl_flow"] = default_flow
    st.session_state["w_kl_skip_k"] = max(1, int(span.blocks / 4 + 0.5))
    st.session_state["_kl_span"] = span
c.valid_choice("w_kl_flow", options, default_flow)
st.session_state.setdefault("k", 3)
st.session_state.setdefault("w_kl_skip", True)
st.session_state.setdefault("w_kl_affine", False)

with st.form("kl_form"):
    text = c.story_text("Text", height=110)
    col_f, col_k = st.columns([3, 2], vertical_alignment="bottom")
    col_skip, col_sk, col_aff, _ = st.columns([1, 1, 1, 2], vertical_alignment="bottom")
    flow_choice = col_f.selectbox("Flow", options, key="w_kl_flow", persist_state=c.KEEP, disabled=c.presenter(),
                                  format_func=lambda name: by_name[name].label if name in by_name else name)
    k = col_k.slider("k (flow integration steps)", 1, 8, key="k", persist_state=c.KEEP)
    use_skip = col_skip.toggle("skip-k", key="w_kl_skip", persist_state=c.KEEP, help="Also compare with removing blocks.")
    # the paper compares replacing 6 blocks with skipping 2, and 12 with 3: about a quarter of the span
    skip_k = col_sk.number_input("blocks skipped", min_value=1, max_value=teacher.n_layers, key="w_kl_skip_k",
                                 persist_state=c.KEEP, help="Removed from the first block of the span.")
    use_affine = col_aff.toggle("affine", key="w_kl_affine", persist_state=c.KEEP,
                                help="Also compare with the closed-form affine replacement of the span, fitted on "
                                     "the flow's own training windows (the first time: seconds to a minute).")
    st.form_submit_button("Compute KL", type="primary")
c.link_flows([flow_choice] if flow_choice in by_name else [])

if not text.strip():
    st.error("The text is empty: enter a sentence or a paragraph to compare the models on.")
    st.stop()
flow_cfg = by_name.get(flow_choice)
m, n = flow_cfg.span if flow_cfg else span
if flow_cfg is not None and flow_cfg.span != span:
    st.info(f"The chosen flow replaces span {flow_cfg.span}; that span is used here (the current span is {span}).")
if flow_cfg is None and not use_skip and not use_affine:
    st.warning("Nothing to compare: choose a flow or switch skip-k or affine on.")
    st.stop()
if use_skip and m + int(skip_k) > teacher.n_layers:
    st.error(f"cannot skip {int(skip_k)} blocks from block {m}: the model has {teacher.n_layers} blocks")
    st.stop()


@st.cache_data(max_entries=32, show_spinner=False)
def kl_for_text(spec: str, text: str, flow_key: tuple[str, float] | None, k: int, skip_start: int,
                skip_k: int | None, affine_key: tuple | None):
    from lft_core.analysis.evaluation import token_kl
    from lft_core.model.teacher import Replace, Skip

    teacher = c.get_teacher(spec)
    ids = teacher.encode(text, max_tokens=min(512, teacher.max_positions))
    models = {}
    if flow_key:
        models[f"LFT, k = {k}"] = Replace(c.load_flow(flow_key[0], spec, flow_key[1])[0], k)
    if affine_key:
        models["affine"] = Replace(c.load_affine(spec, *affine_key))
    if skip_k:
        models[f"skip {skip_k} block{'s' if skip_k > 1 else ''} from {skip_start}"] = Skip(skip_start, skip_k)
    return token_kl(teacher, ids, models)


flow_key = c.flow_key(flow_cfg)
affine_key = None
if use_affine:
    with c.engine_errors():
        c.get_affine(Span(m, n), flow_cfg.config if flow_cfg else None)  # fitted here, with its progress bar
    corpus, length, windows, heldout = c.affine_settings(flow_cfg.config if flow_cfg else None)
    affine_key = (corpus, Span(m, n), length, windows, heldout)
with c.engine_errors():
    result = c.with_progress("Running the teacher and the models compared", "kl text", kl_for_text, c.model_spec(),
                             text, flow_key, int(k), m, int(skip_k) if use_skip else None, affine_key)
st.session_state["kl_result"] = result
compared = [label for label in result.kl if label != "teacher"]

# -- summary ----------------------------------------------------------------------------------------------
st.markdown(f"Span **{m}:{n}** ({n - m} blocks){' · flow ' + flow_cfg.name if flow_cfg else ''} · "
            f"{len(result.tokens)} tokens")
cols = st.columns(1 + len(compared))
cols[0].metric("Teacher perplexity", f"{result.ppl['teacher']:.2f}")
for col, label in zip(cols[1:], compared):
    col.metric(f"{label}: mean KL", f"{float(np.mean(result.kl[label])):.3f}",
               help=f"perplexity {result.ppl[label]:.2f}")
summary = pd.DataFrame([{"model": label, "mean KL": float(np.mean(result.kl[label])),
                         "max KL": float(np.max(result.kl[label])), "perplexity": result.ppl[label]}
                        for label in result.kl])

# -- coloured text ----------------------------------------------------------------------------------------
if len(compared) > 1:
    c.valid_choice("w_kl_colour", compared, compared[0])
    colour_by = st.radio("Colour tokens by", compared, horizontal=True, key="w_kl_colour", persist_state=c.KEEP)
else:
    colour_by = compared[0]
values = np.asarray(result.kl[colour_by], dtype=float)
vmax = float(max(0.1, np.quantile(values, 0.95))) if len(values) else 1.0
st.markdown(figures.kl_legend_html(vmax, colour_by), unsafe_allow_html=True)
st.markdown(figures.token_kl_html(result.tokens, values, result.top, vmax, colour_by), unsafe_allow_html=True)
st.caption("A token's colour is the KL of the prediction made *after* reading it (of the next token).")

col_table, col_fig = st.columns([2, 3])
with col_table:
    c.show_table(summary, "kl_summary", key="kl_summary_table")
    per_token = pd.DataFrame({"position": range(len(result.tokens)), "token": result.tokens,
                              **{f"KL {label}": result.kl[label] for label in compared},
                              **{f"top-5 next tokens, {label}": [" | ".join(f"{t!r} {p:.3f}" for t, p in top)
                                                                 for top in result.top[label]]
                                 for label in result.top}})
    with st.expander("Per-token values"):
        c.show_table(per_token, "kl_per_token", key="kl_tokens_table")
with col_fig:
    c.show_figure(figures.kl_per_position(result.tokens, {label: result.kl[label] for label in compared},
                                          flow=flow_cfg.name if flow_cfg else None),
                  "kl_per_position", key="kl_fig")
