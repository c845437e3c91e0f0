"""Compare spans: every trained flow side by side, seeds of one recipe as mean ± std, evaluated against skipping
blocks (in the span and at the best position) and the closed-form affine map, with the paper's plot."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import engine, frame, pages, progress, state
from app.figures.compare import kl_vs_blocks_figure, recipe_curves, recipe_nmse_errorbars
from lft_core.analysis import comparison as cmp
from lft_core.analysis import recipes
from lft_core.analysis.baselines import FitData, fitted_baselines
from lft_core import zoo
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


@st.cache_data(max_entries=16, show_spinner=False)
def heldout_ids(spec: str, corpus_spec: str, windows: int, seq_len: int):
    from lft_core.analysis.evaluation import eval_windows

    return eval_windows(engine.get_teacher(spec), corpus_spec, windows=windows, seq_len=seq_len)


@st.cache_data(max_entries=128, show_spinner=False)
def evaluate_flow(spec: str, corpus_spec: str, name: str, stamp: float, windows: int, seq_len: int) -> dict:
    """The flow at its own k: KL, PPL, NMSE (and the teacher's PPL) on the held-out windows."""
    from lft_core.analysis.evaluation import evaluate

    flow, cfg = engine.load_flow(name, spec, stamp)
    k = int(cfg.get("k", 3))
    result = evaluate(engine.get_teacher(spec), flow, None, heldout_ids(spec, corpus_spec, windows, seq_len), ks=[k],
                      skips=[], best_skip=False)
    row = result.rows[0]
    return {"flow": name, "span": str(Span.of(flow.span)), "k": k, "KL": row.kl, "PPL": row.ppl, "NMSE": row.nmse,
            "teacher PPL": result.teacher_ppl}


@st.cache_data(max_entries=64, show_spinner=False)
def evaluate_baseline(spec: str, corpus_spec: str, name: str, span: tuple[int, int], fit: FitData, windows: int,
                      seq_len: int, _prepared) -> dict:
    """The fitted baseline ``name`` of ``span`` (fitted on ``fit``) on the held-out windows (``_prepared`` is that
    fit: the key is ``name``, ``span`` and ``fit``)."""
    from lft_core.analysis.evaluation import evaluate

    result = evaluate(engine.get_teacher(spec), None, span, heldout_ids(spec, corpus_spec, windows, seq_len), ks=[],
                      skips=[], best_skip=False, baselines=[_prepared])
    row = result.rows[0]
    return {"baseline": name, "span": str(Span.of(span)), "KL": row.kl, "PPL": row.ppl, "NMSE": row.nmse}


@st.cache_data(max_entries=32, show_spinner=False)
def skip_grid(spec: str, corpus_spec: str, windows: int, seq_len: int, ks: tuple[int, ...], starts: tuple[int, ...],
              _progress=None) -> list:
    """Skip-k for every k of ``ks`` from every start of ``starts`` on the held-out windows (``_progress(done,
    total)`` is not part of the key)."""
    return cmp.skip_kl_grid(engine.get_teacher(spec), heldout_ids(spec, corpus_spec, windows, seq_len), ks, starts,
                            progress=_progress)


def skip_grid_with_bar(bar, before: int, total: int, what: str, *args) -> list:
    """``skip_grid(*args)`` in a worker (``progress.in_worker``) while ``bar`` counts the start positions done (i of N),
    as units ``before`` … ``before + N`` of ``total``."""
    windows, starts = args[2], args[5]
    n, per_batch = max(1, len(starts)), 8  # skip_kl_grid's batch of windows
    batches = -(-windows // per_batch)
    counted = {"done": 0}

    def poll() -> None:
        done = counted["done"]
        b = min(done // n, batches - 1)
        i = done - b * n if done < batches * n else n
        text = f"Evaluating skip-k {what} ({min(i + 1, n)} of {n})"
        if batches > 1:
            text += f", windows {b * per_batch + 1}–{min((b + 1) * per_batch, windows)} of {windows}"
        bar.progress(min(1.0, (before + n * done / (batches * n)) / total), text=text)

    poll()
    return progress.in_worker(skip_grid, *args, poll=poll, _progress=lambda done, _total: counted.update(done=done))


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
ks = tuple(range(1, int(skip_max) + 1))
spans = sorted({f.span for f in chosen})
starts = cmp.grid_starts(teacher.n_layers, ks, None if best else spans)
params = (state.model_spec(), state.corpus_spec(), tuple(engine.flow_key(f) for f in chosen), int(windows), int(seq),
          with_baselines, ks, bool(best))
if st.button(f"Evaluate {len(chosen)} flow(s)", type="primary", key="cmp_eval"):
    st.session_state["cmp_params"] = params
if st.session_state.get("cmp_params") != params:
    st.caption(f"Evaluation: {len(chosen)} flow(s), "
               + "".join(f"{name} baselines of {len(spans)} span(s), " for name in with_baselines)
               + (f"skip-k at all {len(starts)} start positions" if best else f"skip-k in {len(spans)} span(s)")
               + f", on {int(windows)} held-out windows × {int(seq)} tokens.")
    st.stop()

spec, corpus = params[0], params[1]
flow_rows: list[dict] = []
baseline_rows: list[dict] = []
baselines_of: dict[str, list[dict]] = {}
grid: list = []
with engine.engine_errors():
    fits: dict[tuple, list] = {}  # (baseline, span, fit data) -> flows sharing that fitted baseline
    for name in with_baselines:
        for f in chosen:
            fits.setdefault((name, tuple(f.span), engine.fit_data(f.config)), []).append(f)
    total = len(chosen) + len(fits) + len(starts)
    bar = st.progress(0.0, text="Evaluating...")
    done = 0
    for i, f in enumerate(chosen):
        bar.progress(done / total, text=f"Evaluating flow {f.name} ({i + 1} of {len(chosen)})")
        flow_rows.append(evaluate_flow(spec, corpus, f.name, f.stamp, int(windows), int(seq)))
        done += 1
    for i, ((baseline, span, fit), members) in enumerate(fits.items()):
        bar.progress(done / total, text=f"Evaluating the {baseline} baseline of span {Span.of(span)} ({i + 1} of "
                                        f"{len(fits)})")
        prepared = engine.get_baseline(baseline, Span.of(span), members[0].config)
        row = evaluate_baseline(spec, corpus, baseline, span, fit, int(windows), int(seq), prepared)
        same_span = [key for key in fits if key[:2] == (baseline, span)]
        label = f"{baseline} {Span.of(span)}" + (f" ({fit.corpus}, {fit.windows} × {fit.seq_len})"
                                                 if len(same_span) > 1 else "")
        row = {**row, "name": label}
        baseline_rows.append(row)
        for m in members:
            baselines_of.setdefault(m.name, []).append(row)
        done += 1
    if starts:
        what = "at every position" if best else "in the spans"
        grid = skip_grid_with_bar(bar, done, total, what, spec, corpus, int(windows), int(seq), ks, tuple(starts))
    bar.empty()

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
