"""Setup: the model and what is cached."""
from __future__ import annotations

import streamlit as st

from app.common import model_spec, teacher_or_error
from lft_core.activations import list_entries

st.title("LFT Explorer")
st.caption(
    "Latent Flow Transformers (Wu et al., 2025) replace a block of layers [m, n) of a language model with one "
    "learned transport layer, a velocity field integrated from h_m to h_n."
)
spec = st.text_input("Model", value=model_spec(), key="model_spec_input",
                     help="smollm2-135m (embedded, offline), a Hugging Face id or a local folder")
st.session_state["model_spec"] = spec.strip() or model_spec()
teacher = teacher_or_error()
if teacher is not None:
    c1, c2, c3 = st.columns(3)
    c1.metric("Blocks (L)", teacher.n_layers)
    c2.metric("d_model", teacher.d_model)
    c3.metric("Family", teacher.family)
st.subheader("Activation cache")
entries = list_entries()
if entries:
    st.dataframe([{"key": e["key"], "layers": len((e["meta"] or {}).get("layers", [])),
                   "MiB": round(e["size_bytes"] / 2**20, 1)} for e in entries], hide_index=True)
else:
    st.info("Nothing cached yet: `python -m lft_core cache` fills the cache.")
