"""Start here: what an LFT is, the demo in one click, and the path through the pages with where you are on it.

Nothing here loads the model: the page reads the demo's manifest, the job files and the listings only, so it
opens at once on a fresh server.
"""
from __future__ import annotations

import os
import shlex

import streamlit as st

from app import frame, pages, progress, state
from lft_core.errors import LFTError
from lft_core.flow.store import list_flows
from lft_core.run.jobs import list_jobs, start_job

st.title("LFT Explorer")
st.markdown(
    "A **Latent Flow Transformer** replaces a run of blocks [m, n) of a pretrained language model with **one** "
    "learned layer: a velocity field that carries each token's hidden state h_m to h_n in a few integration steps. "
    "Trained by plain flow matching it can mix tokens up where their straight paths cross, so the paper trains it "
    "with **Flow Walking** and chooses spans by their **recoupling ratio**. This app lets you watch all of it on a "
    "real model: the paths, the crossings, and what the replacement costs each next-token prediction."
)

# -- the demo -----------------------------------------------------------------------------------------------
st.subheader("The demo, in one click")
demo = state.demo_status()
demo_jobs = [j for j in list_jobs("demo") if j.status in ("running", "stopping")]
st.caption("Builds everything the pages need for a ready-made story on the embedded model and the built-in text "
           "mixture: the hidden-state cache, the recoupling and affine maps of every span, and four flows (SFM and "
           "FW on the span where optimal transport re-pairs the fewest tokens and on the one where it re-pairs the "
           "most). Flows shipped with the project (trained once, at length, with their provenance) are installed in "
           "seconds; a flow none is shipped for is trained here with the default recipe (about ten minutes each on "
           "two cores). It runs in the background: leave this page, or close the tab. Same as "
           "`python -m lft_core demo`.")
if demo is not None and demo.damaged and not demo.running and not demo_jobs:
    st.warning(f"Demo damaged: prepare again. Its record cannot be used ({demo.damaged}); **Prepare the demo** "
               "writes a new one and keeps whatever is already built (nothing done is computed again).",
               icon=":material/build:")
if demo is not None and demo.ready:
    low, high = demo.spans[0], demo.spans[-1]
    st.success(f"Demo ready: spans **{low}** (low R) and **{high}** (high R), flows "
               + ", ".join(f"`{f}`" for f in demo.flows) + ". Every page opens on this story.",
               icon=":material/check_circle:")
    origins = {f.name: f.origin_line for f in list_flows() if f.error is None and f.name in demo.flows}
    st.caption("  \n".join(f"`{name}`: {origins[name]}" for name in demo.flows if name in origins))
else:
    if st.button("Prepare the demo", type="primary", icon=":material/play_arrow:", disabled=bool(demo_jobs),
                 help="Idempotent: what is done already is kept; after an interruption it goes on where it stopped."):
        if not [j for j in list_jobs("demo") if j.status in ("running", "stopping")]:  # another tab may have started it
            try:
                # LFT_DEMO_ARGS: smaller budgets for tests and small machines (e.g. "--steps 50 --distill-steps 0")
                job = start_job("demo", shlex.split(os.environ.get("LFT_DEMO_ARGS", "")), label="Prepare the demo")
                st.session_state["demo_job"] = job.id
            except LFTError as e:
                st.error(str(e))
        st.rerun()


@st.fragment(run_every=2 if demo_jobs else None)
def demo_panel() -> None:
    jobs = [j for j in list_jobs("demo") if j.status in ("running", "stopping")]
    status = state.demo_status()
    if status is None:
        return
    if jobs:
        fraction, line = progress.job_progress(jobs[0])
        st.progress(fraction or 0.0, text=f"Preparing the demo: {line}")
    if jobs or (0 < status.done < status.total):
        icons = {"done": ":green[:material/check_circle:]", "running": ":material/hourglass_top:",
                 "pending": ":material/radio_button_unchecked:", "failed": ":red[:material/error:]"}
        st.markdown("  \n".join(f"{icons.get(s, '')} {i}. {label}" for i, (label, s) in enumerate(status.steps, 1)))
    failed = [j for j in list_jobs("demo")[:1] if j.status == "failed"]
    if failed and not jobs:
        st.error(f"The last preparation failed: {failed[0].error_line() or failed[0].log_tail(3)}. Press the "
                 "button again to go on from where it stopped.")
    if demo_jobs and not jobs:
        st.rerun(scope="app")


demo_panel()

# -- the path -------------------------------------------------------------------------------------------------
st.subheader("The path through the pages")
demo_ready = demo is not None and demo.ready  # the demo does steps 1-3: cache, span, flows
done = frame.path_done(demo)
following = next((i for i, d in enumerate(done) if not d), None)
for i, (page, is_done) in enumerate(zip(pages.PATH, done)):
    mark = ":green[:material/check_circle:] done" if is_done else (
        ":blue[:material/arrow_forward:] **next**" if i == following else ":material/radio_button_unchecked:")
    col_link, col_state = st.columns([3, 2], vertical_alignment="center")
    col_link.page_link(page.file, label=f"{i + 1}. {page.step}")
    col_state.markdown(mark)
st.caption(("Steps 1–3 were done for you by the demo. " if demo_ready else
            "**Prepare the demo** above does steps 1–3 for you. ")
           + "Words you do not know are in the **Glossary** of the sidebar; **Presenter mode** there enlarges "
             "everything for a projector.")
