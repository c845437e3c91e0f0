"""Progress: every wait longer than a moment goes through :func:`with_progress` (a progress bar with the time the
same work took here before, from lft_core.run.timings), never a bare spinner; the one progress line of a
background job (:func:`job_progress`); cache jobs and their panel.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import streamlit as st

from lft_core.errors import LFTError


def in_worker(fn: Callable, *args, poll: Callable[[], None], **kwargs):
    """``fn(*args, **kwargs)`` in a worker thread that carries this session's script context (so ``st.cache_*``
    work there; the worker draws nothing), calling ``poll()`` on this thread every quarter second until it is
    done, so ``poll`` can draw a progress bar. Returns its result, or raises its exception here."""
    from concurrent.futures import ThreadPoolExecutor

    from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

    ctx = get_script_run_ctx()
    with ThreadPoolExecutor(max_workers=1, initializer=lambda: add_script_run_ctx(ctx=ctx)) as pool:
        future = pool.submit(fn, *args, **kwargs)
        while True:
            try:
                return future.result(timeout=0.25)
            except TimeoutError:
                poll()


def with_progress(label: str, op: str, fn: Callable, *args, first_time: str = "", **kwargs):
    """``fn(*args, **kwargs)`` (in a worker, ``in_worker``) while a progress bar shows ``label``, the seconds elapsed
    and the time ``op`` took the last times on this machine (lft_core.run.timings); an answer within a moment (a
    cached result) shows nothing. The duration is recorded for next time; exceptions are raised here as usual."""
    import time

    from lft_core.run import timings

    start = time.perf_counter()
    shown: dict = {}  # the bar and the estimate, once the work has taken longer than a moment

    def poll() -> None:
        elapsed = time.perf_counter() - start
        if not shown:
            shown.update(estimate=timings.estimate(op), bar=st.progress(0.0, text=label))
        estimate, bar = shown["estimate"], shown["bar"]
        if estimate:
            text = (f"{label}: {elapsed:.0f} s of about {estimate:.0f} s (its time here before)" if elapsed < estimate
                    else f"{label}: {elapsed:.0f} s, longer than the {estimate:.0f} s it took here before")
            bar.progress(min(0.99, elapsed / estimate), text=text)
        else:
            text = f"{label}: {elapsed:.0f} s (first time on this machine{': ' + first_time if first_time else ''})"
            bar.progress(min(0.95, 1 - 1 / (1 + elapsed / 30)), text=text)

    result = in_worker(fn, *args, poll=poll, **kwargs)
    if shown:
        shown["bar"].empty()
        timings.record(op, time.perf_counter() - start)
    return result


# ---------------------------------------------------------------------------------------------------------
# Background jobs (cache jobs here; training jobs on the Train page)


def job_progress(job) -> tuple[float | None, str]:
    """(fraction done or None, one line) for a running job of any kind, from its progress events or log: the
    sidebar, the start page and the Train page all show this line."""
    last = job.last
    eta = f" · ETA {fmt_seconds(last.get('eta_s'))}"
    if job.kind == "train" and last.get("steps"):
        return min(1.0, last["step"] / last["steps"]), f"step {last['step']} / {last['steps']}{eta}"
    if job.kind == "sweep" and last.get("steps"):  # run i of N, each with its own steps (lft_core.run.sweep)
        i, n, flow = last["step"], last["steps"], last.get("label", "")
        s, total = last.get("flow_step") or 0, last.get("flow_steps") or 0
        fraction = (i - 1 + (s / total if total else 0)) / max(n, 1)
        if last.get("event") == "start" and last.get("action") == "skip":
            return fraction, f"run {i} of {n}: {flow} is complete already"
        if last.get("event") == "start":
            doing = "resuming" if last.get("action") == "resume" else "preparing data"
            return fraction, f"run {i} of {n}: {flow} ({doing})"
        return fraction, f"run {i} of {n}: {flow}, step {s} / {total}{eta}"
    if job.kind == "demo" and last.get("steps"):  # step i of 7 (lft_core.run.demo)
        line = f"step {last['step']} of {last['steps']}"
        if last.get("label"):
            line += f": {last['label']}"
        if last.get("flow_steps"):
            line += f" ({last.get('flow_step', 0)} / {last['flow_steps']})"
        if last.get("eta_s") is not None:
            line += eta
        return max(0.0, (last["step"] - 1) / last["steps"]), line
    if job.kind == "compare" and last.get("steps"):  # unit i of N of an evaluation (lft_core.analysis.compare_eval)
        line = f"{last['step']} of {last['steps']}: {last.get('label', '')}"
        if last.get("eta_s") is not None:
            line += eta
        return min(1.0, last["step"] / last["steps"]), line
    done = tqdm_progress(job.log_tail(5), "caching")
    if done:
        return done[0] / max(done[1], 1), f"{done[0]}/{done[1]} windows"
    return None, "starting (loading the model and the data)"


def watch_job(job_id: str, what: str, note: str = "") -> None:
    """A fragment that redraws ``job_id``'s progress bar (``what: <its progress line>``) every 2 s and reruns the
    page when the job has ended (the page then reads the job's saved result)."""
    from lft_core.run.jobs import read_job

    @st.fragment(run_every=2)
    def watch() -> None:
        job = read_job(job_id)
        if job.status not in ("running", "stopping"):
            st.rerun(scope="app")
        fraction, line = job_progress(job)
        st.progress(fraction or 0.0, text=f"{what}: {line}")
        if note:
            st.caption(note)

    watch()


def fmt_seconds(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``; ``?`` for an unknown time."""
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


_TQDM_RE = re.compile(r"(\d+)/(\d+)")


def tqdm_progress(log_tail: str, prefix: str) -> tuple[int, int] | None:
    """The last 'done/total' of a tqdm bar whose description starts with ``prefix`` in a job's log."""
    segments = [s for line in log_tail.splitlines() for s in line.split("\r") if s.strip().startswith(prefix)]
    if not segments:
        return None
    match = _TQDM_RE.search(segments[-1].split("|")[-1])
    return (int(match.group(1)), int(match.group(2))) if match else None


def start_cache_job(spec: str, corpus: str, seq_len: int, windows: int):
    from lft_core.run.jobs import start_job

    label = f"cache all layers · {spec} · {Path(corpus).name} · T={seq_len} · W={windows}"
    args = ["--model", spec, "--corpus", corpus, "--seq-len", str(seq_len), "--windows", str(windows),
            "--layers", "all"]
    job = start_job("cache", args, label)
    st.session_state["cache_job"] = job.id
    return job


def cache_jobs_panel() -> None:
    """Running cache jobs (any session, so a reload still shows them) and the one this session started."""
    from lft_core.run.jobs import list_jobs, read_job

    running = [j for j in list_jobs("cache") if j.status in ("running", "stopping")]
    mine = st.session_state.get("cache_job")
    if not running and not mine:
        return

    @st.fragment(run_every=2 if running else None)
    def panel() -> None:
        jobs = [j for j in list_jobs("cache") if j.status in ("running", "stopping")]
        ids = {j.id for j in jobs}
        if mine and mine not in ids:
            try:
                jobs.append(read_job(mine))
            except LFTError:
                pass
        for job in jobs:
            if job.status == "running":
                done = tqdm_progress(job.log_tail(5), "caching")
                if done:
                    st.progress(done[0] / max(done[1], 1), text=f"{job.label}: {done[0]}/{done[1]} windows")
                else:
                    st.progress(0.0, text=f"{job.label}: loading the model and corpus...")
            elif job.status == "complete":
                r = job.result or {}
                st.success(f"{job.label}: done ({'already cached' if r.get('hit') else 'computed'} "
                           f"{len(r.get('layers', []))} layers in {r.get('seconds', 0):.1f} s)")
            elif job.status == "failed":
                st.error(f"{job.label} failed: {job.error_line() or job.log_tail(3)}")
        if st.session_state.get("_cache_running") and not ids:
            st.session_state["_cache_running"] = False
            st.rerun(scope="app")  # a job just finished: redraw the page with the new cache
        st.session_state["_cache_running"] = bool(ids)

    panel()
