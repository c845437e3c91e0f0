"""Shared session state: the keys, their defaults, inputs that persist across pages, and the URL of a view.

Session-state keys, all of them, by kind:

* shared choices (set on the Setup page or by the span picker, read everywhere; constants below):
  ``model_spec`` (the teacher, default the embedded smollm2-135m), ``corpus_spec`` ("mix" by default, "english",
  "builtin" for the Python docs, an uploaded file under cache/uploads, or a path), ``seq_len`` and ``n_windows``
  (the activation cache used for analysis),
  ``span`` (a ``Span``, mirrored in the URL as ``?span=m:n`` so a link reproduces the view);
* the story a link reproduces (besides the span): ``w_text`` (one text for Trajectories, Crossings and Per-token
  KL; saved by lft_core.data.texts and named in the URL as ``?text=<id>``), every input that changes a number
  on a page (``LINKED``: ``k``, ``proj``, Per-token KL's skip-k and baselines, Trajectories' "start at 0",
  Crossings' tokens; in the URL by their link names, ``_linked_pending`` lists those a link set that their page has not taken yet), the
  flows a page shows (``?flows=a,b``, handed to the page once as ``_link_flows``),
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

The other modules of the app: app.pages (the registry of pages), app.engine (cached engine objects,
``engine_errors``), app.progress (progress bars and background jobs), app.frame (what every page shows around
its content), app.uploads (uploaded corpus files), app.figures (every figure, no Streamlit).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import streamlit as st

from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.errors import LFTError
from lft_core.model.loading import DEFAULT_MODEL
from lft_core.span import Span
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
"""Every input widget of every page is drawn with ``key="w_..."`` and ``persist_state=state.KEEP`` (Streamlit >= 1.67),
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
        from app.frame import choices_line

        choices_line()  # the sidebar was drawn with the span the link asked for
    return span


# ---------------------------------------------------------------------------------------------------------
# Presenter mode, the story text and the flows a link names


PRESENTER = "presenter"  # the sidebar toggle's key, also a URL parameter (?presenter=true)


def presenter() -> bool:
    """True in presenter mode: larger text and plots, technical controls hidden, the story (span, flows, text)
    fixed."""
    return bool(st.session_state.get(PRESENTER, False))


TEXT = "w_text"  # the text the Trajectories, Crossings and Per-token KL pages analyse (one text for the story)
STORY_K = "k"  # their k (flow integration steps), one for the story; each page has its own slider (story_k)


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


def _flag(text: str) -> bool | None:
    return {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower())


LINKED: dict[str, tuple[str, Callable[[str], Any], Any]] = {
    # URL name: (session key, parse, allowed values)
    "k": (STORY_K, int, range(1, 9)),
    "proj": ("proj", str, ("PCA", "UMAP")),
    "skip": ("w_kl_skip", _flag, (True, False)),  # Per-token KL: compare with skip-k, how many blocks, baselines
    "skipk": ("w_kl_skip_k", int, range(1, 257)),
    "centre": ("w_traj_centre", _flag, (True, False)),  # Trajectories: every token starts at 0
    "tokens": ("w_cross_n", int, range(16, 257, 16)),  # Crossings: how many tokens, from where
    "from": ("w_cross_source", str, ("Corpus windows", "My text")),
}
"""Inputs a link carries (``?k=3&proj=UMAP&skipk=2``): every input that changes a number on a page, by URL name.
The fitted baselines' toggles join them by name (``?affine=true``: ``linked_inputs``)."""


def linked_inputs() -> dict[str, tuple[str, Callable[[str], Any], Any]]:
    """``LINKED`` and, for every fitted baseline, its toggles on Per-token KL (``?affine=``) and Trajectories
    (``?traj_affine=``)."""
    from lft_core.analysis.baselines import fitted_baselines

    out = dict(LINKED)
    for b in fitted_baselines():
        out[b.name] = (f"w_kl_{b.name}", _flag, (True, False))
        out[f"traj_{b.name}"] = (f"w_traj_{b.name}", _flag, (True, False))
    return out


def sync_linked_query() -> None:
    """Frame, every run: a new value of a linked input in the URL sets that input (``took_link`` tells the page
    that owns it, once, so the page keeps it over its own default); otherwise the current value is written into
    the URL (the same for every page, so a page switch keeps it)."""
    now = st.session_state.setdefault("_linked_pending", [])
    for name, (key, kind, allowed) in linked_inputs().items():
        given = st.query_params.get(name)
        seen = f"_{name}_qp"
        if given is not None and given != st.session_state.get(seen):
            st.session_state[seen] = given
            try:
                value = kind(given)
            except ValueError:
                value = None
            if value is not None and value in allowed:
                st.session_state[key] = value
                if key not in now:
                    now.append(key)
            else:
                shown = [v for v in allowed][:8] if not isinstance(allowed, range) else \
                    f"{allowed.start}..{allowed.stop - 1}"
                st.session_state["_link_error"] = f"the link's {name}={given!r} is not one of {shown}"
        elif key in st.session_state:
            write_link(name, st.session_state[key])


def took_link(key: str) -> bool:
    """True (once) when a link set the input ``key`` and its page has not run since: the page keeps the link's
    value over its own default."""
    pending = st.session_state.get("_linked_pending", [])
    if key in pending:
        pending.remove(key)
        return True
    return False


def sync_flows_query() -> None:
    """Frame, every run: a new ``?flows=a,b`` in the URL is handed to the page (``linked_flows``)."""
    given = st.query_params.get("flows")
    if given is not None and given != st.session_state.get("_flows_qp"):
        st.session_state["_flows_qp"] = given
        st.session_state["_link_flows"] = [name for name in given.split(",") if name]


def linked_flows(known: Sequence[str] | None = None) -> list[str] | None:
    """The flow names a just-opened link asks for (once), or None. With ``known`` (the flows this page can show),
    only those, and one line on the page names the others and what to do."""
    asked = st.session_state.pop("_link_flows", None)
    if asked is None or known is None:
        return asked
    missing = [name for name in asked if name not in known]
    if missing:
        st.warning(f"The link names flow{'s' if len(missing) > 1 else ''} {', '.join(repr(n) for n in missing)}, "
                   f"which {'are' if len(missing) > 1 else 'is'} not trained for this model on this server; "
                   "showing the page's default instead. Choose a flow below, or train it on the **Train** page.",
                   icon=":material/link_off:")
    return [name for name in asked if name in known]


def link_flows(names: Sequence[str]) -> None:
    """Put the flows a page shows into its link (``?flows=a,b``)."""
    text = ",".join(names)
    st.session_state["_flows_qp"] = text
    if st.query_params.get("flows", "") != text:
        if text:
            st.query_params["flows"] = text
        elif "flows" in st.query_params:
            del st.query_params["flows"]


def write_link(name: str, value: Any) -> None:
    """Put a linked input's value into the URL now (``?name=value``), as the frame would at the next run: for a
    value a page sets while it runs, so that a link copied at once carries it."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    st.session_state[f"_{name}_qp"] = text
    if st.query_params.get(name) != text:
        st.query_params[name] = text


def story_k(where: Any, page: str, label: str, default: int, **kwargs: Any) -> int:
    """The story's k on ``page`` (``traj``, ``cross``, ``kl``): a slider of the page's own (``w_<page>_k``), started
    from the shared ``STORY_K`` and writing back to it. One widget key on several pages does not work in a browser:
    Streamlit scopes a widget to its page and resets it to its default (k = 1) on another page."""
    st.session_state.setdefault(STORY_K, default)
    key, seen = f"w_{page}_k", f"_w_{page}_k_story"
    if key not in st.session_state or st.session_state.get(seen) != st.session_state[STORY_K]:
        st.session_state[key] = st.session_state[STORY_K]  # k changed on another page, or by a link
    value = int(where.slider(label, 1, 8, key=key, persist_state=KEEP, **kwargs))
    st.session_state[STORY_K] = st.session_state[seen] = value
    write_link("k", value)
    return value


def story_text(label: str = "Text", height: int = 100, help: str | None = None) -> str:
    """The shared text area (kept across pages; fixed in presenter mode); its id goes into the page link."""
    from lft_core.data.texts import MAX_CHARS, save_text

    if problem := st.session_state.pop("_text_error", None):
        st.warning(problem)
    st.session_state.setdefault(TEXT, DEFAULT_PARAGRAPH)
    text = st.text_area(label, key=TEXT, height=height, help=help, persist_state=KEEP, disabled=presenter())
    if text.strip():
        if len(text) > MAX_CHARS:  # too long to analyse as one story
            st.error(f"the text has {len(text):,} characters; a link can name texts of at most {MAX_CHARS:,}")
            st.stop()
        try:
            tid = save_text(text)
        except LFTError as e:  # not saved (a hash collision, a store that cannot be written): the page goes on,
            st.warning(f"{e}. The page link does not name this text.")  # but its link names no text
            st.session_state["_text_qp"] = None
            if "text" in st.query_params:
                del st.query_params["text"]
            return text
        st.session_state["_text_qp"] = tid
        if st.query_params.get("text") != tid:
            st.query_params["text"] = tid
    return text


# ---------------------------------------------------------------------------------------------------------
# The demo's story


def demo_status():
    """The demo's state (cheap: reads its manifest and checks its files), or None when it cannot be read."""
    from lft_core.run.demo import demo_status as status

    try:
        return status()
    except LFTError:
        return None
