"""Latent trajectories: the teacher's path h_m … h_n of chosen tokens, the straight path, and trained flows."""
from __future__ import annotations

import streamlit as st

from app import common as c
from app import figures
from lft_core.span import Span

c.page_intro(
    "Latent trajectories",
    "Through a span the teacher moves each token's hidden state along h_m, h_{m+1}, …, h_n (one point per block). "
    "Flow matching is trained on the **straight path** (1 − t)·h_m + t·h_n; a trained flow takes k Euler steps "
    "from h_m and should land on h_n.",
    "All paths of the chosen tokens are projected together to 2-D (one PCA or UMAP fitted on every point shown).",
)

teacher = c.require_teacher()
span = c.current_span(teacher)
flows = c.flows_for(teacher)
by_label = {f.label: f for f in flows}

if not flows:
    st.info("No flow is trained for this model yet, so only the teacher's path and the straight path are shown. "
            "Train one on the **Train** page (an SFM and an FW flow for the same span make a good comparison).")
    st.page_link("pages/train.py", label="Train a flow", icon=":material/model_training:")
    chosen: list[str] = []
else:
    here = [f for f in flows if f.span == span]
    # one FW and one SFM flow of this span if there are (the best trained of each), else the first two
    best = [max((f for f in here if f.method == method), key=lambda f: f.steps_done or 0, default=None)
            for method in ("fw", "sfm")]
    default = [f.label for f in best if f is not None] or [f.label for f in here[:2]]
    chosen = st.multiselect("Flows to draw (all for one span)", list(by_label), default=default, key="w_traj_flows",
                            help="Flows of the current span are preselected.")
spans = {by_label[label].span for label in chosen}
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

text = st.text_area("Text", value=c.DEFAULT_TEXT, key="w_traj_text", height=80,
                    help="The whole text goes through the model (attention sees the context); "
                         "the first 64 tokens are used.")
if not text.strip():
    st.error("Enter some text: the trajectories are those of its tokens.")
    st.stop()
with c.engine_errors():
    ids = teacher.encode(text, max_tokens=64)
words = teacher.decode_tokens(ids[0])
options = [f"{p}: {w!r}" for p, w in enumerate(words)]
T = len(words)
default_positions = sorted({min(1, T - 1), T // 2, T - 1})
picked = st.multiselect("Tokens", options, default=[options[p] for p in default_positions],
                        key=f"w_traj_tokens_{hash(text)}",
                        help="Position 0 often behaves as an attention sink with a huge norm; it can dwarf the others.")
if not picked:
    st.warning("Pick at least one token.")
    st.stop()
positions = [int(o.split(":", 1)[0]) for o in picked]

col_k, col_proj, col_kinds = st.columns([1, 1, 3])
first_k = (by_label[chosen[0]].k or 3) if chosen else 3
k = col_k.slider("k (flow steps)", 1, 8, first_k, key="w_traj_k", disabled=not chosen)
method = col_proj.radio("Projection", ["PCA", "UMAP"], horizontal=True, key="w_traj_proj")
centre = col_proj.checkbox("Start every token at 0", value=True, key="w_traj_centre",
                           help="Subtract each token's h_m from all its states before projecting, so the picture "
                                "shows how the paths move rather than how far apart the tokens are.")
with_affine = col_proj.checkbox("Affine baseline end point", value=False, key="w_traj_affine",
                                help="Also draw where the closed-form affine replacement of the span sends each "
                                     "token (fitted on the first chosen flow's training windows).")
flow_names = {f"{by_label[label].method.upper()} {by_label[label].name}": by_label[label] for label in chosen}
path_options = ["teacher", "straight"] + list(flow_names) + (["fine curves"] if flow_names else [])
shown = col_kinds.pills("Paths to show", path_options, selection_mode="multi", default=path_options,
                        key=f"w_traj_paths_{abs(hash(tuple(path_options)))}",
                        help="'fine curves': the same flows integrated with 24 small steps (the continuous curve).")
show = {kind: kind in shown for kind in path_options}
fine = show.get("fine curves", False)


@st.cache_data(max_entries=16, show_spinner=False)
def trajectories(spec: str, flow_keys: tuple[tuple[str, str, float], ...], text: str, positions: tuple[int, ...],
                 span: Span, k: int, method: str, centre: bool, affine_key: tuple | None):
    from lft_core.trajectories import centred, project_table, trajectory_table

    teacher = c.get_teacher(spec)
    flows = {label: c.load_flow(name, spec, stamp)[0] for label, name, stamp in flow_keys}
    endpoints = {"affine": c.load_affine(spec, *affine_key)} if affine_key else None
    ids = teacher.encode(text, max_tokens=64)
    df = trajectory_table(teacher, ids, span, list(positions), flows, k=k, fine_steps=24, endpoints=endpoints)
    return project_table(centred(df) if centre else df, method=method.lower()).drop(columns="state")


flow_keys = tuple((label, *c.flow_key(f)) for label, f in flow_names.items())
affine_key = None
if with_affine:
    first = next(iter(flow_names.values()), None)
    config = first.config if first is not None else None
    with c.engine_errors():
        c.get_affine(span, config)  # fitted here, with its spinner; cached for trajectories()
    corpus, length, fit_windows, heldout = c.affine_settings(config)
    affine_key = (corpus, span, length, fit_windows, heldout)
with st.spinner(f"Running the teacher and {len(flow_keys)} flow(s), projecting with {method}..."), c.engine_errors():
    df = trajectories(c.model_spec(), flow_keys, text, tuple(positions), span, int(k), method, bool(centre),
                      affine_key)
st.session_state["trajectory_table"] = df
kinds = [kind for kind in dict.fromkeys(df["kind"])
         if show.get(kind[: -len(" (fine)")] if kind.endswith(" (fine)") else kind, True)
         and (fine or not kind.endswith(" (fine)"))]
if not kinds:
    st.warning("All path kinds are switched off.")
else:
    fig = figures.trajectory_figure(df, kinds, axis="PC" if method == "PCA" else "UMAP")
    c.show_figure(fig, f"trajectories_{m}-{n}", key="traj_fig")
st.caption(f"Span {m}:{n}: the teacher path has {n - m + 1} points (h_{m} … h_{n}); markers of a flow are its k = {k} "
           "Euler steps. Hover a point for the token, position, time t and path kind"
           + ("; every token starts at the same point (its h_m subtracted)." if centre else "."))
with st.expander("The plotted points as a table"):
    c.show_table(df[df["kind"].isin(kinds)] if kinds else df, f"trajectories_{m}-{n}", key="traj_table")
