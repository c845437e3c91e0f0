"""LFT Explorer: the Streamlit frame (page config, shared sidebar, navigation). Pages live in app/pages/."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="LFT Explorer", page_icon="〰️", layout="wide")

PAGES = [
    st.Page("pages/setup.py", title="Setup & cache", icon="🗂️", default=True),
]
st.navigation(PAGES).run()
