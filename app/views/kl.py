"""Per-token KL: where in a text does the LFT (or skipping blocks) change the teacher's next-token prediction?"""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import engine, frame, pages, progress, state
from app.figures.kl import kl_legend_html, kl_per_position, token_kl_html
from lft_core.analysis.baselines import FitData, fitted_baselines
from lft_core.span import Span

frame.page_intro(
    pages.KL,
    "For every token, KL(P_teacher ‖ P_model) of the next-token distributions: the model is the teacher with the "
    "span replaced by the flow (LFT, k steps) or with k blocks simply removed (skip-k). 0 means the same "
    "prediction; the paper reports the mean over held-out text.",
)

story = engine.story_opening()
teacher, span, flows, by_name = story.teacher, story.span, story.flows, story.by_name
NO_FLOW = "(no flow: skip-k only)"
if not flows:
    st.info("No flow is trained for this model yet: only the skip-k baseline can be compared. Prepare the demo on "
            "the **Start here** page or train a flow on the **Train** page.")
options = list(by_name) + [NO_FLOW]
best = story.best()
default_flow = best.name if best else (flows[0].name if flows else NO_FLOW)
if (asked := state.linked_flows(list(by_name))) is not None:  # a link names the flow
    st.session_state["w_kl_flow"] = next((name for name in asked if name in by_name), default_flow)
    st.session_state["_kl_span"] = span
elif st.session_state.get("_kl_span") != span:  # the span changed: its flow
    st.session_state["w_kl_flow"] = default_flow
    st.session_state["_kl_span"] = span
state.valid_choice("w_kl_flow", options, default_flow)
# the blocks skipped follow the span the comparison uses (the chosen flow's, else the current one): a quarter of
# its blocks, as the paper compares 6 replaced with 2 skipped and 12 with 3; a link's own count is kept
if st.session_state.get("w_kl_skip_k", 1) > teacher.n_layers:  # a link's count beyond this model
    st.session_state["w_kl_skip_k"] = teacher.n_layers
chosen_now = by_name.get(st.session_state["w_kl_flow"])
used = chosen_now.span if chosen_now is not None else span
linked_skip = state.took_link("w_kl_skip_k")
if st.session_state.get("_kl_skip_span") != used:
    if not linked_skip:
        st.session_state["w_kl_skip_k"] = max(1, int(used.blocks / 4 + 0.5))
    st.session_state["_kl_skip_span"] = used
st.session_state.setdefault("w_kl_skip", True)
FITTED = fitted_baselines()  # each offered as a toggle (``baselines.BASELINES``), off by default
for b in FITTED:
    st.session_state.setdefault(f"w_kl_{b.name}", False)

with st.form("kl_form"):
    text = state.story_text("Text", height=110)
    col_f, col_k = st.columns([3, 2], vertical_alignment="bottom")
    col_skip, col_sk, *col_fitted, _ = st.columns([1, 1, *([1] * len(FITTED)), 2], vertical_alignment="bottom")
    flow_choice = col_f.selectbox("Flow", options, key="w_kl_flow", persist_state=state.KEEP,
                                  disabled=state.presenter(),
                                  format_func=lambda name: by_name[name].label if name in by_name else name)
    k = state.story_k(col_k, "kl", "k (flow integration steps)", 3)
    use_skip = col_skip.toggle("skip-k", key="w_kl_skip", persist_state=state.KEEP,
                               help="Also compare with removing blocks.")
    # the paper compares replacing 6 blocks with skipping 2, and 12 with 3: about a quarter of the span
    skip_k = col_sk.number_input("blocks skipped", min_value=1, max_value=teacher.n_layers, key="w_kl_skip_k",
                                 persist_state=state.KEEP, help="Removed from the first block of the span.")
    use_fitted = [b.name for b, col in zip(FITTED, col_fitted)
                  if col.toggle(b.name, key=f"w_kl_{b.name}", persist_state=state.KEEP,
                                help=f"Also compare with the {b.label} of the span ({b.help}; fitted once and "
                                     "kept: the first fit takes seconds, or longer in the background when the "
                                     "hidden states it needs are not cached yet).")]
    st.form_submit_button("Compute KL", type="primary")
state.link_flows([flow_choice] if flow_choice in by_name else [])

if not text.strip():
    st.error("The text is empty: enter a sentence or a paragraph to compare the models on.")
    st.stop()
flow_cfg = by_name.get(flow_choice)
m, n = flow_cfg.span if flow_cfg else span
if flow_cfg is not None and flow_cfg.span != span:
    st.info(f"The chosen flow replaces span {flow_cfg.span}; that span is used here (the current span is {span}).")
if flow_cfg is not None and not flow_cfg.proved:
    st.caption(f"Flow {flow_cfg.name} was saved before flows recorded a hash of their weights: its record is "
               "unverified (it gets one when it is trained further).")
if flow_cfg is None and not use_skip and not use_fitted:
    st.warning(f"Nothing to compare: choose a flow or switch skip-k or {' or '.join(b.name for b in FITTED)} on.")
    st.stop()
if use_skip and m + int(skip_k) > teacher.n_layers:
    st.error(f"cannot skip {int(skip_k)} blocks from block {m}: the model has {teacher.n_layers} blocks")
    st.stop()


@st.cache_data(max_entries=32, show_spinner=False)
def kl_for_text(spec: str, text: str, flow_key: tuple[str, float] | None, k: int, skip_start: int,
                skip_k: int | None, baseline_keys: tuple[tuple[str, Span, FitData], ...]):
    from lft_core.analysis.evaluation import token_kl
    from lft_core.model.teacher import Replace, Skip

    teacher = engine.get_teacher(spec)
    ids = teacher.encode(text, max_tokens=min(512, teacher.max_positions))
    models = {}
    if flow_key:
        models[f"LFT, k = {k}"] = Replace(engine.load_flow(flow_key[0], spec, flow_key[1])[0], k)
    for name, fit_span, data in baseline_keys:
        models[name] = Replace(engine.load_baseline(name, spec, fit_span, data).replacement)
    if skip_k:
        models[f"skip {skip_k} block{'s' if skip_k > 1 else ''} from {skip_start}"] = Skip(skip_start, skip_k)
    return token_kl(teacher, ids, models)


flow_key = engine.flow_key(flow_cfg)
ready: list[str] = []  # fitted (or kept) now; a fit that must cache hidden states runs in the background meanwhile
for name in use_fitted:
    with engine.engine_errors():
        if engine.get_baseline(name, Span(m, n), flow_cfg.config if flow_cfg else None) is not None:
            ready.append(name)
baseline_keys = tuple((name, Span(m, n), engine.fit_data(flow_cfg.config if flow_cfg else None)) for name in ready)
with engine.engine_errors():
    result = progress.with_progress("Running the teacher and the models compared", "kl text", kl_for_text,
                                    state.model_spec(), text, flow_key, int(k), m, int(skip_k) if use_skip else None,
                                    baseline_keys)
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
    state.valid_choice("w_kl_colour", compared, compared[0])
    colour_by = st.radio("Colour tokens by", compared, horizontal=True, key="w_kl_colour", persist_state=state.KEEP)
else:
    colour_by = compared[0]
values = np.asarray(result.kl[colour_by], dtype=float)
vmax = float(max(0.1, np.quantile(values, 0.95))) if len(values) else 1.0
st.markdown(kl_legend_html(vmax, colour_by), unsafe_allow_html=True)
st.markdown(token_kl_html(result.tokens, values, result.top, vmax, colour_by), unsafe_allow_html=True)
st.caption("A token's colour is the KL of the prediction made *after* reading it (of the next token).")

col_table, col_fig = st.columns([2, 3])
with col_table:
    frame.show_table(summary, "kl_summary", key="kl_summary_table")
    per_token = pd.DataFrame({"position": range(len(result.tokens)), "token": result.tokens,
                              **{f"KL {label}": result.kl[label] for label in compared},
                              **{f"top-5 next tokens, {label}": [" | ".join(f"{t!r} {p:.3f}" for t, p in top)
                                                                 for top in result.top[label]]
                                 for label in result.top}})
    with st.expander("Per-token values"):
        frame.show_table(per_token, "kl_per_token", key="kl_tokens_table")
with col_fig:
    frame.show_figure(kl_per_position(result.tokens, {label: result.kl[label] for label in compared},
                                      flow=flow_cfg.name if flow_cfg else None),
                      "kl_per_position", key="kl_fig")
