"""LFT Explorer: the Streamlit frame (page config, shared state, sidebar, navigation, the path's next link).

Pages live in app/views/ (not pages/: that folder name would switch Streamlit to its older multipage mode, where
AppTest runs a page without this frame), are listed once in app/pages.py, and read the shared choices (model,
corpus, windows, span, text) from st.session_state; see app/state.py for the keys. Run with
``streamlit run app/streamlit_app.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import frame, pages, state  # noqa: E402

ICON = Path(__file__).resolve().parent / "static" / "icon.png"  # served by this server: no icon or font host is asked
st.set_page_config(page_title="LFT Explorer", page_icon=str(ICON), layout="wide")
state.init_state()
state.sync_span_query()
state.sync_text_query()
state.sync_flows_query()
state.sync_linked_query()

NAVIGATION = {page: st.Page(page.file, title=page.title, icon=page.icon, default=page is pages.DEFAULT)
              for page in pages.PAGES}
shown = st.navigation(list(NAVIGATION.values()))
page = next(p for p, entry in NAVIGATION.items() if entry is shown)
frame.visited(page)

with st.sidebar:
    st.toggle("Presenter mode", key=state.PRESENTER, persist_state=state.KEEP, bind="query-params",
              help="For a projector: larger text and plots, technical controls hidden, and the story (span, flows, "
                   "text) fixed.")
    frame.sidebar_status()
    with st.expander("Glossary", icon=":material/menu_book:"):
        frame.glossary()
    st.caption("Latent Flow Transformers, [arXiv 2505.14513](https://arxiv.org/abs/2505.14513)")
if state.presenter():
    st.html(frame.PRESENTER_CSS)
if problem := st.session_state.pop("_link_error", None):
    st.warning(problem)

body, footer = st.container(), st.container()
with footer:  # drawn first, shown last: also under a page that stopped early (st.stop)
    frame.next_page_link(page)
with body:
    shown.run()
