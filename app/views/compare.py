"""Compare spans: every trained flow side by side, seeds of one recipe as mean ± std, evaluated against skipping
blocks (in the span and at the best position) and the closed-form affine map, with the paper's plot."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import engine, frame, pages, progress, state
from app.progress import fmt_seconds
from app.figures.compare import kl_vs_blocks_figure, recipe_curves, recipe_nmse_errorbars
from lft_core.analysis import comparison as cmp
from lft_core.analysis import recipes
from lft_core.analysis.baselines import fitted_baselines
from lft_core import zoo
from lft_core.analysis.compare_eval import CompareRequest, request_key, saved_comparison
from lft_core.errors import LFTError
from lft_core.run.jobs import last_job, running_job, start_unique_job
from lft_core.span import Span

X_CHOICES = {"training step": "step", "wall time (s)": "seconds"}
MAX_DEFAULT_FLOWS = 12


frame.page_intro(
    pages.COMPARE,
    "What if a different span were replaced? Each trained flow replaces n − m blocks with about one block of "
    "parameters; its held-out NMSE = ‖x̂_1 − h_n‖² / ‖h_n‖² says how well it lands, and KL against the teacher "
    "says what that costs the predictions, compared with simply skipping blocks. Flows trained with the same "
    "settings and different seeds are one *recipe*: they are shown as mean ± standard deviation over the seeds.",
    "Choose the flows to compare below; the choice (and every other input here) is kept when you visit another "
    "page.",
)

teacher = engine.require_teacher()
flows = engine.flows_for(teacher)
if not flows:
    st.info("No flow is trained for this model yet. Train flows for a few spans on the **Train** page and compare "
            "them here.")
    st.page_link(pages.TRAIN.file, label="Train a flow", icon=pages.TRAIN.icon)
    st.stop()

by_name = {f.name: f for f in flows}
all_groups = recipes.group_flows(flows)
recipe_of = {name: g.label for g in all_groups for name in g.names}

# -- every flow, and the recipes they form --------------------------------------------------------------------
rows = []
for f in flows:
    params, replaced = f.params, f.teacher_span_params
    rows.append({"name": f.name, "span": str(f.span), "blocks": f.span.blocks, "method": f.method, "k": f.k,
                 "seed": f.config.get("seed"), "steps": f.steps_done, "heldout_nmse": f.last_nmse,
                 "params (M)": round(params / 1e6, 2), "replaced params (M)": round(replaced / 1e6, 2),
                 "params / replaced": round(params / replaced, 3) if replaced else None,
                 "recipe": recipe_of.get(f.name), "origin": f.origin_line})
table = pd.DataFrame(rows)
st.session_state["compare_table"] = table
frame.show_table(table.rename(columns={"heldout_nmse": "held-out NMSE"}), "flows_compare", key="compare_table_df")

# -- the zoo's curve: shipped, drawn at once ------------------------------------------------------------------
curve = zoo.read_curve()
if curve is not None and curve.get("teacher_weights_hash") == teacher.weights_hash:
    st.subheader("The shipped flows against skipping blocks")
    st.session_state["compare_zoo_points"] = zoo_points = cmp.zoo_curve_points(curve)
    frame.show_figure(kl_vs_blocks_figure(zoo_points), "zoo_kl_vs_blocks", key="compare_zoo_curve")
    st.caption(f"The flows shipped with the project (the zoo: trained once, at length, by `scripts/train_zoo.py`), the "
               f"affine map of their spans and skip-k at its best position, on {curve['windows']} held-out windows × "
               f"{curve['seq_len']} tokens of the `{curve['corpus']}` corpus, measured when the zoo was built "
               f"(`{curve.get('command', 'python scripts/train_zoo.py --curve-only')}` measures it again). "
               "Evaluate your own flows below for the same plot on the text you choose.")

st.subheader("Recipes: mean ± std over seeds")
recipe_table = recipes.groups_table(all_groups)
st.session_state["compare_groups"] = recipe_table
frame.show_table(recipe_table.drop(columns=["NMSE mean", "NMSE std"]), "recipes", key="compare_groups_df")
st.caption("A recipe is every flow trained with the same model, corpus, span, method, k, steps, distillation steps, "
           "windows, learning rate and other settings; only the seed (and the name) differ. ± is the sample standard "
           "deviation over its seeds (n − 1), shown from two seeds on.")

# -- the flows to compare -------------------------------------------------------------------------------------
names = list(by_name)
span_now = st.session_state.get(state.SPAN)
if len(names) <= MAX_DEFAULT_FLOWS:
    default = names
else:
    same_span = [f.name for f in flows if span_now is not None and f.span == Span.of(span_now)]
    default = (same_span or names)[:MAX_DEFAULT_FLOWS]
state.valid_choice("w_cmp_flows", names, default, multi=True)
chosen_names = st.multiselect("Flows to compare", names, key="w_cmp_flows", persist_state=state.KEEP,
                              format_func=lambda n: by_name[n].label,
                              help="The training curves, the evaluation and the plots below use these flows; "
                                   "seeds of one recipe are averaged.")
chosen = [by_name[n] for n in chosen_names]
if not chosen:
    st.info("Choose at least one flow above to see its training curves and to evaluate it.")
    st.stop()
groups = recipes.group_flows(chosen)

# -- training curves --------------------------------------------------------------------------------------------
st.subheader("Training curves")
st.session_state.setdefault("w_cmp_x", "training step")
x_label = st.radio("x axis", list(X_CHOICES), key="w_cmp_x", persist_state=state.KEEP, horizontal=True,
                   help="Compare recipes at equal training steps, or at equal training time (a step of a bigger "
                        "batch or of more integration steps costs more time).")
x = X_CHOICES[x_label]
curves = recipes.curves_frame(groups, x)
st.session_state["compare_curve_table"] = curves
seconds_of = {f.name: recipes.history_seconds(f) for f in chosen} if x == "seconds" else {}  # (times, how) or None
timing = {found[1] if found else None for found in seconds_of.values()}
x_title = "training step" if x == "step" else (
    "training time (s)" if timing <= {"recorded"} else "training time (s), summed step times")
col_curves, col_nmse = st.columns([3, 2])
with col_curves:
    if curves.empty:
        st.info("These flows recorded no training time." if x == "seconds" else "These flows have no training history.")
    else:
        frame.show_figure(recipe_curves(curves, x_title), "training_curves", key="compare_curves")
with col_nmse:
    chosen_recipes = recipes.groups_table(groups)
    if chosen_recipes["NMSE mean"].notna().any():
        frame.show_figure(recipe_nmse_errorbars(chosen_recipes), "nmse_vs_blocks", key="compare_scatter")
notes = ["Lines are the mean over a recipe's seeds, the band ± one standard deviation; long loss curves are "
         "smoothed (exponential moving average) before averaging."]
if x == "seconds":
    if None in timing:
        missing = [name for name, found in seconds_of.items() if found is None]
        notes.append(f"No training time could be read for {', '.join(missing)} (left out).")
    if "summed step times" in timing:
        notes.append("Training time is the sum of each step's measured duration (recorded as its tokens per "
                     "second): held-out evaluations and checkpoint writes are not counted, and times from different "
                     "machines are not comparable.")
st.caption(" ".join(notes))

# -- evaluation -----------------------------------------------------------------------------------------------
st.subheader("KL and perplexity on held-out text")


def evaluation_job(request: CompareRequest, key: str, n_spans: int) -> None:
    """No saved result for this request: its job's progress when one runs (any session), else what it will
    evaluate and the button that starts it in the background."""
    label = f"compare {key}"
    running = running_job("compare", label)
    if running is None:
        last = last_job("compare", label)
        if last is not None and last.status == "failed":
            st.error(f"The last evaluation of these settings failed: {last.error_line() or last.log_tail(3)}")
        st.caption(f"Evaluation: {len(request.flows)} flow(s), "
                   + "".join(f"{name} baselines of {n_spans} span(s), " for name in request.baselines)
                   + ("skip-k at every start position (computed once per text and reused)" if request.best
                      else f"skip-k in {n_spans} span(s)")
                   + f", on {request.windows} held-out windows × {request.seq_len} tokens. It runs in the "
                     "background: leave the page and come back, the result is saved.")
        if st.button(f"Evaluate {len(request.flows)} flow(s)", type="primary", key="cmp_eval"):
            try:
                job = start_unique_job("compare", ["--model", state.model_spec(), *request.cli_args()], label)
                st.session_state["cmp_job"] = job.id
            except LFTError as e:
                st.error(str(e))
                return
            st.rerun()
        return
    progress.watch_job(running.id, "Evaluating in the background",
                       "You can leave this page: the evaluation goes on and its result is saved.")


st.session_state.setdefault("w_cmp_windows", 4)
st.session_state.setdefault("w_cmp_seq", max(16, min(state.seq_len(), 128)))
st.session_state.setdefault("w_cmp_skip_max", 3)
st.session_state.setdefault("w_cmp_best", True)
FITTED = fitted_baselines()  # each offered as a toggle (``baselines.BASELINES``), on by default
for b in FITTED:
    st.session_state.setdefault(f"w_cmp_{b.name}", True)
col_w, col_t, col_k, col_best, *col_fitted = st.columns([1] * (4 + len(FITTED)), vertical_alignment="bottom")
windows = col_w.number_input("Held-out windows", 1, 64, key="w_cmp_windows", persist_state=state.KEEP)
seq = col_t.number_input("Tokens per window", 16, 512, step=16, key="w_cmp_seq", persist_state=state.KEEP)
skip_max = col_k.number_input("skip-k up to k =", 1, min(8, teacher.n_layers), key="w_cmp_skip_max",
                              persist_state=state.KEEP,
                              help="Skip-k removes k blocks: inside each flow's span (its first k blocks, k up to "
                                   "the span's length) and, with the next switch, at every position.")
best = col_best.toggle("skip-k at its best position", key="w_cmp_best", persist_state=state.KEEP,
                       help="Remove k blocks at every position of the model and keep the position with the lowest "
                            "KL on these windows (chosen on the same text, which favours the baseline). "
                            "Costs about one pass of the model per start position and k, once: results are kept.")
with_baselines = tuple(b.name for b, col in zip(FITTED, col_fitted)
                       if col.toggle(f"{b.name} baseline", key=f"w_cmp_{b.name}", persist_state=state.KEEP,
                                     help=f"Add the {b.label} of each flow's span ({b.help}): a flow must beat it."))
request = CompareRequest(tuple(f.name for f in chosen), state.corpus_spec(), int(windows), int(seq), int(skip_max),
                         bool(best), with_baselines)
key = request_key(request, teacher.model_id, teacher.weights_hash,
                  {f.name: str(f.config.get("weights_sha256")) for f in chosen})
spans = sorted({f.span for f in chosen})
st.session_state["compare_request"] = request
saved = saved_comparison(key)
if saved is None:
    evaluation_job(request, key, len(spans))
    st.stop()

flow_rows = saved["flow_rows"]
baseline_rows = [{k: v for k, v in row.items() if k != "members"} for row in saved["baseline_rows"]]
baselines_of: dict[str, list[dict]] = {}
for row, clean in zip(saved["baseline_rows"], baseline_rows):
    for member in row["members"]:
        baselines_of.setdefault(member, []).append(clean)
grid = [cmp.SkipKL.of(r) for r in saved["grid"]]
st.caption(f"Evaluated in {fmt_seconds(saved.get('seconds'))} by a background job and saved: every session asking for "
           "the same flows and settings reads it back (skip-k at every position is computed once per text and "
           "reused everywhere). `python -m lft_core compare " + " ".join(request.cli_args()) + "` does the same.")
teacher_ppl = flow_rows[0]["teacher PPL"] if flow_rows else None
skip_rows = cmp.skip_in_span(grid, spans, max_k=int(skip_max))
best_rows = cmp.best_skips(grid) if best else {}
evaluation = cmp.per_flow_table(flow_rows, baselines_of, skip_rows, teacher_ppl)
shown = cmp.evaluation_table(flow_rows, baseline_rows, skip_rows, best_rows)
by_recipe = cmp.group_evaluation(flow_rows, groups)
points = cmp.kl_vs_blocks(flow_rows, groups, skip_rows, best_rows, baseline_rows)
st.session_state["compare_eval"] = evaluation
st.session_state["compare_eval_table"] = shown
st.session_state["compare_eval_groups"] = by_recipe
st.session_state["compare_kl_points"] = points

if teacher_ppl is not None:
    st.metric("Teacher perplexity on these windows", f"{teacher_ppl:.3f}",
              help="The unchanged model on the same held-out text: every perplexity below is compared with it.")
frame.show_table(shown, "flows_evaluation", key="compare_eval_df")
st.caption("Each result appears once: a row per flow (its own k integration steps), per fitted baseline ("
           + ", ".join(with_baselines or [b.name for b in FITTED]) + "; one per span and training data, fitted on the "
           "flows' training windows), per skip-k inside a span "
           "(its first k blocks) and per skip-k at its best position. KL is KL(teacher ‖ model) per token in nats; "
           "NMSE is the replaced span's end point against h_n on the same text.")
if len(by_recipe):
    st.markdown("**Per recipe: mean ± std over the evaluated seeds**")
    frame.show_table(by_recipe.drop(columns=["KL mean", "KL std", "NMSE mean", "NMSE std", "PPL mean"]),
                     "recipes_evaluation", key="compare_eval_groups_df")
frame.show_figure(kl_vs_blocks_figure(points), "kl_vs_blocks", key="compare_kl_blocks")
st.caption("The paper's comparison on this model: a flow replaces n − m blocks with one layer, skip-k removes k "
           "blocks. Error bars are ± one standard deviation over a recipe's seeds. Grey open markers are the "
           "paper's own numbers on Pythia-410M (24 blocks), another model and text, for orientation only: flow "
           "matching replacing 6 blocks 0.407 vs skipping 2 blocks 0.529; Flow Walking replacing 12 blocks 0.736 vs "
           "skipping 3 blocks 0.932.")
