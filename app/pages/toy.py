"""Teaching lab: SFM versus Flow Walking on 2-D paired point clouds, trained in seconds."""
from __future__ import annotations

import numpy as np
import streamlit as st

from app import common as c
from app import figures
from lft_core.toy import DATASETS, LabRun

c.page_intro(
    "Teaching lab (2-D)",
    "Each point x0_i must travel to **its own** partner x1_i. Where straight paths cross, standard flow matching "
    "learns the average velocity at the crossing and delivers points to somebody else's target (recoupling); "
    "Flow Walking trains the k-step walk end to end and can keep the pairing.",
    "Press play under each plot to watch the points move along the learned k-step flow. Red points end nearer "
    "another point's target than their own; orange crosses mark where crossing straight paths come closest.",
)



def describe(name: str) -> str:
    """The first line of the dataset's docstring in lft_core.toy (so the text follows the engine)."""
    doc = (DATASETS[name].__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


CSV = "upload a CSV"
col_d, col_n, col_k, col_s = st.columns([2, 1, 1, 1])
dataset = col_d.selectbox("Dataset", list(DATASETS) + [CSV], key="w_toy_dataset")
if dataset != CSV:
    col_d.caption(describe(dataset))
n_points = col_n.slider("Points", 32, 1024, 256, step=32, key="w_toy_points", disabled=dataset == CSV)
k = col_k.slider("k (steps)", 1, 8, 3, key="w_toy_k")
steps = col_s.slider("Training steps", 100, 3000, 1000, step=100, key="w_toy_steps")
csv_bytes = None
if dataset == CSV:
    upload = st.file_uploader("CSV with a header x0,y0,x1,y1 (4 to 5000 rows)", type=["csv"], max_upload_size=2,
                              key="w_toy_csv")
    if upload is None:
        st.info("Upload a CSV of pairs: one row per point, columns x0, y0 (start) and x1, y1 (its target).")
        st.stop()
    csv_bytes = upload.getvalue()


@st.cache_data(max_entries=24, show_spinner=False)
def toy_run(dataset: str, method: str, steps: int, k: int, n_points: int, csv_bytes: bytes | None) -> LabRun:
    import io

    from lft_core.toy import lab_run, pairs_from_csv, run_toy, train_toy

    if csv_bytes is not None:
        result = train_toy(pairs_from_csv(io.BytesIO(csv_bytes), name="csv"), method=method, steps=steps, k=k)
    else:
        result = run_toy(dataset, method, steps, k=k, n_points=n_points)
    return lab_run(result)


params = (dataset, int(steps), int(k), int(n_points), csv_bytes)
if st.button("Train SFM and FW", type="primary", key="toy_train"):
    st.session_state["toy_params"] = params
if st.session_state.get("toy_params") != params:
    st.caption("Set the sliders and press **Train SFM and FW** (a few seconds each).")
    st.stop()

runs = {}
with c.engine_errors():
    for method, name in (("sfm", "SFM"), ("fw", "FW")):
        with st.spinner(f"Training {name} for {steps} steps..."):
            runs[name] = toy_run(dataset, method, int(steps), int(k), int(n_points), csv_bytes)
st.session_state["toy_runs"] = {name: r.metrics for name, r in runs.items()}

allp = np.concatenate([np.concatenate([r.x0, r.x1, r.frames.reshape(-1, 2)]) for r in runs.values()])
lo, hi = allp.min(0), allp.max(0)
pad = 0.08 * float((hi - lo).max())
lims = (lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad)
columns = st.columns(2)
for col, (name, r) in zip(columns, runs.items()):
    with col:
        metrics = r.metrics
        title = f"{name}: {'standard flow matching' if name == 'SFM' else 'Flow Walking'}, k = {k}"
        fig = figures.toy_animation(r.x0, r.x1, r.frames, r.times, r.recoupled, r.marks,
                                    title=title, lims=lims)
        c.show_figure(fig, f"toy_{dataset}_{name}", key=f"toy_fig_{name}")
        m1, m2, m3 = st.columns(3)
        m1.metric("Data recoupling ratio", f"{metrics['data_recoupling_ratio']:.2f}",
                  help="share of points the optimal assignment of starts to targets moves (a property of the data)")
        m2.metric("Endpoint MSE", f"{metrics['endpoint_mse']:.4f}", help="mean ‖x̂_1 − x1‖² after k Euler steps")
        m3.metric("Recoupled", f"{metrics['flow_recoupled_fraction']:.0%}",
                  help="share of points the learned flow delivers nearer another point's target than their own")
        st.caption(f"{metrics['n_points']} points, {metrics['steps']} steps, {metrics['seconds']:.1f} s.")

st.subheader("Training loss")
histories = {name: [{"step": i + 1, "loss": v} for i, v in enumerate(r.losses)] for name, r in runs.items()}
c.show_figure(figures.training_curves(histories, height=320), f"toy_{dataset}_losses", key="toy_losses")
st.caption("The two losses measure different things (SFM: velocity regression; FW: end-point error), so compare "
           "the end-point MSE above rather than the loss values.")
