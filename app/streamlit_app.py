"""LFT Explorer: the Streamlit frame (page config, shared state, sidebar, navigation, the path's next link).

Pages live in app/views/ (not pages/: that folder name would switch Streamlit to its older multipage mode, where
AppTest runs a page without this frame) and read the shared choices (model, corpus, windows, span, text) from st.session_state;
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

st.set_page_config(page_title="LFT Explorer", page_icon=":material/waves:", layout="wide")
common.init_state()
common.sync_span_query()
common.sync_text_query()
common.sync_flows_query()
common.sync_linked_query()

PAGES = [
    st.Page("views/home.py", title=common.HOME, icon=":material/home:", default=True),
    st.Page("views/setup.py", title="Setup & cache", icon=":material/settings:"),
    st.Page("views/span.py", title="Choose a span", icon=":material/grid_on:"),
    st.Page("views/train.py", title="Train", icon=":material/model_training:"),
    st.Page("views/trajectories.py", title="Latent trajectories", icon=":material/timeline:"),
    st.Page("views/crossings.py", title="Coupling crossings", icon=":material/shuffle:"),
    st.Page("views/kl.py", title="Per-token KL", icon=":material/format_color_text:"),
    st.Page("views/compare.py", title="Compare spans", icon=":material/compare_arrows:"),
    st.Page("views/toy.py", title="Teaching lab (2-D)", icon=":material/science:"),
]
page = st.navigation(PAGES)
common.visited(page.title)

with st.sidebar:
    st.toggle("Presenter mode", key=common.PRESENTER, persist_state=common.KEEP, bind="query-params",
              help="For a projector: larger text and plots, technical controls hidden, and the story (span, flows, "
                   "text) fixed.")
    common.sidebar_status()
    with st.expander("Glossary", icon=":material/menu_book:"):
        common.glossary()
    st.caption("Latent Flow Transformers, [arXiv 2505.14513](https://arxiv.org/abs/2505.14513)")
if common.presenter():
    st.html(common.PRESENTER_CSS)
if problem := st.session_state.pop("_link_error", None):
    st.warning(problem)

body, footer = st.container(), st.container()
with footer:  # drawn first, shown last: also under a page that stopped early (st.stop)
    common.next_page_link(page.title)
with body:
    page.run()
