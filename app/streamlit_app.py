"""LFT Explorer: the Streamlit frame (page config, shared state, sidebar summary, navigation).

Pages live in app/pages/ and read the shared choices (model, corpus, windows, span) from st.session_state;
see app/common.py for the keys. Run with ``streamlit run app/streamlit_app.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import common  # noqa: E402
from lft_core.jobs import list_jobs  # noqa: E402

st.set_page_config(page_title="LFT Explorer", page_icon=":material/waves:", layout="wide")
common.init_state()
common.sync_span_query()

PAGES = [
    st.Page("pages/setup.py", title="Setup & cache", icon=":material/settings:", default=True),
    st.Page("pages/span.py", title="Choose a span", icon=":material/grid_on:"),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/trajectories.py", title="Latent trajectories", icon=":material/timeline:"),
    st.Page("pages/crossings.py", title="Coupling crossings", icon=":material/shuffle:"),
    st.Page("pages/kl.py", title="Per-token KL", icon=":material/format_color_text:"),
    st.Page("pages/compare.py", title="Compare spans", icon=":material/compare_arrows:"),
    st.Page("pages/toy.py", title="Teaching lab (2-D)", icon=":material/science:"),
]
page = st.navigation(PAGES)

with st.sidebar:
    span = st.session_state.get(common.SPAN)
    named = {"builtin": "builtin (Python docs)", "english": "built-in everyday English"}
    corpus = named.get(common.corpus_spec()) or Path(common.corpus_spec()).name
    st.caption(
        f"**Model** `{common.model_spec()}`  \n**Corpus** {corpus}  \n"
        f"**Windows** {common.n_windows()} × {common.seq_len()} tokens  \n"
        f"**Span** {span if span else 'not chosen yet'}"
    )
    running = [j for j in list_jobs() if j.status in ("running", "stopping")]
    if running:
        st.caption(f":material/hourglass_top: {len(running)} background job(s) running: "
                   + ", ".join(j.label for j in running[:3]))
    st.caption("Latent Flow Transformers, [arXiv 2505.14513](https://arxiv.org/abs/2505.14513)")

page.run()
