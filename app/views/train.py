"""Train: launch a flow-training job or a sweep in the background, watch them live, list, resume and delete the
saved flows. Every job shows the command line that reproduces it."""
from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from app import engine, frame, pages, progress, state
from app.figures.training import training_curves
from lft_core.errors import LFTError
from lft_core.run.jobs import list_jobs, read_job, start_job, stop_job
from lft_core.flow.store import being_trained, delete_flow, list_flows
from lft_core.flow.training import more_steps, training_estimate
from lft_core.zoo import copy_flow
from lft_core.run.sweep import parse_grid, plan_sweep, saved_train_config
from lft_core.run.sweep import cli_args as sweep_cli_args
from lft_core.flow.config import TrainConfig
from lft_core.flow.methods import METHODS

frame.page_intro(
    pages.TRAIN,
    "**Standard flow matching (SFM)** regresses the velocity u(x_t, t) on x1 − x0 along straight interpolants "
    "x_t = (1 − t) x0 + t x1. **Flow Walking (FW)** integrates k steps from x0 and trains the end point x̂_1 "
    "towards x1, so crossing token paths do not get averaged. *Hybrid* = FW + α·SFM.",
    "Training runs as a background process: you can leave this page or reload it and come back.",
)

teacher = engine.require_teacher()
span = state.current_span(teacher)
st.markdown(f"Span **{span}**: {span.blocks} blocks of {teacher.n_layers}, "
            f"{teacher.span_params(*span) / 1e6:.1f} M teacher parameters replaced by about one block's worth.")
st.page_link(pages.SPAN.file, label="Change the span", icon=pages.SPAN.icon)


def method_label(name: str) -> str:
    """A training method as the menus show it (the registry's label)."""
    return METHODS[name].label if name in METHODS else name


SWEEP_MAX_RUNS = 64  # a sweep queued from here (the CLI takes more)
ACTIVE = ("running", "stopping")

D = TrainConfig()  # the default recipe: every input starts at the engine's default

# Every input keeps its value across pages (persist_state): defaults go through session state, never value=.
for key, value in {
    "w_k": D.k, "w_steps": D.steps, "w_distill_steps": D.distill_steps, "w_batch": D.batch, "w_lr": D.lr,
    "w_init": D.init_from_teacher, "w_name": "", "w_train_windows": D.windows, "w_heldout_windows": D.heldout_windows,
    "w_eval_every": D.eval_every, "w_alpha": D.alpha, "w_seed": D.seed, "w_waypoints": D.waypoints,
    "w_distill_lr": D.distill_lr, "w_distill_batch": D.distill_batch,
    "w_sweep_ks": str(D.k), "w_sweep_seeds": "0, 1, 2", "w_sweep_steps": D.steps,
    "w_sweep_distill_steps": D.distill_steps, "w_sweep_prefix": "", "w_sweep_batch": D.batch,
    "w_sweep_windows": D.windows, "w_sweep_heldout_windows": D.heldout_windows,
}.items():
    st.session_state.setdefault(key, value)
state.valid_choice("w_method", list(METHODS), D.method)
state.valid_choice("w_sweep_methods", list(METHODS), ["fw", "sfm"], multi=True)
# the sweep's spans start at the current span, and follow it while the user has not typed other spans
if st.session_state.get("w_sweep_spans") in (None, st.session_state.get("_sweep_spans_default")):
    st.session_state["w_sweep_spans"] = str(span)
st.session_state["_sweep_spans_default"] = str(span)
KEEP = state.KEEP


def running_jobs() -> list:
    return [j for j in list_jobs() if j.kind in ("train", "sweep") and j.status in ACTIVE]


def training_now(name: str) -> bool:
    """True when some process trains the flow ``name`` or a train job for it has been started."""
    return being_trained(name) or any(j.kind == "train" and j.label == name for j in running_jobs())


# -- one flow -----------------------------------------------------------------------------------------------
if toast := st.session_state.pop("_train_toast", None):  # a job started in the previous run
    st.toast(toast)


def step_costs(span) -> str:
    """What one flow step and one distillation step of the form's settings cost here (from earlier runs)."""
    ss = st.session_state
    cfg = TrainConfig(model=state.model_spec(), span=span, method=ss.get("w_method", D.method), k=int(ss.get("w_k", D.k)),
                      batch=int(ss.get("w_batch", D.batch)), seq_len=state.seq_len(),
                      distill_batch=int(ss.get("w_distill_batch", D.distill_batch)))
    est = training_estimate(cfg)
    if est.flow_step_s is None and est.distill_step_s is None:
        return "Start shows the total number of steps; no step of these settings was timed on this machine yet."
    each = [f"{what} step ≈ {secs:.2f} s" for what, secs in (("a flow", est.flow_step_s),
                                                               ("a distillation", est.distill_step_s)) if secs]
    return "On this machine " + " and ".join(each) + " (measured by earlier runs)."


if state.presenter():
    st.caption("Presenter mode: the training forms are hidden (switch it off in the sidebar to train).")
else:

    with st.form("train_form"):
        col1, col2, col3, col4 = st.columns(4)
        method = col1.selectbox("Method", list(METHODS), format_func=method_label, key="w_method", persist_state=KEEP)
        k = col2.number_input("k (integration steps)", min_value=1, max_value=16, key="w_k", persist_state=KEEP)
        steps = col3.number_input("Flow steps", min_value=1, max_value=100_000, step=50, key="w_steps", persist_state=KEEP,
                                  help="Flow-matching steps on (h_m, h_n) pairs.")
        distill = col4.number_input("Distillation steps", min_value=0, max_value=100_000, step=50,
                                    key="w_distill_steps", persist_state=KEEP,
                                    help="Then fine-tune on KL(teacher ‖ spliced model) through the rest of the model: "
                                         "the lever that lowers KL most (docs/RESULTS.md). 0: off.")
        st.caption(f"The defaults are the project's default recipe: {D.steps} steps of {method_label(D.method)}, then "
                   f"{D.distill_steps} distillation steps; about 10 minutes for a 6-block span on 2 CPU cores. "
                   f"{step_costs(span)}")
        col5, col6, col7, col8 = st.columns(4)
        batch = col5.number_input("Batch (windows)", min_value=1, max_value=256, key="w_batch", persist_state=KEEP)
        lr = col6.number_input("Learning rate", min_value=1e-6, max_value=1.0, step=1e-4, format="%.4f", key="w_lr",
                               persist_state=KEEP)
        init = col7.checkbox("Initialise from teacher block m", key="w_init", persist_state=KEEP,
                             help="Copy block m's attention and MLP weights into the velocity field.")
        name = col8.text_input("Flow name (optional)", key="w_name", persist_state=KEEP,
                               placeholder="derived from the settings", help="Letters, digits, '-', '_' and '.'.")
        with st.expander("More settings"):
            a1, a2, a3, a4, a5 = st.columns(5)
            windows = a1.number_input("Training windows", min_value=1, max_value=65_536, key="w_train_windows",
                                      persist_state=KEEP)
            heldout = a2.number_input("Held-out windows", min_value=1, max_value=256, key="w_heldout_windows",
                                      persist_state=KEEP)
            eval_every = a3.number_input("Evaluate every (steps)", min_value=1, max_value=10_000, key="w_eval_every",
                                         persist_state=KEEP)
            alpha = a4.number_input("α (hybrid)", min_value=0.0, max_value=10.0, key="w_alpha", persist_state=KEEP)
            seed = a5.number_input("Seed", min_value=0, max_value=2**31 - 1, key="w_seed", persist_state=KEEP)
            b1, b2, b3, _ = st.columns([1, 1, 1, 2])
            waypoints = b1.number_input("Waypoint weight", min_value=0.0, max_value=100.0, step=0.1, key="w_waypoints",
                                        persist_state=KEEP,
                                        help="Also match the teacher's own path through h_m+1 … h_n-1 (0: off).")
            distill_lr = b2.number_input("Distillation lr", min_value=1e-7, max_value=1.0, step=1e-5, format="%.5f",
                                         key="w_distill_lr", persist_state=KEEP)
            distill_batch = b3.number_input("Distillation batch", min_value=1, max_value=256, key="w_distill_batch",
                                            persist_state=KEEP)
            st.caption(f"Windows of {state.seq_len()} tokens from the corpus chosen on the Setup page.")
        submitted = st.form_submit_button("Start training", type="primary")

    if submitted:
        cfg = TrainConfig(model=state.model_spec(), corpus=state.corpus_spec(), span=span, method=method, k=int(k),
                          alpha=float(alpha), steps=int(steps), batch=int(batch), seq_len=state.seq_len(),
                          windows=int(windows), heldout_windows=int(heldout), lr=float(lr), seed=int(seed),
                          init_from_teacher=bool(init), eval_every=int(eval_every), waypoints=float(waypoints),
                          distill_steps=int(distill), distill_lr=float(distill_lr), distill_batch=int(distill_batch),
                          name=name.strip() or None)
        try:
            cfg.validate(teacher.n_layers)
            flow_name = cfg.name or cfg.default_name()
            cfg.name = flow_name
            if any(f.name == flow_name for f in list_flows()) or training_now(flow_name):
                raise LFTError(f"a flow named {flow_name!r} exists or is being trained; give another name")
            job = start_job("train", cfg.cli_args(), label=flow_name)
            st.session_state["train_job"] = job.id
            st.session_state["train_started_line"] = f"Training **{flow_name}**: {training_estimate(cfg).line()}."
            st.session_state["_train_toast"] = f"Training {flow_name} started"
        except LFTError as e:
            st.error(str(e))
        else:
            st.rerun()  # the sidebar (drawn before this page) shows the new job at once

    # -- a sweep ------------------------------------------------------------------------------------------------

    with st.expander("Queue a sweep: spans × methods × k × seeds, for error bars", icon=":material/grid_view:"):
        st.caption("One flow per combination, trained one after another by one background job (the model is loaded "
                   "once). Flows are named `PREFIX-M-N-METHOD-kK-sSEED`; queueing the same sweep again skips the "
                   "complete flows and resumes stopped ones. Other settings are the defaults of a single flow.")
        with st.form("sweep_form", border=False):
            s1, s2, s3, s4 = st.columns([2, 2, 1, 1])
            sweep_spans = s1.text_input("Spans", key="w_sweep_spans", persist_state=KEEP,
                                        help="Comma list of M:N, e.g. 6:12, 12:18.")
            sweep_methods = s2.multiselect("Methods", list(METHODS), format_func=method_label, key="w_sweep_methods",
                                           persist_state=KEEP)
            sweep_ks = s3.text_input("k", key="w_sweep_ks", persist_state=KEEP, help="Comma list, e.g. 1, 3.")
            sweep_seeds = s4.text_input("Seeds", key="w_sweep_seeds", persist_state=KEEP,
                                        help="Comma list: each seed is one more sample for the error bar.")
            t1, t2, t3, t4, t5, t6 = st.columns(6)
            sweep_steps = t1.number_input("Flow steps", min_value=1, max_value=100_000, step=50, key="w_sweep_steps",
                                          persist_state=KEEP)
            sweep_distill = t2.number_input("Distillation steps", min_value=0, max_value=100_000, step=50,
                                            key="w_sweep_distill_steps", persist_state=KEEP)
            sweep_batch = t3.number_input("Batch (windows)", min_value=1, max_value=256, key="w_sweep_batch",
                                          persist_state=KEEP)
            sweep_windows = t4.number_input("Training windows", min_value=1, max_value=65_536, key="w_sweep_windows",
                                            persist_state=KEEP)
            sweep_heldout = t5.number_input("Held-out windows", min_value=1, max_value=256,
                                            key="w_sweep_heldout_windows", persist_state=KEEP)
            sweep_prefix = t6.text_input("Sweep name (optional)", key="w_sweep_prefix", persist_state=KEEP,
                                         placeholder="from model and steps", help="The flows' name prefix.")
            sweep_submitted = st.form_submit_button("Queue sweep", icon=":material/playlist_add:")

    if sweep_submitted:
        try:
            grid = parse_grid(sweep_spans, sweep_methods, sweep_ks, sweep_seeds)
            runs = math.prod(len(axis) for axis in grid)
            if runs > SWEEP_MAX_RUNS:
                raise LFTError(f"{runs} runs ({' × '.join(str(len(a)) for a in grid)}) are too many for one sweep from "
                               f"here (at most {SWEEP_MAX_RUNS}); use fewer spans, methods, k or seeds, or the CLI")
            base = TrainConfig(model=state.model_spec(), corpus=state.corpus_spec(), seq_len=state.seq_len(),
                               steps=int(sweep_steps),
                               distill_steps=int(sweep_distill), batch=int(sweep_batch), windows=int(sweep_windows),
                               heldout_windows=int(sweep_heldout), distill_batch=min(D.distill_batch, int(sweep_windows)))
            plan = plan_sweep(base, *grid, prefix=sweep_prefix, teacher=teacher)  # the whole grid, before it starts
            if any(j.kind == "sweep" and j.label == f"sweep {plan.prefix}" for j in running_jobs()):
                raise LFTError(f"the sweep {plan.prefix} is running already; stop it first or give another name")
            if not any(plan.count(action) for action in ("train", "resume", "wait")):
                st.info(f"Every flow of the sweep {plan.prefix} is complete already: nothing to train.")
            else:
                job = start_job("sweep", sweep_cli_args(plan, base), label=f"sweep {plan.prefix}")
                st.session_state["sweep_job"] = job.id
                st.session_state["_train_toast"] = plan.summary()
                st.rerun()  # the sidebar (drawn before this page) shows the new job at once
        except LFTError as e:
            st.error(str(e))


# -- jobs ---------------------------------------------------------------------------------------------------


def _nmse_text(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def draw_sweep(job) -> None:
    last = job.last
    steps = [e for e in job.events if e.get("event") == "step"]
    if job.status in ACTIVE:
        if not job.events:
            done = progress.tqdm_progress(job.log_tail(5), "caching")
            st.progress(done[0] / max(done[1], 1) if done else 0.0,
                        text="Preparing data: loading the model, caching h_m and h_n of every span"
                             + (f" ({done[0]}/{done[1]} windows)" if done else " ..."))
        else:
            fraction, line = progress.job_progress(job)
            st.progress(min(1.0, fraction), text=line)
    current = [e for e in steps if e["label"] == last.get("label")]
    if current and job.status in ACTIVE:
        nmse = [e["heldout_nmse"] for e in current if e.get("heldout_nmse") is not None]
        cols = st.columns(3)
        cols[0].metric("Loss (this run)", f"{current[-1]['loss']:.4g}")
        cols[1].metric("Held-out NMSE (this run)", _nmse_text(nmse[-1] if nmse else None))
        cols[2].metric("Runs done", f"{sum(e.get('event') == 'done' for e in job.events)} / {last['steps']}")
    if steps:
        histories: dict[str, list[dict]] = {}
        for e in steps:
            histories.setdefault(e["label"], []).append({**e, "step": e["flow_step"]})
        frame.show_figure(training_curves(histories), f"sweep_{job.id}", key=f"curves-{job.id}")
    result = job.result if isinstance(job.result, dict) else None
    if result and isinstance(result.get("runs"), list):
        runs = pd.DataFrame([{
            "flow": r.get("name"), "span": "{}:{}".format(*r["span"]) if isinstance(r.get("span"), list) else "?",
            "method": r.get("method"), "k": r.get("k"), "seed": r.get("seed"), "status": r.get("status"),
            "final loss": r.get("final_loss"), "held-out NMSE": _nmse_text(r.get("heldout_nmse")),
            "seconds": r.get("seconds"),
        } for r in result["runs"] if isinstance(r, dict)])
        summary = pd.DataFrame([{
            "span": s["span"], "method": s["method"], "k": s["k"], "seeds": s["seeds"],
            "held-out NMSE": _nmse_text(s["nmse_mean"]) + (f" ± {s['nmse_std']:.4f}" if s.get("nmse_std") is not None
                                                            else ""),
        } for s in result.get("summary") or [] if isinstance(s, dict)])
        st.session_state.setdefault("sweep_results", {})[job.id] = {"runs": runs, "summary": summary}
        if not summary.empty:
            st.markdown("**Held-out NMSE, mean ± standard deviation over seeds**")
            frame.show_table(summary, f"sweep_summary_{job.id}", key=f"sweep-summary-{job.id}")
        with st.expander(f"The {len(runs)} runs"):
            frame.show_table(runs, f"sweep_runs_{job.id}", key=f"sweep-runs-{job.id}")


def draw_train(job) -> None:
    last = job.last
    if job.status in ACTIVE:
        if not job.events:
            done = progress.tqdm_progress(job.log_tail(5), "caching")
            text = "Preparing data: caching h_m and h_n of the training and held-out windows"
            st.progress(done[0] / max(done[1], 1) if done else 0.0,
                        text=text + (f" ({done[0]}/{done[1]} windows)" if done else " ..."))
        else:
            fraction, line = progress.job_progress(job)
            st.progress(fraction, text=line)
    if job.events:
        nmse = [e["heldout_nmse"] for e in job.events if e.get("heldout_nmse") is not None]
        cols = st.columns(4)
        cols[0].metric("Loss", f"{last['loss']:.4g}")
        cols[1].metric("Held-out NMSE", f"{nmse[-1]:.4f}" if nmse else "–",
                       help="‖x̂_1 − h_n‖² / ‖h_n‖² on held-out windows")
        cols[2].metric("Tokens / s", f"{last.get('tokens_per_s', 0):,.0f}")
        cols[3].metric("Learning rate", f"{last.get('lr', 0):.2e}")
        frame.show_figure(training_curves({job.label: job.events}), f"training_{job.label}",
                          key=f"curves-{job.id}")
    if job.status == "complete" and job.result:
        r = job.result
        st.success(f"Saved flow **{r['name']}**: final loss {r['final_loss']:.4g}, held-out NMSE "
                   f"{r['heldout_nmse']:.4f}, {r['seconds']:.0f} s on {r['device']}.")


def draw_job(job) -> None:
    with st.container(border=True):
        icon = {"running": ":material/hourglass_top:", "stopping": ":material/stop_circle:",
                "complete": ":green[:material/check_circle:]", "stopped": ":material/stop_circle:",
                "failed": ":red[:material/error:]", "damaged": ":red[:material/error:]"}[job.status]
        head, button = st.columns([5, 1], vertical_alignment="center")
        head.markdown(f"{icon} **{job.label}** · {job.kind} · {job.status} · started "
                      f"{job.created.replace('T', ' ')[:19]} UTC")
        if job.status == "running" and button.button("Stop", key=f"stop-{job.id}", icon=":material/stop:"):
            stop_job(job.id)
            st.toast("Stopping after the current step; the flow is saved." if job.kind == "train" else
                     "Stopping the sweep after the current step; that flow is saved, and queueing the same sweep "
                     "again continues it.")
        (draw_sweep if job.kind == "sweep" else draw_train)(job)
        if job.status == "stopped":
            st.info("Stopped; the flow was saved at the last step." if job.kind == "train" else
                    "Stopped; the flow it was training was saved. Queue the same sweep again to continue it.")
        elif job.status == "failed":
            st.error(job.error_line() or "the job ended without a result; log:\n\n" + job.log_tail(5))
        st.caption("The same, from a terminal:")
        st.code(job.command, language="bash")


def jobs_panel() -> None:
    @st.fragment(run_every=2 if running_jobs() else None)
    def panel() -> None:
        jobs = running_jobs()
        ids = {j.id for j in jobs}
        for key in ("train_job", "sweep_job"):  # the jobs this session started, also once they have ended
            watched = st.session_state.get(key)
            if watched and watched not in ids:
                try:
                    jobs.insert(0, read_job(watched))
                    ids.add(watched)
                except LFTError:
                    pass
        if not jobs:
            st.caption("No training is running.")
        if line := st.session_state.get("train_started_line"):
            st.caption(line)
        for job in jobs:
            draw_job(job)
        running = {j.id for j in jobs if j.status in ACTIVE}
        runs = {j.id: j.last.get("step") for j in jobs if j.kind == "sweep" and j.status in ACTIVE}
        before = set(st.session_state.get("_train_running", []))
        runs_before = st.session_state.get("_sweep_runs", {})
        st.session_state["_train_running"] = sorted(running)
        st.session_state["_sweep_runs"] = runs
        # a job ended, or a sweep moved to its next flow: redraw the whole page so the list of flows is current
        if before - running or any(runs_before.get(i) not in (None, r) for i, r in runs.items()):
            st.rerun(scope="app")

    panel()


st.subheader("Running")
jobs_panel()

# -- saved flows --------------------------------------------------------------------------------------------


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


def resume_flow(saved, more: int = 0) -> None:
    """Start a train job that continues ``saved`` with its own settings (config.json) and ``more`` steps
    (``training.more_steps``), unless one trains it."""
    if training_now(saved.name):
        raise LFTError(f"flow {saved.name!r} is being trained by a job already")
    cfg = saved_train_config(more_steps(saved.config, more), model=state.model_spec())
    cfg.name = saved.name
    cfg.validate(teacher.n_layers)
    job = start_job("train", [*cfg.cli_args(), "--resume"], label=saved.name)
    st.session_state["train_job"] = job.id
    st.toast(f"Resuming {saved.name} from step {saved.steps_done}")


st.subheader("Saved flows")
if deleted := st.session_state.pop("flow_deleted", None):
    st.success(f"Deleted flow **{deleted}**.")
flows = engine.flows_for(teacher)
unreadable = [f for f in list_flows() if f.error]
if unreadable:
    with st.expander(f":orange[:material/warning:] {len(unreadable)} saved flow(s) cannot be read"):
        st.caption("Damaged or edited by hand; they are left on disk untouched. Delete them with "
                   "`python -m lft_core flows --delete NAME`.")
        st.dataframe(pd.DataFrame([{"name": f.name, "problem": f.error} for f in unreadable]), hide_index=True)
if flows:
    table = pd.DataFrame([{
        "name": f.name, "span": str(f.span), "blocks": f.span.blocks, "method": f.method, "k": f.k,
        "seed": f.config.get("seed"),
        "steps": f"{f.steps_done if f.steps_done is not None else '?'} / {f.steps if f.steps is not None else '?'}",
        "status": f.status, "held-out NMSE": _nmse_text(f.last_nmse), "sweep": f.config.get("sweep") or "",
        "params (M)": round(f.params / 1e6, 2), "replaced params (M)": round(f.teacher_span_params / 1e6, 2),
        "origin": f.origin_line,
    } for f in flows])
    st.session_state["flows_table"] = table
    frame.show_table(table, "flows", key="flows_table_df")
    resumable = [f for f in flows if f.status in ("stopped", "interrupted")]
    with st.expander(f"Resume a flow ({len(resumable)} stopped or interrupted)", icon=":material/play_arrow:"):
        if not resumable:
            st.caption("Flows that were stopped, or whose trainer was killed, can be continued here from their last "
                       "checkpoint with their own settings.")
        else:
            by_name = {f.name: f for f in resumable}
            state.valid_choice("w_resume_flow", list(by_name), resumable[0].name)
            chosen = st.selectbox("Flow", list(by_name), key="w_resume_flow", persist_state=KEEP,
                                  format_func=lambda n: f"{n} ({by_name[n].status} at step {by_name[n].steps_done} "
                                                        f"of {by_name[n].steps})")
            more = st.number_input("Steps to add", 0, 100_000, 0, step=50, key="w_resume_more", persist_state=KEEP,
                                   help="0: finish the flow's own steps. More: flow steps while it has not begun "
                                        "distilling, else distillation steps.")
            if st.button("Resume training", key="resume_button", icon=":material/play_arrow:"):
                try:
                    resume_flow(by_name[chosen], int(more))
                except LFTError as e:
                    st.error(str(e))
    with st.expander("Copy a flow to train it further", icon=":material/content_copy:"):
        st.caption("A copy under a new name keeps the original (a shipped flow too) as it is; the copy appears above "
                   "as stopped, to resume with more steps.")
        names = [f.name for f in flows if f.status == "complete"]
        if names:
            state.valid_choice("w_copy_flow", names, names[0])
            with st.form("copy_flow_form", border=False):
                source = st.selectbox("Flow", names, key="w_copy_flow", persist_state=KEEP)
                new_name = st.text_input("New name", key="w_copy_name", placeholder="my-flow-longer")
                if st.form_submit_button("Copy", icon=":material/content_copy:"):
                    try:
                        copy_flow(source, new_name.strip())
                        st.success(f"Copied **{source}** to **{new_name.strip()}**: resume it above with more steps.")
                    except LFTError as e:
                        st.error(str(e))
        else:
            st.caption("No complete flow to copy yet.")
    with st.expander("Delete a flow"):
        names = [f.name for f in flows]
        state.valid_choice("w_delete_flow", names, names[0])
        st.session_state.setdefault("w_delete_sure", False)
        with st.form("delete_flow_form", border=False):
            st.selectbox("Flow", names, key="w_delete_flow", persist_state=KEEP)
            st.checkbox("Delete its weights and training history; this cannot be undone", key="w_delete_sure",
                        persist_state=KEEP)
            st.form_submit_button("Delete flow", icon=":material/delete:", on_click=_delete_selected_flow)
        if problem := st.session_state.pop("flow_delete_problem", None):
            st.warning(problem)
else:
    st.info("No flow has been trained for this model yet: set the span and press **Start training**.")

with st.expander("All jobs"):
    jobs = list_jobs()
    if jobs:
        frame.show_table(pd.DataFrame([{"id": j.id, "kind": j.kind, "label": j.label, "status": j.status,
                                        "created": j.created, "command": j.command if j.args else ""} for j in jobs]),
                         "jobs", key="jobs_table")
    else:
        st.caption("No jobs yet.")

