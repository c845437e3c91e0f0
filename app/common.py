"""Shared state, cached engine objects and UI helpers for the pages.

Session-state keys, all of them, by kind:

* shared choices (set on the Setup page or by the span picker, read everywhere; constants below):
  ``model_spec`` (the teacher, default the embedded smollm2-135m), ``corpus_spec`` ("english" by default,
  "builtin" for the Python docs, an uploaded file under cache/uploads, or a path), ``seq_len`` and ``n_windows``
  (the activation cache used for analysis),
  ``span`` (a ``Span``, mirrored in the URL as ``?span=m:n`` so a link reproduces the view);
* widget keys ``w_<page>_<input>``: each page's own inputs (Streamlit forgets a widget's value when the page
  is left; ``persistent_widget`` restores the shared ones);
* background jobs this session started: ``cache_job``, ``train_job`` (job ids), and the frame's bookkeeping of
  running jobs ``_cache_running``, ``_train_running``; the span link's ``_span_qp``, ``_span_error`` and the
  heatmaps' last clicks ``_last_click_r``, ``_last_click_affine``;
* "show this result" gates, holding the inputs of the last request: ``skip_shown``, ``cmp_params``,
  ``toy_params``; ``flow_deleted`` / ``flow_delete_problem`` carry a deletion's outcome from the Delete button's
  callback to the page;
* results each page publishes for its tests (AppTest reads them; pages never read another page's):
  ``recoupling_matrix``, ``affine_matrix``, ``skip_table``, ``flows_table``, ``trajectory_table``, ``crossings_result``,
  ``kl_result``, ``compare_table``, ``compare_eval``, ``toy_runs``.

Engine errors (``LFTError``) are shown with ``st.error`` by :func:`engine_errors`; pages never show a traceback.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pandas as pd
import streamlit as st

from app import figures
from lft_core.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.errors import LFTError
from lft_core.loading import DEFAULT_MODEL, load_teacher
from lft_core.span import Span
from lft_core.store import SavedFlow, trained_on
from lft_core.teacher import Teacher

MODEL, CORPUS, SEQ_LEN, WINDOWS, SPAN = "model_spec", "corpus_spec", "seq_len", "n_windows", "span"
DEFAULTS = {MODEL: DEFAULT_MODEL, CORPUS: DEFAULT_CORPUS, SEQ_LEN: 128, WINDOWS: 16}
DEFAULT_TEXT = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
DEFAULT_PARAGRAPH = (
    "The river flows quietly through the old town, past the market and the stone bridge. In the morning, "
    "fishermen cast their nets while children walk to school. By noon the square is full of people buying "
    "bread, fruit and flowers, and the church bell rings twelve times."
)


# ---------------------------------------------------------------------------------------------------------
# Shared state


def init_state() -> None:
    """Give every shared key its default (called by the frame on every run)."""
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)


def model_spec() -> str:
    return st.session_state.get(MODEL, DEFAULT_MODEL)


def corpus_spec() -> str:
    return st.session_state.get(CORPUS, DEFAULT_CORPUS)


def seq_len() -> int:
    return int(st.session_state.get(SEQ_LEN, DEFAULTS[SEQ_LEN]))


def n_windows() -> int:
    return int(st.session_state.get(WINDOWS, DEFAULTS[WINDOWS]))


KEEP = "session"
"""Every input widget of every page is drawn with ``key="w_..."`` and ``persist_state=c.KEEP`` (Streamlit >= 1.67),
so its value survives leaving the page and coming back; inputs that a link reproduces also get
``bind="query-params"`` (the key is then the URL parameter's name)."""


def valid_choice(key: str, options: Sequence, default=None, multi: bool = False) -> None:
    """Before drawing a selectbox, radio, pills or multiselect ``key`` over ``options``: a kept value that is no
    longer an option (a deleted flow, a flow of another span) is replaced by ``default`` (multi: filtered), and a
    missing one is set to ``default``. Draw the widget without value/index/default arguments afterwards."""
    options = list(options)
    if key in st.session_state:
        value = st.session_state[key]
        if multi:
            value = list(value or [])
            kept = [v for v in value if v in options]
            if len(kept) != len(value):
                st.session_state[key] = kept
            return
        if value in options:
            return
    if multi:
        st.session_state[key] = [v for v in (default or []) if v in options]
    else:
        st.session_state[key] = default if default in options else (options[0] if options else None)


def persistent_widget(widget_key: str, state_key: str) -> None:
    """Before drawing a page-local widget ``widget_key`` that edits the shared ``state_key``: give it the shared
    value when Streamlit has forgotten it (it does when the user leaves the page)."""
    if widget_key not in st.session_state:
        st.session_state[widget_key] = st.session_state.get(state_key, DEFAULTS.get(state_key))


def copy_to(state_key: str, widget_key: str) -> Callable[[], None]:
    """An on_change callback copying a widget's value into a shared key."""

    def callback() -> None:
        st.session_state[state_key] = st.session_state[widget_key]

    return callback


# ---------------------------------------------------------------------------------------------------------
# Span <-> URL


def default_span(n_layers: int) -> Span:
    """A middle span of about a fifth of the blocks (6:12 for a 30-block model)."""
    m = n_layers // 5
    return Span(m, min(n_layers, m + max(1, n_layers // 5)))


def set_span(span: Span | tuple[int, int]) -> None:
    span = Span.of(span)
    st.session_state[SPAN] = span
    st.session_state["_span_qp"] = str(span)
    st.query_params["span"] = str(span)


def sync_span_query() -> None:
    """Frame, every run: a new ``?span=`` in the URL wins; otherwise write the current span into the URL (page
    switches clear query parameters)."""
    given = st.query_params.get("span")
    if given is not None and given != st.session_state.get("_span_qp"):
        st.session_state["_span_qp"] = given
        try:
            st.session_state[SPAN] = Span.parse(given)
            st.session_state.pop("_span_error", None)
        except LFTError as e:
            st.session_state["_span_error"] = f"the link's span: {e}"
    elif SPAN in st.session_state:
        text = str(Span.of(st.session_state[SPAN]))
        if given != text:
            st.query_params["span"] = text
        st.session_state["_span_qp"] = text


def current_span(teacher: Teacher) -> Span:
    """The shared span checked against the teacher; a bad one is reported and replaced by the default."""
    fallback = default_span(teacher.n_layers)
    problem = st.session_state.pop("_span_error", None)
    span = st.session_state.get(SPAN)
    if problem:
        st.error(f"{problem}; showing span {span or fallback} instead")
    span = fallback if span is None else Span.of(span)
    try:
        span = teacher.check_span(*span)
    except LFTError as e:
        st.error(f"{e}. Showing span {fallback} instead.")
        span = fallback
    if st.session_state.get(SPAN) != span:
        set_span(span)
    return span


# ---------------------------------------------------------------------------------------------------------
# Cached engine objects


@contextmanager
def engine_errors(stop: bool = True) -> Iterator[None]:
    """Show an engine error as one line (``st.error``) and, by default, stop the page there."""
    try:
        yield
    except LFTError as e:
        st.error(str(e))
        if stop:
            st.stop()


@st.cache_resource(show_spinner="Loading the model (the first time converts the embedded GGUF, ~20 s)...",
                   max_entries=3)
def get_teacher(spec: str) -> Teacher:
    """One teacher per model spec per server process; never mutated by pages."""
    return load_teacher(spec)


def teacher_or_error() -> Teacher | None:
    """The chosen teacher, or None after showing a clear error in the page."""
    try:
        return get_teacher(model_spec())
    except LFTError as e:
        st.error(str(e))
        return None


def require_teacher() -> Teacher:
    """The chosen teacher, or stop the page after an error that says what to do."""
    teacher = teacher_or_error()
    if teacher is None:
        st.page_link("pages/setup.py", label="Choose another model on the Setup page", icon=":material/settings:")
        st.stop()
    return teacher


@st.cache_resource(show_spinner="Reading the corpus...", max_entries=4)
def get_corpus(spec: str):
    from lft_core.corpus import load_corpus

    return load_corpus(spec)


def corpus_or_error():
    try:
        return get_corpus(corpus_spec())
    except LFTError as e:
        st.error(str(e))
        return None


def find_cache(teacher: Teacher, corpus, seq_len: int, windows: int, split: str = "train"):
    """The activation cache entry for these settings if it exists and is whole, else None (computes nothing)."""
    from lft_core.activations import cache_key, open_activations

    key = cache_key(teacher.model_id, teacher.weights_hash, corpus.id, corpus.content_hash, seq_len, windows, split)
    try:
        return open_activations(key)
    except LFTError:
        return None


def flows_for(teacher: Teacher) -> list[SavedFlow]:
    """The saved flows trained for this teacher (by name)."""
    from lft_core.store import list_flows

    return [f for f in list_flows() if f.trained_for(teacher)]


@st.cache_resource(show_spinner="Loading the flow...", max_entries=16)
def load_flow(name: str, spec: str, stamp: float):
    """(LatentFlow, config) of a saved flow for the teacher of ``spec``; ``stamp`` (the weights' mtime) makes
    a new checkpoint a new cache entry."""
    from lft_core.store import open_flow

    flow, config = open_flow(name, get_teacher(spec))
    flow.eval()
    return flow, config


def flow_key(saved: SavedFlow | None) -> tuple[str, float] | None:
    """What identifies a saved flow's current weights in a cached computation: (name, stamp)."""
    return (saved.name, saved.stamp) if saved is not None else None


AFFINE_FIT_WINDOWS = 64  # training windows the affine baseline is fitted on when no flow says otherwise
AFFINE_FIT_HELDOUT = 8


@st.cache_resource(show_spinner=False, max_entries=16)
def load_affine(spec: str, corpus_spec: str, span: Span, seq_len: int, windows: int, heldout_windows: int):
    """The closed-form affine replacement of ``span`` fitted on ``windows`` training windows (one per process;
    never mutated)."""
    from lft_core.baselines import fit_affine_for_span

    return fit_affine_for_span(get_teacher(spec), span, corpus_spec, seq_len, windows, heldout_windows,
                               progress=False)


def affine_settings(flow_config: dict | None) -> tuple[str, int, int, int]:
    """(corpus, seq_len, windows, held-out windows) the affine baseline is fitted on: a flow's own training data
    (its config.json), so that the two are compared fairly, or the chosen corpus and window length without one."""
    if flow_config is not None:
        return (trained_on(flow_config), int(flow_config.get("seq_len", 128)),
                int(flow_config.get("windows", 256)), int(flow_config.get("heldout_windows", 16)))
    return corpus_spec(), seq_len(), AFFINE_FIT_WINDOWS, AFFINE_FIT_HELDOUT


def get_affine(span: Span, flow_config: dict | None = None):
    """The affine baseline of ``span`` for the current model (fitted once, with a spinner that says on what)."""
    corpus, length, windows, heldout = affine_settings(flow_config)
    with st.spinner(f"Fitting the affine baseline of span {span} on {windows} windows × {length} tokens (caching "
                    "their hidden states first if needed)..."):
        return load_affine(model_spec(), corpus, Span.of(span), length, windows, heldout)


# ---------------------------------------------------------------------------------------------------------
# Output helpers: every figure gets an HTML download, every table a CSV download


def show_figure(fig, name: str, key: str | None = None, **kwargs):
    """Draw a plotly figure (PNG export is in its modebar) with a 'Download HTML' button under it."""
    event = st.plotly_chart(fig, key=key, theme=None, config={"displaylogo": False,
                                                                "toImageButtonOptions": {"filename": name}}, **kwargs)
    st.download_button("Download HTML", data=lambda: figures.to_html(fig), file_name=f"{name}.html",
                       mime="text/html", key=f"dl-html-{key or name}", on_click="ignore", icon=":material/download:")
    return event


def show_table(df: pd.DataFrame, name: str, key: str | None = None, **kwargs):
    """st.dataframe plus a 'Download CSV' button."""
    event = st.dataframe(df, key=key, hide_index=True, **kwargs)
    st.download_button("Download CSV", data=df.to_csv(index=False), file_name=f"{name}.csv", mime="text/csv",
                       key=f"dl-csv-{key or name}", on_click="ignore", icon=":material/download:")
    return event


def page_intro(title: str, science: str, how: str | None = None) -> None:
    st.title(title)
    st.markdown(science)
    if how:
        st.caption(how)


# ---------------------------------------------------------------------------------------------------------
# Background jobs (cache jobs here; training jobs on the Train page)

_TQDM_RE = re.compile(r"(\d+)/(\d+)")


def tqdm_progress(log_tail: str, prefix: str) -> tuple[int, int] | None:
    """The last 'done/total' of a tqdm bar whose description starts with ``prefix`` in a job's log."""
    segments = [s for line in log_tail.splitlines() for s in line.split("\r") if s.strip().startswith(prefix)]
    if not segments:
        return None
    match = _TQDM_RE.search(segments[-1].split("|")[-1])
    return (int(match.group(1)), int(match.group(2))) if match else None


def start_cache_job(spec: str, corpus: str, seq_len: int, windows: int):
    from lft_core.jobs import start_job

    label = f"cache all layers · {spec} · {Path(corpus).name} · T={seq_len} · W={windows}"
    args = ["--model", spec, "--corpus", corpus, "--seq-len", str(seq_len), "--windows", str(windows),
            "--layers", "all"]
    job = start_job("cache", args, label)
    st.session_state["cache_job"] = job.id
    return job


def cache_jobs_panel() -> None:
    """Running cache jobs (any session, so a reload still shows them) and the one this session started."""
    from lft_core.jobs import list_jobs, read_job

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


# ---------------------------------------------------------------------------------------------------------
# Uploads

UPLOAD_LIMIT_MB = 20
UPLOAD_SUFFIXES = (".txt", ".jsonl", ".md")


def save_upload(name: str, data: bytes) -> Path:
    """Store an uploaded corpus file under cache/uploads with a sanitised, content-addressed name.

    Refuses files over the size limit, other suffixes, and anything that is not UTF-8 text."""
    import hashlib

    from lft_core.atomic import write_bytes
    from lft_core.paths import cache_dir

    if len(data) > UPLOAD_LIMIT_MB * 2**20:
        raise LFTError(f"{name} is {len(data) / 2**20:.1f} MB; uploads are limited to {UPLOAD_LIMIT_MB} MB")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._") or "corpus"
    suffix = Path(stem).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise LFTError(f"{name}: only {', '.join(UPLOAD_SUFFIXES)} files can be used as a corpus")
    from lft_core.corpus import decode_text

    decode_text(data, name)  # the corpus's own checks: empty, binary, not UTF-8
    digest = hashlib.sha256(data).hexdigest()[:12]
    folder = cache_dir("uploads")
    base = Path(stem).stem[:60].strip("._-") or "corpus"
    target = folder / f"{digest}-{base}{suffix}"
    if not target.exists():
        write_bytes(target, data)
    return target
