"""Compare spans: every trained flow side by side, evaluated against skipping blocks."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import common as c
from app import figures

c.page_intro(
    "Compare spans",
    "What if a different span were replaced? Each trained flow replaces n − m blocks with about one block of "
    "parameters; its held-out NMSE = ‖x̂_1 − h_n‖² / ‖h_n‖² says how well it lands, and KL against the teacher "
    "says what that costs the predictions, compared with simply skipping blocks.",
    "Select rows to overlay their training curves.",
)

teacher = c.require_teacher()
flows = c.flows_for(teacher)
if not flows:
    st.info("No flow is trained for this model yet. Train flows for a few spans on the **Train** page and compare "
            "them here.")
    st.page_link("pages/train.py", label="Train a flow", icon=":material/model_training:")
    st.stop()

rows = []
for f in flows:
    params, replaced = f.params, f.teacher_span_params
    rows.append({"name": f.name, "span": str(f.span), "blocks": f.span.blocks, "method": f.method, "k": f.k,
                 "steps": f.steps_done, "heldout_nmse": f.last_nmse,
                 "params (M)": round(params / 1e6, 2), "replaced params (M)": round(replaced / 1e6, 2),
                 "params / replaced": round(params / replaced, 3) if replaced else None})
table = pd.DataFrame(rows)
st.session_state["compare_table"] = table
event = c.show_table(table.rename(columns={"heldout_nmse": "held-out NMSE"}), "flows_compare", key="compare_table_df",
                     on_select="rerun", selection_mode="multi-row")
selected = event.selection.rows if event is not None else []

col_curves, col_scatter = st.columns([3, 2])
with col_curves:
    chosen = [flows[i] for i in selected] or flows[:1]
    if not selected:
        st.caption(f"Showing {chosen[0].name}; select rows above to overlay others.")
    c.show_figure(figures.training_curves({f.name: f.history for f in chosen}), "training_curves",
                  key="compare_curves")
with col_scatter:
    if table["heldout_nmse"].notna().any():
        c.show_figure(figures.params_nmse_scatter(table.dropna(subset=["heldout_nmse"])), "nmse_vs_blocks",
                      key="compare_scatter")

# -- evaluation ---------------------------------------------------------------------------------------------
st.subheader("KL and perplexity on held-out text")


@st.cache_data(max_entries=64, show_spinner=False)
def evaluate_flow(spec: str, corpus_spec: str, name: str, stamp: float, windows: int, seq_len: int,
                  with_affine: bool) -> list[dict]:
    from lft_core.evaluation import eval_windows, evaluate

    teacher = c.get_teacher(spec)
    flow, cfg = c.load_flow(name, spec, stamp)
    m, n = flow.span
    affine = None
    if with_affine:  # fitted on the flow's own training windows
        corpus, length, fit_windows, heldout = c.affine_settings(cfg)
        affine = c.load_affine(spec, corpus, flow.span, length, fit_windows, heldout)
    ids = eval_windows(teacher, corpus_spec, windows=windows, seq_len=seq_len)
    result = evaluate(teacher, flow, None, ids, ks=[int(cfg.get("k", 3))], skips=list(range(1, min(3, n - m) + 1)),
                      best_skip=False, affine=affine)
    label = {"lft": "LFT k={}", "skip": "skip {}", "affine": "affine"}
    return [{"flow": name, "span": f"{m}:{n}", "model": label[r.model].format(r.k), "KL": r.kl, "PPL": r.ppl,
             "NMSE": r.nmse, "teacher PPL": result.teacher_ppl} for r in result.rows]


col_w, col_t, col_a, col_b = st.columns([1, 1, 1, 2], vertical_alignment="bottom")
windows = col_w.number_input("Held-out windows", 1, 64, 4, key="w_cmp_windows")
seq = col_t.number_input("Tokens per window", 16, 512, min(c.seq_len(), 128), step=16, key="w_cmp_seq")
with_affine = col_a.toggle("affine baseline", value=True, key="w_cmp_affine",
                           help="Add the closed-form affine replacement of each flow's span, fitted on the flow's "
                                "own training windows: the cheapest learned replacement a flow must beat.")
which = [flows[i] for i in selected] or flows
params = (c.model_spec(), c.corpus_spec(), tuple(c.flow_key(f) for f in which), int(windows), int(seq),
          bool(with_affine))
if col_b.button(f"Evaluate {len(which)} flow(s)", type="primary", key="cmp_eval"):
    st.session_state["cmp_params"] = params
if st.session_state.get("cmp_params") == params:
    results = []
    bar = st.progress(0.0, text="Evaluating...")
    with c.engine_errors():
        for i, (name, stamp) in enumerate(params[2]):
            bar.progress(i / len(params[2]), text=f"Evaluating {name} ({i + 1}/{len(params[2])})...")
            results += evaluate_flow(params[0], params[1], name, stamp, params[3], params[4], params[5])
    bar.empty()
    evaluation = pd.DataFrame(results)
    st.session_state["compare_eval"] = evaluation
    c.show_table(evaluation, "flows_evaluation", key="compare_eval_df")
    st.caption("Skip rows remove the first k blocks of each flow's span; the affine row is the span replaced by one "
               "linear map fitted in closed form on the flow's training windows. Paper, Pythia-410M: FM replacing 6 "
               "layers 0.407 vs skipping 2 layers 0.529; FW replacing 12 layers 0.736 vs skipping 3 layers 0.932.")
