"""What every page shows around its content: presenter mode's CSS, the glossary, the path through the pages
(pages opened, the next page's link), the sidebar's status, each page's title and introduction, and the
figure and table helpers (every figure gets an HTML download, every table a CSV download).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app import pages
from app.figures.style import presenter_figure, to_html
from app.progress import job_progress
from app.state import SPAN, corpus_spec, demo_status, model_spec, n_windows, presenter, seq_len
from lft_core.data.corpus import BUILTINS


# ---------------------------------------------------------------------------------------------------------
# Presenter mode and the glossary


PRESENTER_CSS = """<style>
.stMainBlockContainer p, .stMainBlockContainer li, .stMainBlockContainer label p { font-size: 1.3rem !important; }
.stMainBlockContainer h1 { font-size: 3.2rem !important; }
.stMainBlockContainer h2, .stMainBlockContainer h3 { font-size: 2.2rem !important; }
.stMainBlockContainer [data-testid="stMetricValue"], .stMainBlockContainer [data-testid="stMetricValue"] * {
  font-size: 3rem !important; }
.stMainBlockContainer [data-testid="stMetricLabel"], .stMainBlockContainer [data-testid="stMetricLabel"] * {
  font-size: 1.3rem !important; }
.stMainBlockContainer [data-testid="stMetricDelta"], .stMainBlockContainer [data-testid="stMetricDelta"] * {
  font-size: 1.3rem !important; }
.stMainBlockContainer [data-testid="stCaptionContainer"], .stMainBlockContainer [data-testid="stCaptionContainer"] * {
  font-size: 1.1rem !important; }
.stMainBlockContainer .lft-token { font-size: 1.35rem !important; }
</style>"""
"""Presenter mode's text sizes: every one at least as large as the normal page's (a metric's value is 2.25rem
there; a broad rule for paragraphs once shrank it to 1.3rem), checked in the browser by measured font sizes."""

GLOSSARY = {
    "span [m, n)": "the blocks m … n−1 of the model that one learned layer replaces; h_m goes in, h_n should come out.",
    "k": "the number of integration (Euler) steps the learned flow takes from h_m to h_n.",
    "SFM": "standard flow matching: the velocity field is trained to point along the straight path from h_m to h_n.",
    "FW": "Flow Walking: the field is trained through k integration steps so that their end point lands on h_n.",
    "crossing": "two tokens whose straight paths would be cheaper with their targets swapped; near such a pair flow "
                "matching sees two velocities at one point and learns their average.",
    "recoupling ratio R": "the share of tokens that optimal transport pairs with another token's target; 0 means the "
                          "straight paths keep every token's own pairing. A property of the data, before any training.",
    "misrouted": "a token that a trained flow delivers nearer another token's h_n than its own.",
    "NMSE": "‖x̂ − h_n‖² / ‖h_n‖² on held-out tokens: how far the replacement lands from the true h_n (0 is perfect).",
    "KL": "KL(P_teacher ‖ P_model) in nats between next-token distributions: what the replacement costs the "
          "predictions (0: the same predictions).",
    "skip-k": "the cheapest baseline: simply remove k blocks (no training).",
    "affine baseline": "one linear map h_m ↦ h_n fitted in closed form (no training): a flow must beat it.",
}


def glossary() -> None:
    """The glossary as a compact list (the frame puts it in the sidebar of every page)."""
    st.markdown("\n".join(f"- **{term}**: {meaning}" for term, meaning in GLOSSARY.items()))


# ---------------------------------------------------------------------------------------------------------
# The path through the pages and the sidebar


def visited(page: pages.Page) -> None:
    """The frame, every run: remember the pages (by title) this session has opened (the start page shows them)."""
    st.session_state.setdefault("_visited", set()).add(page.title)


def path_done(demo=None) -> list[bool]:
    """For each step of ``pages.PATH``: done in this session or by the demo (``demo``: its status, read when not
    given). The demo does steps 1-3 (cache, span, flows); the later steps are done once their page was opened."""
    from app import state
    from lft_core.data.activations import list_entries
    from lft_core.flow.store import list_flows

    demo = demo if demo is not None else state.demo_status()
    demo_ready = demo is not None and demo.ready
    visited = st.session_state.get("_visited", set())
    cached = demo_ready or any(len((e["meta"] or {}).get("layers", [])) == ((e["meta"] or {}).get("n_layers", -2) + 1)
                               for e in list_entries())
    trained = demo_ready or any(f.status == "complete" for f in list_flows() if f.error is None)
    chosen = demo_ready or SPAN in st.session_state or pages.SPAN.title in visited
    return [cached, chosen, trained] + [page.title in visited for page in pages.PATH[3:]]


def next_page_link(page: pages.Page) -> None:
    """The frame, under every page: a link to the next page of the path; under the start page, to the first step
    not done yet (``path_done``)."""
    order = (pages.HOME,) + pages.PATH
    target = None
    if page == pages.HOME:
        target = next((p for p, done in zip(pages.PATH, path_done()) if not done), None)
    elif page in order and order.index(page) < len(pages.PATH):
        target = pages.PATH[order.index(page)]
    if target is not None:
        st.divider()
        st.page_link(target.file, label=f"Next: {target.step[0].lower() + target.step[1:]}",
                     icon=":material/arrow_forward:")


def choices_line(slot=None) -> None:
    """The sidebar's model, corpus, windows and span, in ``slot`` (default: the one this run's sidebar made)."""
    slot = slot or st.session_state.get("_sidebar_choices")
    if slot is None:
        return
    span = st.session_state.get(SPAN)
    builtin = BUILTINS.get(corpus_spec())
    corpus = builtin.label[0].lower() + builtin.label[1:] if builtin else Path(corpus_spec()).name
    slot.caption(f"**Model** `{model_spec()}`  \n**Corpus** {corpus}  \n"
                 f"**Windows** {n_windows()} × {seq_len()} tokens  \n**Span** {span if span else 'not chosen yet'}")


def sidebar_status() -> None:
    """The sidebar of every page: the choices, the demo's state and every running job, kept current."""
    from lft_core.run.jobs import list_jobs

    st.session_state["_sidebar_choices"] = slot = st.empty()  # redrawn when the page corrects the span
    choices_line(slot)
    running = [j for j in list_jobs() if j.status in ("running", "stopping")]

    @st.fragment(run_every=3 if running else None)
    def live() -> None:
        demo = demo_status()
        if demo is not None:
            icon = ":green[:material/check_circle:]" if demo.ready else ":material/hourglass_top:" if demo.running \
                else ":orange[:material/warning:]" if demo.damaged else ":material/radio_button_unchecked:"
            st.caption(f"{icon} Demo: {demo.line}")
        jobs = [j for j in list_jobs() if j.status in ("running", "stopping")]
        if not jobs:
            st.caption("No background job is running.")
        for job in jobs[:6]:
            fraction, line = job_progress(job)
            st.caption(f":material/hourglass_top: **{job.label}** ({job.kind}{', stopping' if job.status == 'stopping' else ''}): {line}")
        if len(jobs) > 6:
            st.caption(f"… and {len(jobs) - 6} more (all on the Train page)")
        if running and not jobs:
            st.rerun(scope="app")  # the last job ended: redraw the page with its results

    live()


# ---------------------------------------------------------------------------------------------------------
# Output helpers: every figure gets an HTML download, every table a CSV download


def show_figure(fig, name: str, key: str | None = None, **kwargs):
    """Draw a plotly figure (PNG export is in its modebar) with a 'Download HTML' button under it."""
    if presenter():
        fig = presenter_figure(fig)
    event = st.plotly_chart(fig, key=key, theme=None, config={"displaylogo": False,
                                                                "toImageButtonOptions": {"filename": name}}, **kwargs)
    st.download_button("Download HTML", data=lambda: to_html(fig), file_name=f"{name}.html",
                       mime="text/html", key=f"dl-html-{key or name}", on_click="ignore", icon=":material/download:")
    return event


def show_table(df: pd.DataFrame, name: str, key: str | None = None, **kwargs):
    """st.dataframe plus a 'Download CSV' button."""
    event = st.dataframe(df, key=key, hide_index=True, **kwargs)
    st.download_button("Download CSV", data=df.to_csv(index=False), file_name=f"{name}.csv", mime="text/csv",
                       key=f"dl-csv-{key or name}", on_click="ignore", icon=":material/download:")
    return event


def page_intro(page: pages.Page, science: str, how: str | None = None) -> None:
    """The page's heading (from the registry of pages), what it shows, and how to use it (small print)."""
    st.title(page.header)
    st.markdown(science)
    if how:
        st.caption(how)
