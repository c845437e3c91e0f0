"""Shared state and cached resources for the pages (the only app module that loads engine objects)."""
from __future__ import annotations

import streamlit as st

from lft_core.errors import LFTError
from lft_core.teacher import DEFAULT_MODEL, load_teacher


@st.cache_resource(show_spinner="Loading the model (the first time converts the embedded GGUF, ~20 s)...")
def get_teacher(spec: str):
    """One teacher per model spec per server process; never mutated by pages."""
    return load_teacher(spec)


def model_spec() -> str:
    return st.session_state.get("model_spec", DEFAULT_MODEL)


def teacher_or_error():
    """The chosen teacher, or None after showing a clear error in the page."""
    try:
        return get_teacher(model_spec())
    except LFTError as e:
        st.error(str(e))
        return None
