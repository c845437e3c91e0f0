"""Train: launch a flow-training job in the background, watch it live, list the saved flows."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import common as c
from app import figures
from lft_core.errors import LFTError
from lft_core.jobs import list_jobs, read_job, start_job, stop_job
from lft_core.store import delete_flow, list_flows
from lft_core.training import METHODS, TrainConfig

c.page_intro(
    "Train a latent flow",
    "**Standard flow matching (SFM)** regresses the velocity u(x_t, t) on x1 − x0 along straight interpolants "
    "x_t = (1 − t) x0 + t x1. **Flow Walking (FW)** integrates k steps from x0 and trains the end point x̂_1 "
    "towards x1, so crossing token paths do not get averaged. *Hybrid* = FW + α·SFM.",
    "Training runs as a background process: you can leave this page or reload it and come back.",
)

teacher = c.require_teacher()
span = c.current_span(teacher)
st.markdown(f"Span **{span}**: {span.blocks} blocks of {teacher.n_layers}, "
            f"{teacher.span_params(*span) / 1e6:.1f} M teacher parameters replaced by about one block's worth.")
st.page_link("pages/span.py", label="Change the span", icon=":material/grid_on:")

METHOD_NAMES = {"fw": "Flow Walking (FW)", "sfm": "Standard flow matching (SFM)", "hybrid": "Hybrid (FW + α·SFM)"}

D = TrainConfig()  # the default recipe: every input starts at the engine's default

with st.form("train_form"):
    col1, col2, col3, col4 = st.columns(4)
    method = col1.selectbox("Method", METHODS, index=METHODS.index(D.method), format_func=METHOD_NAMES.get,
                            key="w_method")
    k = col2.number_input("k (integration steps)", min_value=1, max_value=16, value=D.k, key="w_k")
    steps = col3.number_input("Flow steps", min_value=1, max_value=100_000, value=D.steps, step=50, key="w_steps",
                              help="Flow-matching steps on (h_m, h_n) pairs.")
    distill = col4.number_input("Distillation steps", min_value=0, max_value=100_000, value=D.distill_steps, step=50,
                                key="w_distill_steps",
                                help="Then fine-tune on KL(teacher ‖ spliced model) through the rest of the model: "
                                     "the lever that lowers KL most (docs/RESULTS.md). 0: off.")
    st.caption(f"The defaults are the project's default recipe: {D.steps} steps of {METHOD_NAMES[D.method]}, then "
               f"{D.distill_steps} distillation steps; about 10 minutes for a 6-block span on 2 CPU cores.")
    col5, col6, col7, col8 = st.columns(4)
    batch = col5.number_input("Batch (windows)", min_value=1, max_value=256, value=D.batch, key="w_batch")
    lr = col6.number_input("Learning rate", min_value=1e-6, max_value=1.0, value=D.lr, step=1e-4, format="%.4f",
                           key="w_lr")
    init = col7.checkbox("Initialise from teacher block m", value=D.init_from_teacher, key="w_init",
                         help="Copy block m's attention and MLP weights into the velocity field.")
    name = col8.text_input("Flow name (optional)", key="w_name", placeholder="derived from the settings",
                           help="Letters, digits, '-', '_' and '.'.")
    with st.expander("More settings"):
        a1, a2, a3, a4, a5 = st.columns(5)
        windows = a1.number_input("Training windows", min_value=1, max_value=65_536, value=D.windows,
                                  key="w_train_windows")
        heldout = a2.number_input("Held-out windows", min_value=1, max_value=256, value=D.heldout_windows,
                                  key="w_heldout_windows")
        eval_every = a3.number_input("Evaluate every (steps)", min_value=1, max_value=10_000, value=D.eval_every,
                                     key="w_eval_every")
        alpha = a4.number_input("α (hybrid)", min_value=0.0, max_value=10.0, value=D.alpha, key="w_alpha")
        seed = a5.number_input("Seed", min_value=0, max_value=2**31 - 1, value=D.seed, key="w_seed")
        b1, b2, b3, _ = st.columns([1, 1, 1, 2])
        waypoints = b1.number_input("Waypoint weight", min_value=0.0, max_value=100.0, value=D.waypoints, step=0.1,
                                    key="w_waypoints",
                                    help="Also match the teacher's own path through h_m+1 … h_n-1 (0: off).")
        distill_lr = b2.number_input("Distillation lr", min_value=1e-7, max_value=1.0, value=D.distill_lr,
                                     step=1e-5, format="%.5f", key="w_distill_lr")
        distill_batch = b3.number_input("Distillation batch", min_value=1, max_value=256, value=D.distill_batch,
                                        key="w_distill_batch")
        st.caption(f"Windows of {c.seq_len()} tokens from the corpus chosen on the Setup page.")
    submitted = st.form_submit_button("Start training", type="primary")

if submitted:
    cfg = TrainConfig(model=c.model_spec(), corpus=c.corpus_spec(), span=span, method=method, k=int(k),
                      alpha=float(alpha), steps=int(steps), batch=int(batch), seq_len=c.seq_len(),
                      windows=int(windows), heldout_windows=int(heldout), lr=float(lr), seed=int(seed),
                      init_from_teacher=bool(init), eval_every=int(eval_every), waypoints=float(waypoints),
                      distill_steps=int(distill), distill_lr=float(distill_lr), distill_batch=int(distill_batch),
                      name=name.strip() or None)
    try:
        cfg.validate(teacher.n_layers)
        flow_name = cfg.name or cfg.default_name()
        cfg.name = flow_name
        if any(f.name == flow_name for f in list_flows()) or any(
                j.label == flow_name and j.status in ("running", "stopping") for j in list_jobs("train")):
            raise LFTError(f"a flow named {flow_name!r} exists or is being trained; give another name")
        job = start_job("train", cfg.cli_args(), label=flow_name)
        st.session_state["train_job"] = job.id
        st.toast(f"Training {flow_name} started")
    except LFTError as e:
        st.error(str(e))


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def draw_job(job) -> None:
    with st.container(border=True):
        icon = {"running": ":material/hourglass_top:", "stopping": ":material/stop_circle:",
                "complete": ":green[:material/check_circle:]", "stopped": ":material/stop_circle:",
                "failed": ":red[:material/error:]", "damaged": ":red[:material/error:]"}[job.status]
        head, button = st.columns([5, 1], vertical_alignment="center")
        head.markdown(f"{icon} **{job.label}** · {job.status} · started {job.created.replace('T', ' ')[:19]} UTC")
        if job.status == "running" and button.button("Stop", key=f"stop-{job.id}", icon=":material/stop:"):
            stop_job(job.id)
            st.toast("Stopping after the current step; the flow is saved.")
        last = job.last
        if job.status in ("running", "stopping"):
            if not job.events:
                done = c.tqdm_progress(job.log_tail(5), "caching")
                text = "Preparing data: caching h_m and h_n of the training and held-out windows"
                st.progress(done[0] / max(done[1], 1) if done else 0.0,
                            text=text + (f" ({done[0]}/{done[1]} windows)" if done else " ..."))
            else:
                st.progress(min(1.0, last["step"] / last["steps"]),
                            text=f"step {last['step']} / {last['steps']} · ETA {_eta(last.get('eta_s'))}")
        if job.events:
            nmse = [e["heldout_nmse"] for e in job.events if e.get("heldout_nmse") is not None]
            cols = st.columns(4)
            cols[0].metric("Loss", f"{last['loss']:.4g}")
            cols[1].metric("Held-out NMSE", f"{nmse[-1]:.4f}" if nmse else "–",
                           help="‖x̂_1 − h_n‖² / ‖h_n‖² on held-out windows")
            cols[2].metric("Tokens / s", f"{last.get('tokens_per_s', 0):,.0f}")
            cols[3].metric("Learning rate", f"{last.get('lr', 0):.2e}")
            c.show_figure(figures.training_curves({job.label: job.events}), f"training_{job.label}",
                          key=f"curves-{job.id}")
        if job.status == "complete" and job.result:
            r = job.result
            st.success(f"Saved flow **{r['name']}**: final loss {r['final_loss']:.4g}, held-out NMSE "
                       f"{r['heldout_nmse']:.4f}, {r['seconds']:.0f} s on {r['device']}.")
        elif job.status == "stopped":
            st.info("Stopped; the flow was saved at the last step.")
        elif job.status == "failed":
            st.error(job.error_line() or "the job ended without a result; log:\n\n" + job.log_tail(5))


def jobs_panel() -> None:
    running_ids = [j.id for j in list_jobs("train") if j.status in ("running", "stopping")]

    @st.fragment(run_every=2 if running_ids else None)
    def panel() -> None:
        jobs = [j for j in list_jobs("train") if j.status in ("running", "stopping")]
        ids = {j.id for j in jobs}
        watched = st.session_state.get("train_job")
        if watched and watched not in ids:
            try:
                jobs.insert(0, read_job(watched))
            except LFTError:
                pass
        if not jobs:
            st.caption("No training is running.")
        for job in jobs:
            draw_job(job)
        before = set(st.session_state.get("_train_running", []))
        st.session_state["_train_running"] = sorted(ids)
        if before - ids:  # a job ended: redraw the whole page so the list of flows is current
            st.rerun(scope="app")

    panel()


st.subheader("Running")
jobs_panel()

def _delete_selected_flow() -> None:
    """The Delete button's callback: acts on exactly the flow the user saw selected, and only once confirmed."""
    victim = st.session_state.get("w_delete_flow")
    if not st.session_state.get("w_delete_sure"):
        st.session_state["flow_delete_problem"] = "Tick the box to confirm the deletion."
        return
    try:
        delete_flow(victim)
    except LFTError as e:
        st.session_state["flow_delete_problem"] = str(e)
        return
    st.session_state["flow_deleted"] = victim
    st.session_state["w_delete_sure"] = False
    st.session_state.pop("w_delete_flow", None)


st.subheader("Saved flows")
if deleted := st.session_state.pop("flow_deleted", None):
    st.success(f"Deleted flow **{deleted}**.")
flows = c.flows_for(teacher)
unreadable = [f for f in list_flows() if f.error]
if unreadable:
    with st.expander(f":orange[:material/warning:] {len(unreadable)} saved flow(s) cannot be read"):
        st.caption("Damaged or edited by hand; they are left on disk untouched. Delete them with "
                   "`python -m lft_core flows --delete NAME`.")
        st.dataframe(pd.DataFrame([{"name": f.name, "problem": f.error} for f in unreadable]), hide_index=True)
if flows:
    table = pd.DataFrame([{
        "name": f.name, "span": str(f.span), "blocks": f.span.blocks, "method": f.method, "k": f.k,
        "steps": f"{f.steps_done if f.steps_done is not None else '?'} / {f.steps if f.steps is not None else '?'}",
        "status": f.status, "held-out NMSE": f.last_nmse, "params (M)": round(f.params / 1e6, 2),
        "replaced params (M)": round(f.teacher_span_params / 1e6, 2),
    } for f in flows])
    st.session_state["flows_table"] = table
    c.show_table(table, "flows", key="flows_table_df")
    with st.expander("Delete a flow"):
        with st.form("delete_flow_form", border=False):
            st.selectbox("Flow", [f.name for f in flows], key="w_delete_flow")
            st.checkbox("Delete its weights and training history; this cannot be undone", key="w_delete_sure")
            st.form_submit_button("Delete flow", icon=":material/delete:", on_click=_delete_selected_flow)
        if problem := st.session_state.pop("flow_delete_problem", None):
            st.warning(problem)
else:
    st.info("No flow has been trained for this model yet: set the span and press **Start training**.")

with st.expander("All jobs"):
    jobs = list_jobs()
    if jobs:
        c.show_table(pd.DataFrame([{"id": j.id, "kind": j.kind, "label": j.label, "status": j.status,
                                    "created": j.created} for j in jobs]), "jobs", key="jobs_table")
    else:
        st.caption("No jobs yet.")
