"""Cached engine objects for the pages: the teacher, the corpus, activation caches, saved flows, the fitted
baselines (``baselines.BASELINES``), and the opening every story page shares (``story_opening``).

Engine errors (``LFTError``) are shown with ``st.error`` by :func:`engine_errors`; pages never show a traceback.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import streamlit as st

from app import pages
from app.progress import watch_job, with_progress
from app.state import corpus_spec, current_span, model_spec, seq_len
from lft_core.analysis.baselines import FitData, Prepared, fit_key, prepare, slow_fit
from lft_core.errors import LFTError
from lft_core.model.loading import load_teacher
from lft_core.run.jobs import last_job, running_job, start_unique_job
from lft_core.span import Span
from lft_core.flow.store import SavedFlow
from lft_core.model.teacher import Teacher


@contextmanager
def engine_errors(stop: bool = True) -> Iterator[None]:
    """Show an engine error as one line (``st.error``) and, by default, stop the page there."""
    try:
        yield
    except LFTError as e:
        st.error(str(e))
        if stop:
            st.stop()


@st.cache_resource(show_spinner=False, max_entries=3)
def get_teacher(spec: str) -> Teacher:
    """One teacher per model spec per server process; never mutated by pages."""
    return load_teacher(spec)


def teacher_or_error() -> Teacher | None:
    """The chosen teacher (with a progress bar while it loads), or None after showing a clear error."""
    spec = model_spec()
    try:
        return with_progress(f"Loading the model {spec}", f"load {spec}", get_teacher, spec,
                             first_time="the first load on a machine converts and saves the model; later loads "
                                        "read the saved copy")
    except LFTError as e:
        st.error(str(e))
        return None


def require_teacher() -> Teacher:
    """The chosen teacher, or stop the page after an error that says what to do."""
    teacher = teacher_or_error()
    if teacher is None:
        st.page_link(pages.SETUP.file, label="Choose another model on the Setup page", icon=pages.SETUP.icon)
        st.stop()
    return teacher


@st.cache_resource(show_spinner="Reading the corpus...", max_entries=4)
def get_corpus(spec: str):
    from lft_core.data.corpus import load_corpus

    return load_corpus(spec)


def corpus_or_error():
    try:
        return get_corpus(corpus_spec())
    except LFTError as e:
        st.error(str(e))
        return None


def find_cache(teacher: Teacher, corpus, seq_len: int, windows: int, split: str = "train"):
    """The activation cache entry for these settings if it exists and is whole, else None (computes nothing)."""
    from lft_core.data.activations import cache_key, open_activations

    key = cache_key(teacher.model_id, teacher.weights_hash, corpus.id, corpus.content_hash, seq_len, windows, split)
    try:
        return open_activations(key)
    except LFTError:
        return None


def flows_for(teacher: Teacher) -> list[SavedFlow]:
    """The saved flows trained for this teacher (by name)."""
    from lft_core.flow.store import list_flows

    return [f for f in list_flows() if f.trained_for(teacher)]


@st.cache_resource(show_spinner="Loading the flow...", max_entries=16)
def load_flow(name: str, spec: str, stamp: float):
    """(LatentFlow, config) of a saved flow for the teacher of ``spec``; ``stamp`` (the weights' mtime) makes
    a new checkpoint a new cache entry."""
    from lft_core.flow.store import open_flow

    flow, config = open_flow(name, get_teacher(spec))
    flow.eval()
    return flow, config


def flow_key(saved: SavedFlow | None) -> tuple[str, float] | None:
    """What identifies a saved flow's current weights in a cached computation: (name, stamp)."""
    return (saved.name, saved.stamp) if saved is not None else None


FIT_WINDOWS = 64  # training windows a fitted baseline learns from when no flow says otherwise
FIT_HELDOUT = 8


def fit_data(flow_config: dict | None) -> FitData:
    """The text a fitted baseline (affine, ...) learns from: a flow's own training data (its config.json), so that
    the two are compared fairly, or the chosen corpus and window length without one."""
    if flow_config is not None:
        return FitData.of_flow(flow_config)
    return FitData(corpus_spec(), seq_len(), FIT_WINDOWS, FIT_HELDOUT)


@st.cache_resource(show_spinner=False, max_entries=16)
def load_baseline(name: str, spec: str, span: Span, data: FitData) -> Prepared:
    """The baseline ``name`` of ``span`` fitted on ``data`` (one per process; never mutated)."""
    return prepare(name, get_teacher(spec), span, data, progress=False)


def get_baseline(name: str, span: Span, flow_config: dict | None = None) -> Prepared | None:
    """The baseline ``name`` of ``span`` for the current model: its kept fit, or fitted here when that takes
    seconds (the hidden states it needs are cached), with a progress bar that says on what. None when the fit
    must first compute hidden states (tens of seconds or more): it then runs in a background job (any session's),
    whose progress is shown here."""
    data, spec, span = fit_data(flow_config), model_spec(), Span.of(span)
    if slow_fit(name, get_teacher(spec), span, data):
        fit_in_background(name, spec, span, data)
        return None
    return with_progress(f"Fitting the {name} baseline of span {span} on {data.windows} windows × {data.seq_len} "
                         "tokens", f"{name} {data.windows}x{data.seq_len}", load_baseline, name, spec, span, data)


def fit_in_background(name: str, spec: str, span: Span, data: FitData) -> None:
    """The background fit of baseline ``name`` (``baselines --fit-only``): started once for all sessions, its
    progress shown until it is kept; a failed one is shown with its error and a button to try again."""
    label = f"fit {fit_key(name, get_teacher(spec), span, data)}"
    job = running_job("baselines", label)
    if job is None:
        last = last_job("baselines", label)
        if last is not None and last.status == "failed" and not st.session_state.get(f"_retry_{label}"):
            st.error(f"Fitting the {name} baseline of span {span} failed: {last.error_line() or last.log_tail(3)}")
            if st.button(f"Try the {name} fit again", key=f"retry_{label}"):
                st.session_state[f"_retry_{label}"] = True
                st.rerun()
            return
        st.session_state.pop(f"_retry_{label}", None)
        try:
            job = start_unique_job("baselines", ["--model", spec, "--span", f"{span.m}:{span.n}", "--baselines", name,
                                                 "--fit-only", *data.cli_args()], label)
        except LFTError as e:
            st.error(str(e))
            return
    watch_job(job.id, f"Fitting the {name} baseline of span {span} in the background",
              f"It first caches the hidden states of the {data.windows} windows × {data.seq_len} tokens it is fitted "
              "on (about 45 s for 1,024 windows on 2 CPU cores); the page adds it when the fit is done, and every "
              "later use reads the kept fit. The rest of the page does not wait.")


# ---------------------------------------------------------------------------------------------------------
# The opening of the story pages (Latent trajectories, Coupling crossings, Per-token KL)

STORY_METHODS = ("fw", "sfm")  # the methods a story page preselects, the preferred one first


@dataclass(frozen=True)
class StoryOpening:
    """The teacher, the current span and the saved flows, as every story page opens with them."""

    teacher: Teacher
    span: Span
    flows: list[SavedFlow]  # every flow trained for this teacher
    by_name: dict[str, SavedFlow]  # the same, by name
    here: list[SavedFlow]  # the flows of the current span

    def best(self, method: str | None = None) -> SavedFlow | None:
        """The best-trained flow of the span (most steps): of ``method``, or without one an FW flow before any
        other; None when there is none."""
        pool = [f for f in self.here if method is None or f.method == method]
        return max(pool, key=lambda f: (f.method == STORY_METHODS[0], f.steps_done or 0), default=None)

    def best_of_each(self) -> list[SavedFlow]:
        """The best-trained FW flow and the best-trained SFM flow of the span, those that exist."""
        return [f for f in (self.best(method) for method in STORY_METHODS) if f is not None]

    def no_flow_here(self) -> str:
        """One line for a page that shows flows of the current span when it has none: what is shown and what to
        do (the spans that have flows, or how to get one)."""
        spans = sorted({f.span for f in self.flows})
        where = (f"spans with flows: {', '.join(str(s) for s in spans[:8])} (pick one on **Choose a span**)"
                 if spans else "prepare the demo on **Start here**")
        return (f"No flow is trained for span {self.span} yet, so no flow is shown: train one on **Train**, or "
                f"{where}.")


def story_opening() -> StoryOpening:
    """The chosen teacher (or stop the page), the current span checked against it, and its saved flows."""
    teacher = require_teacher()
    span = current_span(teacher)
    flows = flows_for(teacher)
    return StoryOpening(teacher, span, flows, {f.name: f for f in flows}, [f for f in flows if f.span == span])
