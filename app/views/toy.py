"""Teaching lab: SFM versus Flow Walking on 2-D paired point clouds, trained in seconds."""
from __future__ import annotations

import streamlit as st

from app import engine, frame, pages, progress, state
from app.figures.toy import toy_pair_animation
from app.figures.training import training_curves
from lft_core.errors import LFTError
from lft_core.flow.toy import DATASETS, LAB_DEFAULTS, LabRun

frame.page_intro(
    pages.TOY,
    "Each point x0_i must travel to **its own** partner x1_i. Where straight paths cross, standard flow matching "
    "(SFM) learns the average velocity at the crossing, and its flow **misroutes** points: it delivers them "
    "nearer another point's target than their own. Flow Walking (FW) trains the k-step walk end to end and can "
    "keep the pairing.",
    "Train both methods on the same data, then press ▶ play (or drag the t slider) to watch the two learned "
    "k-step flows side by side, in step.",
)


@st.cache_data(max_entries=8, show_spinner=False)
def check_csv(csv_bytes: bytes) -> str | None:
    """None when ``csv_bytes`` is a pairs CSV the lab can train on, else the one line saying why."""
    import io

    from lft_core.flow.toy import pairs_from_csv

    try:
        pairs_from_csv(io.BytesIO(csv_bytes), name="csv")
    except LFTError as e:
        return str(e).removeprefix("csv: ")
    return None


CSV = "upload a CSV"
OPTIONS = list(DATASETS) + [CSV]
POINTS = 256  # every preset's default (LAB_DEFAULTS were measured with it)
K_RANGE = (1, 8)

# What each preset teaches with its LAB_DEFAULTS (measured, seed 0, 256 points: see lft_core.flow.toy).
LESSONS = {
    "mirror": "Every straight path passes through the centre at t = ½, so optimal transport would re-pair every "
              "point (recoupling ratio 1). SFM averages the opposing velocities there and misroutes most points; "
              "FW learns to steer round the centre and misroutes far fewer.",
    "rotation": "The chords of a ring turned by 120° cross each other everywhere. SFM misroutes about a third of "
                "the points; FW almost none.",
    "swap": "Two clusters exchange places head-on. With k = 2 (this preset) the walk evaluates the field at t = ½, "
            "exactly where the clusters meet: SFM learned the average of two opposite velocities there (about "
            "zero), so its points stall in the middle, while FW delivers both clusters. At k = 3 FW still brings "
            "each cluster to the right place (a far lower endpoint MSE), but inside the dense clusters it misroutes "
            "about as many points as SFM: read the endpoint MSE together with the misrouted share.",
    "identity": "No straight paths cross here (recoupling ratio 0), so SFM already delivers every point to its own "
                "target: neither method misroutes a point, and there is nothing for Flow Walking to fix. That is "
                "the lesson: FW's advantage comes from crossings.",
}


def describe(name: str) -> str:
    """The first line of the dataset's docstring in lft_core.flow.toy (so the text follows the engine)."""
    doc = (DATASETS[name].__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def use_preset() -> None:
    """on_change of the dataset: its k and training steps (LAB_DEFAULTS), where the lesson shows."""
    preset = LAB_DEFAULTS.get(st.session_state.get("w_toy_dataset"))
    if preset is not None:
        st.session_state["w_toy_k"] = preset.k
        st.session_state["w_toy_steps"] = preset.steps


# Defaults go through session state (the widgets take no value argument), so kept values win.
state.valid_choice("w_toy_dataset", OPTIONS, "mirror")
preset = LAB_DEFAULTS.get(st.session_state["w_toy_dataset"], LAB_DEFAULTS["mirror"])
st.session_state.setdefault("w_toy_points", POINTS)
st.session_state.setdefault("w_toy_steps", preset.steps)
st.session_state.setdefault("w_toy_k", preset.k)  # the lab's own k (the other pages' k is a real flow's)

col_d, col_n, col_k, col_s = st.columns([2, 1, 1, 1])
dataset = col_d.selectbox("Dataset", OPTIONS, key="w_toy_dataset", persist_state=state.KEEP, on_change=use_preset,
                          help="Choosing a built-in dataset sets its k and training steps, where its lesson shows.")
if dataset != CSV:
    col_d.caption(describe(dataset))
n_points = col_n.slider("Points", 32, 1024, step=32, key="w_toy_points", persist_state=state.KEEP,
                        disabled=dataset == CSV)
k = col_k.slider("k (steps)", *K_RANGE, key="w_toy_k", persist_state=state.KEEP,
                 help="Euler steps of the learned flow (FW also trains through exactly these k steps).")
steps = col_s.slider("Training steps", 100, 3000, step=100, key="w_toy_steps", persist_state=state.KEEP)
if dataset in LESSONS:
    preset = LAB_DEFAULTS[dataset]
    st.info(f"**{dataset}**: {LESSONS[dataset]}  \nPreset: k = {preset.k}, {preset.steps} training steps, "
            f"{POINTS} points.", icon=":material/school:")
csv_bytes, csv_problem = None, None
if dataset == CSV:
    upload = st.file_uploader("CSV with a header x0,y0,x1,y1 (4 to 5000 rows)", type=["csv"], max_upload_size=2,
                              key="w_toy_csv")
    if upload is None:
        st.info("Upload a CSV of pairs: one row per point, columns x0, y0 (start) and x1, y1 (its target).")
        st.stop()
    csv_bytes = upload.getvalue()
    try:  # parsed at once, bounded (size, cells, rows, numbers): a bad file is one line, never a traceback
        csv_problem = check_csv(csv_bytes)
    except Exception as e:  # noqa: BLE001 (pairs_from_csv raises LFTError only; anything else is still one line)
        csv_problem = f"the CSV cannot be read ({type(e).__name__})"
    if csv_problem:
        st.error(f"The uploaded CSV cannot be used: {csv_problem}")


@st.cache_data(max_entries=24, show_spinner=False)
def toy_run(dataset: str, method: str, steps: int, k: int, n_points: int, csv_bytes: bytes | None) -> LabRun:
    import io

    from lft_core.flow.toy import lab_run, pairs_from_csv, run_toy, train_toy

    if csv_bytes is not None:
        result = train_toy(pairs_from_csv(io.BytesIO(csv_bytes), name="csv"), method=method, steps=steps, k=k)
    else:
        result = run_toy(dataset, method, steps, k=k, n_points=n_points)
    return lab_run(result)


params = (dataset, int(steps), int(k), int(n_points), csv_bytes)
if st.button("Train SFM and FW", type="primary", key="toy_train"):
    st.session_state["toy_params"] = params
if csv_problem:
    st.stop()
if st.session_state.get("toy_params") != params:
    st.caption("Set the sliders and press **Train SFM and FW** (a few seconds each).")
else:
    runs: dict[str, LabRun] = {}
    with engine.engine_errors():
        for method, name in (("sfm", "SFM"), ("fw", "FW")):
            runs[name] = progress.with_progress(f"Training {name} for {steps} steps", f"toy {method} {steps} steps "
                                                f"{n_points} points", toy_run, dataset, method, int(steps), int(k),
                                                int(n_points), csv_bytes)
    st.session_state["toy_runs"] = {name: r.metrics for name, r in runs.items()}

    sfm, fw = runs["SFM"], runs["FW"]
    ratio = sfm.metrics["data_recoupling_ratio"]
    st.metric("Recoupling ratio of the data", f"{ratio:.2f}",
              help="share of points that the optimal (cheapest) assignment of starts to targets pairs with another "
                   "point's target: a property of the data before any training (0: the straight paths keep every "
                   "pairing)")
    titles = {"SFM": f"SFM: standard flow matching, k = {k}", "FW": f"FW: Flow Walking, k = {k}"}
    fig = toy_pair_animation(sfm.x0, sfm.x1, sfm.times,
                             {titles[name]: (r.frames, r.recoupled) for name, r in runs.items()},
                             cross_marks=sfm.marks)
    frame.show_figure(fig, f"toy_{dataset}_k{k}", key="toy_pair_fig")
    st.caption("One time slider drives both flows. Blue: the point ends nearest its own target; red: the flow "
               "misroutes it (ends nearer another point's target). Green circles are the targets x1, faint lines "
               "the straight paths x0 → x1, small orange crosses where two crossing straight paths come closest "
               "(there SFM has to average two velocities). x and y are the 2-D coordinates.")
    for col, (name, r) in zip(st.columns(2), runs.items()):
        metrics = r.metrics
        with col:
            st.markdown(f"**{titles[name]}**")
            m1, m2 = st.columns(2)
            m1.metric("Endpoint MSE", f"{metrics['endpoint_mse']:.4f}",
                      help="mean ‖x̂_1 − x1‖² over points, x̂_1 after k Euler steps (0: every point on its "
                           "target)")
            m2.metric("Misrouted by the flow", f"{metrics['flow_recoupled_fraction']:.0%}",
                      help="share of points the learned flow delivers nearer another point's target than their own")
            st.caption(f"{metrics['n_points']} points, {metrics['steps']} training steps, {metrics['seconds']:.1f} s.")

    s_mis, f_mis = sfm.metrics["flow_recoupled_fraction"], fw.metrics["flow_recoupled_fraction"]
    s_mse, f_mse = sfm.metrics["endpoint_mse"], fw.metrics["endpoint_mse"]
    numbers = (f"FW misroutes {f_mis:.0%} of the points against SFM's {s_mis:.0%}; endpoint MSE {f_mse:.4f} "
               f"against {s_mse:.4f}.")
    if max(s_mis, f_mis) < 0.01:
        why = ("the optimal pairing is the given one (recoupling ratio 0), so there is nothing for Flow Walking to "
               "fix" if ratio == 0 else "both keep the pairing with these settings")
        st.info(f"Both flows deliver almost every point to its own target ({numbers}): {why}.",
                icon=":material/check_circle:")
    elif f_mis < s_mis and f_mse < s_mse:
        st.success(f"Flow Walking keeps more of the pairing: {numbers}", icon=":material/check_circle:")
    else:
        defaults = LAB_DEFAULTS.get(dataset)
        hint = (f" This dataset's preset is k = {defaults.k}, {defaults.steps} training steps."
                if defaults is not None and (defaults.k, defaults.steps) != (k, steps) else
                " More training steps or another k may change that.")
        st.warning(f"With these settings Flow Walking does not beat SFM on both measures: {numbers}{hint}",
                   icon=":material/info:")

    st.subheader("Training loss")
    histories = {name: [{"step": i + 1, "loss": v} for i, v in enumerate(r.losses)] for name, r in runs.items()}
    loss_fig = training_curves(histories, height=320)
    loss_fig.update_xaxes(title="training step")
    loss_fig.layout.yaxis.title = "loss (log scale)"
    frame.show_figure(loss_fig, f"toy_{dataset}_losses", key="toy_losses")
    st.caption("Loss against training step, one colour per method: the faint line is the loss at every step, the "
               "bold line its exponential moving average (smoothed). The two losses measure different things (SFM: "
               "velocity regression; FW: end-point error), so compare the endpoint MSE above rather than the "
               "loss values.")

# The lab is the last step of the path (the frame adds no "Next:" here): point back to the real model.
st.page_link(pages.TRAJECTORIES.file, label="Now on a real model: its latent trajectories",
             icon=":material/arrow_forward:")
