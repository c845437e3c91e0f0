"""Latent trajectories: the teacher's path h_m … h_n of chosen tokens, the straight path, and trained flows."""
from __future__ import annotations

import streamlit as st

from app import engine, frame, pages, progress, state
from app.figures.trajectories import trajectory_figure
from lft_core.analysis.baselines import FitData, fitted_baselines
from lft_core.span import Span

frame.page_intro(
    pages.TRAJECTORIES,
    "Through a span the teacher moves each token's hidden state along h_m, h_{m+1}, …, h_n (one point per block). "
    "Flow matching is trained on the **straight path** (1 − t)·h_m + t·h_n; a trained flow takes k Euler steps "
    "from h_m and should land on h_n.",
    "All paths of the chosen tokens are projected together to 2-D (one PCA or UMAP fitted on every point shown).",
)

story = engine.story_opening()
teacher, span, flows, by_name = story.teacher, story.span, story.flows, story.by_name
FLOWS = "w_traj_flows"

if not flows:
    st.info("No flow is trained for this model yet, so only the teacher's path and the straight path are shown. "
            "Prepare the demo on the **Start here** page, or train flows on the **Train** page (an SFM and an FW "
            "flow for the same span make a good comparison).")
    st.page_link(pages.TRAIN.file, label="Train a flow", icon=pages.TRAIN.icon)
    chosen: list[str] = []
else:
    # one FW and one SFM flow of this span if there are (the best trained of each), else the first two
    default = [f.name for f in story.best_of_each()] or [f.name for f in story.here[:2]]
    if not story.here:
        st.info(story.no_flow_here() + " The teacher's path and the straight path are drawn; flows of another span "
                "can be chosen below (their span is then shown).", icon=":material/info:")
    if (asked := state.linked_flows(list(by_name))) is not None:  # a link names the flows
        st.session_state[FLOWS] = [name for name in asked if name in by_name] or default
        st.session_state["_traj_flows_span"] = span
    elif st.session_state.get("_traj_flows_span") != span:  # the span changed since the flows were chosen
        st.session_state[FLOWS] = default
        st.session_state["_traj_flows_span"] = span
    state.valid_choice(FLOWS, list(by_name), default, multi=True)
    chosen = st.multiselect("Flows to draw (all for one span)", list(by_name), key=FLOWS, persist_state=state.KEEP,
                            format_func=lambda name: by_name[name].label, disabled=state.presenter(),
                            help="The best-trained FW and SFM flows of the current span are preselected.")
    state.link_flows(chosen)
spans = {by_name[name].span for name in chosen}
if len(spans) > 1:
    st.error("The chosen flows replace different spans (" + ", ".join(str(s) for s in sorted(spans))
             + "): choose flows of one span.")
    st.stop()
if spans:
    flow_span = spans.pop()
    if flow_span != span:
        st.info(f"The chosen flows replace span {flow_span}; that span is shown (the current span is {span}).")
    span = flow_span
m, n = span

text = state.story_text("Text", height=80,
                        help="The whole text goes through the model (attention sees the context); the first 64 tokens "
                             "are used.")
if not text.strip():
    st.error("Enter some text: the trajectories are those of its tokens.")
    st.stop()
with engine.engine_errors():
    ids = teacher.encode(text, max_tokens=64)
words = teacher.decode_tokens(ids[0])
options = [f"{p}: {w!r}" for p, w in enumerate(words)]
T = len(words)
default_positions = sorted({min(1, T - 1), T // 2, T - 1})
state.valid_choice("w_traj_tokens", options, [options[p] for p in default_positions], multi=True)
if not st.session_state["w_traj_tokens"]:  # another text: its own default tokens
    st.session_state["w_traj_tokens"] = [options[p] for p in default_positions]
picked = st.multiselect("Tokens", options, key="w_traj_tokens", persist_state=state.KEEP,
                        help="Position 0 often behaves as an attention sink with a huge norm; it can dwarf the others.")
if not picked:
    st.warning("Pick at least one token.")
    st.stop()
positions = [int(o.split(":", 1)[0]) for o in picked]

col_k, col_proj, col_opts = st.columns([1, 1, 2])
k = state.story_k(col_k, "traj", "k (flow steps)", (by_name[chosen[0]].k or 3) if chosen else 3,
                  disabled=not chosen)
st.session_state.setdefault("proj", "PCA")
method = col_proj.radio("Projection", ["PCA", "UMAP"], horizontal=True, key="proj", persist_state=state.KEEP)
st.session_state.setdefault("w_traj_centre", True)
centre = col_opts.checkbox("Start every token at 0", key="w_traj_centre", persist_state=state.KEEP,
                           help="Subtract each token's h_m from all its states before projecting, so the picture "
                                "shows how the paths move rather than how far apart the tokens are.")
with_baselines: list[str] = []  # fitted baselines whose end points are drawn (``baselines.BASELINES``)
if not state.presenter():
    for b in fitted_baselines():
        if col_opts.checkbox(f"{b.name.capitalize()} baseline end point", key=f"w_traj_{b.name}",
                             persist_state=state.KEEP,
                             help=f"Also draw where the {b.label} of the span sends each token ({b.help}; fitted on "
                                  "the first chosen flow's training windows)."):
            with_baselines.append(b.name)
flow_names = {f"{by_name[name].method.upper()} {name}": by_name[name] for name in chosen}
path_options = ["teacher", "straight"] + list(flow_names) + (["fine curves"] if flow_names else [])
state.valid_choice("w_traj_paths", path_options, path_options, multi=True)
if st.session_state.get("_traj_path_options") != path_options:  # new flows: show every path again
    st.session_state["w_traj_paths"] = path_options
    st.session_state["_traj_path_options"] = path_options
shown = st.pills("Paths to show", path_options, selection_mode="multi", key="w_traj_paths",
                        persist_state=state.KEEP,
                        help="'fine curves': the same flows integrated with 24 small steps (the continuous curve).")
show = {kind: kind in shown for kind in path_options}
fine = show.get("fine curves", False)


@st.cache_data(max_entries=16, show_spinner=False)
def trajectories(spec: str, flow_keys: tuple[tuple[str, str, float], ...], text: str, positions: tuple[int, ...],
                 span: Span, k: int, method: str, centre: bool, baseline_keys: tuple[tuple[str, FitData], ...]):
    from lft_core.analysis.trajectories import centred, project_table, trajectory_table

    teacher = engine.get_teacher(spec)
    flows = {label: engine.load_flow(name, spec, stamp)[0] for label, name, stamp in flow_keys}
    endpoints = {name: engine.load_baseline(name, spec, span, data).replacement for name, data in baseline_keys} or None
    ids = teacher.encode(text, max_tokens=64)
    df = trajectory_table(teacher, ids, span, list(positions), flows, k=k, fine_steps=24, endpoints=endpoints)
    return project_table(centred(df) if centre else df, method=method.lower()).drop(columns="state")


flow_keys = tuple((label, *engine.flow_key(f)) for label, f in flow_names.items())
first = next(iter(flow_names.values()), None)
config = first.config if first is not None else None
ready: list[str] = []  # fitted (or kept) now; a fit that must cache hidden states runs in the background meanwhile
for name in with_baselines:
    with engine.engine_errors():
        if engine.get_baseline(name, span, config) is not None:  # cached for trajectories()
            ready.append(name)
baseline_keys = tuple((name, engine.fit_data(config)) for name in ready)
with engine.engine_errors():
    df = progress.with_progress(f"Running the teacher and {len(flow_keys)} flow(s), projecting with {method}",
                                f"trajectories {method} {len(positions)} tokens {len(flow_keys)} flows", trajectories,
                                state.model_spec(), flow_keys, text, tuple(positions), span, int(k), method,
                                bool(centre), baseline_keys)
st.session_state["trajectory_table"] = df
kinds = [kind for kind in dict.fromkeys(df["kind"])
         if show.get(kind[: -len(" (fine)")] if kind.endswith(" (fine)") else kind, True)
         and (fine or not kind.endswith(" (fine)"))]
if not kinds:
    st.warning("All path kinds are switched off.")
else:
    fig = trajectory_figure(df, kinds, axis="PC" if method == "PCA" else "UMAP")
    frame.show_figure(fig, f"trajectories_{m}-{n}", key="traj_fig")
st.caption(f"Span {m}:{n}: the teacher path has {n - m + 1} points (h_{m} … h_{n}); markers of a flow are its k = {k} "
           "Euler steps. Hover a point for the token, position, time t and path kind"
           + ("; every token starts at the same point (its h_m subtracted)." if centre else "."))
with st.expander("The plotted points as a table"):
    frame.show_table(df[df["kind"].isin(kinds)] if kinds else df, f"trajectories_{m}-{n}", key="traj_table")
