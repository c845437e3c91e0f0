"""Shared state, cached engine objects and UI helpers for the pages.

Session-state keys, all of them, by kind:

* shared choices (set on the Setup page or by the span picker, read everywhere; constants below):
  ``model_spec`` (the teacher, default the embedded smollm2-135m), ``corpus_spec`` ("english" by default,
  "builtin" for the Python docs, an uploaded file under cache/uploads, or a path), ``seq_len`` and ``n_windows``
  (the activation cache used for analysis),
  ``span`` (a ``Span``, mirrored in the URL as ``?span=m:n`` so a link reproduces the view);
* the story a link reproduces (besides the span): ``w_text`` (one text for Trajectories, Crossings and Per-token
  KL; saved by lft_core.data.texts and named in the URL as ``?text=<id>``), ``k`` and ``proj`` (inputs of
  several pages, in the URL as ``?k=`` and ``?proj=``), the flows a page shows (``?flows=a,b``, handed to the page once as ``_link_flows``),
  ``presenter`` (the sidebar's presenter-mode toggle, bound to ``?presenter=``); bookkeeping ``_span_qp``,
  ``_span_error``, ``_text_qp``, ``_text_error``, ``_flows_qp``, ``_visited`` (page titles opened);
* widget keys ``w_<page>_<input>``: each page's own inputs, all drawn with ``persist_state=KEEP`` so they survive
  leaving the page; a page resets the ones that follow the span when the span changed (``_traj_flows_span``,
  ``_cross_flow_span``, ``_kl_span``, ``_traj_path_options``); the Train page's sweep form keeps
  ``_sweep_spans_default``;
* background jobs this session started: ``cache_job``, ``train_job``, ``sweep_job``, ``demo_job`` (job ids), and
  the bookkeeping of running jobs ``_cache_running``, ``_train_running``, ``_sweep_runs``; the heatmaps' last
  clicks ``_last_click_r``, ``_last_click_affine``;
* "show this result" gates, holding the inputs of the last request: ``skip_shown``, ``cmp_params``,
  ``toy_params``; ``flow_deleted`` / ``flow_delete_problem`` carry a deletion's outcome from the Delete button's
  callback to the page;
* results each page publishes for its tests (AppTest reads them; pages never read another page's):
  ``recoupling_matrix``, ``affine_matrix``, ``skip_table``, ``flows_table``, ``trajectory_table``, ``crossings_result``,
  ``kl_result``, ``compare_table``, ``compare_eval``, ``compare_groups``, ``compare_curve_table``,
  ``compare_eval_table``, ``compare_eval_groups``, ``compare_kl_points``, ``toy_runs``, ``sweep_results``.

Every wait longer than a moment goes through :func:`with_progress` (a progress bar with the time the same work
took here before, from lft_core.run.timings), never a bare spinner.
Engine errors (``LFTError``) are shown with ``st.error`` by :func:`engine_errors`; pages never show a traceback.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import figures
from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.errors import LFTError
from lft_core.model.loading import DEFAULT_MODEL, load_teacher
from lft_core.span import Span
from lft_core.flow.store import SavedFlow, trained_on
from lft_core.model.teacher import Teacher

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
so its value survives leaving the page and coming back. The inputs a link reproduces are synced with the URL by
the frame (``sync_span_query``, ``sync_text_query``, ``sync_flows_query``, ``sync_linked_query``) rather than by
Streamlit's ``bind="query-params"``, which drops a page's parameters when another page opens."""


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


def story_span(teacher: Teacher) -> Span | None:
    """The span the demo tells its story on (its high-R span, where FW and SFM differ), when the demo is ready
    for the chosen model and corpus."""
    demo = demo_status()
    if demo is None or not demo.ready or not demo.spans or model_spec() != demo.model or \
            corpus_spec() != demo.corpus:
        return None
    try:
        return teacher.check_span(*demo.spans[-1])
    except LFTError:
        return None


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
    """The shared span checked against the teacher; a bad one is reported and replaced by the default (the
    demo's story span once the demo is prepared for this model, else a middle span)."""
    fallback = story_span(teacher) or default_span(teacher.n_layers)
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
        st.page_link("views/setup.py", label="Choose another model on the Setup page", icon=":material/settings:")
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


AFFINE_FIT_WINDOWS = 64  # training windows the affine baseline is fitted on when no flow says otherwise
AFFINE_FIT_HELDOUT = 8


@st.cache_resource(show_spinner=False, max_entries=16)
def load_affine(spec: str, corpus_spec: str, span: Span, seq_len: int, windows: int, heldout_windows: int):
    """The closed-form affine replacement of ``span`` fitted on ``windows`` training windows (one per process;
    never mutated)."""
    from lft_core.analysis.baselines import fit_affine_for_span

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
    """The affine baseline of ``span`` for the current model (fitted once, with a progress bar that says on what)."""
    corpus, length, windows, heldout = affine_settings(flow_config)
    return with_progress(f"Fitting the affine baseline of span {span} on {windows} windows × {length} tokens "
                         "(caching their hidden states first if needed)", f"affine {windows}x{length}", load_affine,
                         model_spec(), corpus, Span.of(span), length, windows, heldout)


# ---------------------------------------------------------------------------------------------------------
# Progress: every wait longer than a moment shows what runs, how long it has run and how long it took last time


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
# Presenter mode, the glossary, the story text and the path through the pages

PRESENTER = "presenter"  # the sidebar toggle's key, also a URL parameter (?presenter=true)


def presenter() -> bool:
    """True in presenter mode: larger text and plots, technical controls hidden, the story (span, flows, text)
    fixed."""
    return bool(st.session_state.get(PRESENTER, False))


PRESENTER_CSS = """<style>
.stMainBlockContainer p, .stMainBlockContainer li, .stMainBlockContainer label p { font-size: 1.3rem !important; }
.stMainBlockContainer h1 { font-size: 3rem !important; }
.stMainBlockContainer h2, .stMainBlockContainer h3 { font-size: 2rem !important; }
[data-testid="stMetricValue"] { font-size: 2.6rem !important; }
[data-testid="stMetricLabel"] p { font-size: 1.2rem !important; }
</style>"""

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


TEXT = "w_text"  # the text the Trajectories, Crossings and Per-token KL pages analyse (one text for the story)


def sync_text_query() -> None:
    """Frame, every run: a new ``?text=<id>`` in the URL loads that saved text into the shared text."""
    from lft_core.data.texts import load_text

    given = st.query_params.get("text")
    if given is not None and given != st.session_state.get("_text_qp"):
        st.session_state["_text_qp"] = given
        try:
            st.session_state[TEXT] = load_text(given)
        except LFTError as e:
            st.session_state["_text_error"] = f"the link's text: {e}"


LINKED = {"k": (int, range(1, 9)), "proj": (str, ("PCA", "UMAP"))}
"""Widget keys a link carries as themselves (``?k=3&proj=UMAP``): (type, allowed values)."""


def sync_linked_query() -> None:
    """Frame, every run: a new ``?k=`` or ``?proj=`` in the URL sets that input; otherwise the current value is
    written into the URL (the same for every page, so a page switch keeps it)."""
    for name, (kind, allowed) in LINKED.items():
        given = st.query_params.get(name)
        seen = f"_{name}_qp"
        if given is not None and given != st.session_state.get(seen):
            st.session_state[seen] = given
            try:
                value = kind(given)
            except ValueError:
                value = None
            if value in allowed:
                st.session_state[name] = value
            else:
                st.session_state["_link_error"] = f"the link's {name}={given!r} is not one of {list(allowed)}"
        elif name in st.session_state:
            text = str(st.session_state[name])
            st.session_state[seen] = text
            if given != text:
                st.query_params[name] = text


def sync_flows_query() -> None:
    """Frame, every run: a new ``?flows=a,b`` in the URL is handed to the page (``linked_flows``)."""
    given = st.query_params.get("flows")
    if given is not None and given != st.session_state.get("_flows_qp"):
        st.session_state["_flows_qp"] = given
        st.session_state["_link_flows"] = [name for name in given.split(",") if name]


def linked_flows() -> list[str] | None:
    """The flow names a just-opened link asks for (once), or None."""
    return st.session_state.pop("_link_flows", None)


def link_flows(names: Sequence[str]) -> None:
    """Put the flows a page shows into its link (``?flows=a,b``)."""
    text = ",".join(names)
    st.session_state["_flows_qp"] = text
    if st.query_params.get("flows", "") != text:
        if text:
            st.query_params["flows"] = text
        elif "flows" in st.query_params:
            del st.query_params["flows"]


def story_text(label: str = "Text", height: int = 100, help: str | None = None) -> str:
    """The shared text area (kept across pages; fixed in presenter mode); its id goes into the page link."""
    from lft_core.data.texts import save_text

    if problem := st.session_state.pop("_text_error", None):
        st.warning(problem)
    st.session_state.setdefault(TEXT, DEFAULT_PARAGRAPH)
    text = st.text_area(label, key=TEXT, height=height, help=help, persist_state=KEEP, disabled=presenter())
    if text.strip():
        try:
            tid = save_text(text)
        except LFTError as e:
            st.error(str(e))
            st.stop()
        st.session_state["_text_qp"] = tid
        if st.query_params.get("text") != tid:
            st.query_params["text"] = tid
    return text


PATH = [  # the path through the pages: (page file, its title in the navigation, the step's words)
    ("views/setup.py", "Setup & cache", "Set up the model and cache its hidden states"),
    ("views/span.py", "Choose a span", "Choose a span"),
    ("views/train.py", "Train", "Train flows for it"),
    ("views/trajectories.py", "Latent trajectories", "Look at the latent trajectories"),
    ("views/crossings.py", "Coupling crossings", "See where token paths cross"),
    ("views/kl.py", "Per-token KL", "Measure the cost per token (KL)"),
    ("views/compare.py", "Compare spans", "Compare spans and baselines"),
    ("views/toy.py", "Teaching lab (2-D)", "Replay the lesson in 2-D (teaching lab)"),
]
HOME = "Start here"


def visited(title: str) -> None:
    """The frame, every run: remember the pages (by title) this session has opened (the start page shows them)."""
    st.session_state.setdefault("_visited", set()).add(title)


def next_page_link(title: str) -> None:
    """The frame, after every page: a link to the next page of the path."""
    titles = [HOME] + [t for _, t, _ in PATH]
    if title in titles and titles.index(title) < len(PATH):
        target, _, words = PATH[titles.index(title)]
        st.divider()
        st.page_link(target, label=f"Next: {words[0].lower() + words[1:]}", icon=":material/arrow_forward:")


def demo_status():
    """The demo's state (cheap: reads its manifest and checks its files), or None when it cannot be read."""
    from lft_core.run.demo import demo_status as status

    try:
        return status()
    except LFTError:
        return None


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
    done = tqdm_progress(job.log_tail(5), "caching")
    if done:
        return done[0] / max(done[1], 1), f"{done[0]}/{done[1]} windows"
    return None, "starting (loading the model and the data)"


def fmt_seconds(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``; ``?`` for an unknown time."""
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def sidebar_status() -> None:
    """The sidebar of every page: the choices, the demo's state and every running job, kept current."""
    from lft_core.run.jobs import list_jobs

    span = st.session_state.get(SPAN)
    named = {"builtin": "built-in Python docs", "english": "built-in everyday English"}
    corpus = named.get(corpus_spec()) or Path(corpus_spec()).name
    st.caption(f"**Model** `{model_spec()}`  \n**Corpus** {corpus}  \n"
               f"**Windows** {n_windows()} × {seq_len()} tokens  \n**Span** {span if span else 'not chosen yet'}")
    running = [j for j in list_jobs() if j.status in ("running", "stopping")]

    @st.fragment(run_every=3 if running else None)
    def live() -> None:
        demo = demo_status()
        if demo is not None:
            icon = ":green[:material/check_circle:]" if demo.ready else ":material/hourglass_top:" if demo.running \
                else ":material/radio_button_unchecked:"
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
        fig = go.Figure(fig).update_layout(font=dict(size=17), title_font=dict(size=22))
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
    from lft_core.data.corpus import decode_text

    decode_text(data, name)  # the corpus's own checks: empty, binary, not UTF-8
    digest = hashlib.sha256(data).hexdigest()[:12]
    folder = cache_dir("uploads")
    base = Path(stem).stem[:60].strip("._-") or "corpus"
    target = folder / f"{digest}-{base}{suffix}"
    if not target.exists():
        write_bytes(target, data)
    return target
