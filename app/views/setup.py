"""Setup & cache: the model, the corpus, the windows, and what is in the activation cache."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from app import engine, frame, pages, progress, state
from app.uploads import UPLOAD_LIMIT_MB, save_upload
from lft_core.data.activations import delete_entry, list_entries
from lft_core.paths import cache_dir
from lft_core.data.corpus import BUILTINS, MIX, SPLIT_BLOCK, mix_manifest
from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.model.loading import DEFAULT_MODEL

frame.page_intro(
    pages.SETUP,
    "The model whose blocks are replaced, the text its hidden states are computed on, and the cache of those "
    "hidden states. Every other page uses these choices.",
    "The embedded SmolLM2-135M and the built-in text mixture work offline; hidden states are cached on "
    "disk once and shared by every session.",
)

# -- model ------------------------------------------------------------------------------------------------
st.subheader("Model")


def _use_default() -> None:
    st.session_state[state.MODEL] = DEFAULT_MODEL
    st.session_state["w_model"] = DEFAULT_MODEL


state.persistent_widget("w_model", state.MODEL)
col_model, col_btn = st.columns([4, 1], vertical_alignment="bottom")
col_model.text_input(
    "Model", key="w_model", persist_state=state.KEEP, on_change=state.copy_to(state.MODEL, "w_model"),
    help="`smollm2-135m` is embedded and always works offline; or a Hugging Face id (from the local HF cache "
         "when offline, e.g. EleutherAI/pythia-410m) or a local folder with config.json and safetensors weights.",
)
col_btn.button("Use embedded default", on_click=_use_default, disabled=state.model_spec() == DEFAULT_MODEL)
teacher = engine.teacher_or_error()
if teacher is not None:
    cols = st.columns(4)
    cols[0].metric("Blocks (L)", teacher.n_layers)
    cols[1].metric("Hidden size d", teacher.d_model)
    cols[2].metric("Family", teacher.family)
    cols[3].metric("Parameters", f"{sum(p.numel() for p in teacher.model.parameters()) / 1e6:.0f} M")

# -- corpus -----------------------------------------------------------------------------------------------
st.subheader("Corpus and windows")
BUILT_IN = {c.label: c.name for c in BUILTINS.values()}
SOURCES = [*BUILT_IN, "Upload a file", "Path on this machine"]
UPLOAD, PATH = SOURCES[-2], SOURCES[-1]
uploads = cache_dir("uploads")


def _mixture_sources() -> None:
    """What is inside the mixture and where each part came from (its manifest), in an expander."""
    with engine.engine_errors(stop=False):
        manifest = mix_manifest()
        with st.expander(f"What is inside the mixture ({manifest['total_tokens'] / 1e6:.1f} M tokens) and where "
                         "it came from"):
            st.dataframe(pd.DataFrame([{"part": p["name"], "kind": p["kind"], "share": f"{p['share']:.0%}",
                                        "tokens": f"{p['tokens']['total']:,}"} for p in manifest["parts"]]),
                         hide_index=True, width="stretch")
            st.dataframe(pd.DataFrame([{"part": p["name"], "package": f"{s['package']} {s['version']}",
                                        "from": s["registry"], "licence": s["licence"],
                                        "tokens": f"{s['tokens']:,}", "file": s["file"]}
                                       for p in manifest["parts"] for s in p["sources"]]),
                         hide_index=True, width="stretch")
            st.caption("Built by `scripts/build_mix_corpus.py` from the pinned packages above (manifest: "
                       "`lft_core/data/mix_manifest.json`, with every file's sha256).")


def _source_of(spec: str) -> str:
    spec = spec or DEFAULT_CORPUS
    for label, named in BUILT_IN.items():
        if spec == named:
            return label
    return UPLOAD if Path(spec).parent == uploads else PATH


def _source_changed() -> None:
    chosen = st.session_state["w_corpus_source"]
    if chosen in BUILT_IN:
        st.session_state[state.CORPUS] = BUILT_IN[chosen]


if "w_corpus_source" not in st.session_state:
    st.session_state["w_corpus_source"] = _source_of(state.corpus_spec())
source = st.radio("Text source", SOURCES, key="w_corpus_source", persist_state=state.KEEP, horizontal=True,
                  on_change=_source_changed)
if source in BUILT_IN:
    st.caption(f"Inside: {BUILTINS[BUILT_IN[source]].about}.")
if source == UPLOAD:
    upload = st.file_uploader(
        f"A .txt, .md or .jsonl file (one JSON object a line with a \"text\" field), at most {UPLOAD_LIMIT_MB} MB",
        type=["txt", "md", "jsonl"], max_upload_size=UPLOAD_LIMIT_MB, key="w_upload",
    )
    if upload is not None:
        with engine.engine_errors(stop=False):
            saved = save_upload(upload.name, upload.getvalue())
            st.session_state[state.CORPUS] = str(saved)
elif source == PATH:
    if "w_corpus_path" not in st.session_state:
        st.session_state["w_corpus_path"] = "" if state.corpus_spec() in BUILT_IN.values() else state.corpus_spec()

    def _path_changed() -> None:
        st.session_state[state.CORPUS] = st.session_state["w_corpus_path"].strip() or DEFAULT_CORPUS

    st.text_input("Path to a .txt / .jsonl file or a folder of them", key="w_corpus_path", persist_state=state.KEEP,
                  on_change=_path_changed,
                  placeholder="/data/my_corpus.txt")

corpus = engine.corpus_or_error()
if corpus is not None:
    extra = f", {corpus.skipped_lines} bad lines skipped" if corpus.skipped_lines else ""
    held = ("Every 10th chunk of each part is held out for evaluation (each part is also an evaluation domain), "
            "and training chunks sharing 16 words in a row with held-out text were removed." if corpus.splits else
            f"Every 10th block of {SPLIT_BLOCK} tokens is held out for evaluation, whatever the window length.")
    st.caption(f"Corpus **{Path(corpus.id).name}**: {len(corpus.texts)} texts, {corpus.n_chars:,} characters"
               f"{extra} (content hash `{corpus.content_hash}`). {held}")
    if corpus.id == MIX:
        _mixture_sources()

state.persistent_widget("w_seq_len", state.SEQ_LEN)
state.persistent_widget("w_windows", state.WINDOWS)
col1, col2, col3 = st.columns([1, 1, 2])
col1.number_input("Window length (tokens)", min_value=8, max_value=2048, step=16, key="w_seq_len",
                  persist_state=state.KEEP, on_change=state.copy_to(state.SEQ_LEN, "w_seq_len"))
col2.number_input("Windows to cache", min_value=1, max_value=4096, step=4, key="w_windows", persist_state=state.KEEP,
                  on_change=state.copy_to(state.WINDOWS, "w_windows"),
                  help="Used by the span heatmap and the crossings page (training picks its own count).")
if teacher is not None:
    size = (teacher.n_layers + 1) * state.n_windows() * state.seq_len() * teacher.d_model * 2
    col3.caption(f"All {teacher.n_layers + 1} hidden states h_0 … h_{teacher.n_layers} of "
                 f"{state.n_windows()} × {state.seq_len()} tokens take {size / 2**20:.1f} MiB as float16.")

# -- cache ------------------------------------------------------------------------------------------------
st.subheader("Activation cache")
if teacher is not None and corpus is not None:
    entry = engine.find_cache(teacher, corpus, state.seq_len(), state.n_windows())
    have_all = entry is not None and len(entry.layers) == teacher.n_layers + 1
    if have_all:
        st.success(f"All layers of {state.n_windows()} × {state.seq_len()} tokens are cached (`{entry.key}`).")
    else:
        running = st.session_state.get("_cache_running", False)
        if st.button("Cache all layers", type="primary", disabled=running,
                     help="Runs `python -m lft_core cache ... --layers all` in the background."):
            with engine.engine_errors(stop=False):
                progress.start_cache_job(state.model_spec(), state.corpus_spec(), state.seq_len(), state.n_windows())
progress.cache_jobs_panel()

entries = list_entries()
if state.presenter():
    pass  # the cache listing is a technical control
elif entries:
    rows = []
    for e in entries:
        meta = e["meta"] or {}
        layers = meta.get("layers", [])
        n_total = meta.get("n_layers")
        rows.append({
            "key": e["key"],
            "model": Path(meta.get("model", "?")).name,
            "corpus": Path(meta.get("corpus", "?")).name,
            "split": meta.get("split", "damaged" if e["meta"] is None else "?"),
            "windows": meta.get("windows"),
            "seq_len": meta.get("seq_len"),
            "layers": (f"all {len(layers)}" if n_total is not None and len(layers) == n_total + 1
                       else ", ".join(map(str, layers)) if len(layers) <= 6 else f"{len(layers)} of {n_total + 1}"),
            "MiB": round(e["size_bytes"] / 2**20, 1),
            "updated": (datetime.fromisoformat(meta["updated"]).strftime("%Y-%m-%d %H:%M")
                        if meta.get("updated") else ""),
        })
    table = pd.DataFrame(rows)
    st.caption("Select rows to delete them.")
    event = frame.show_table(table, "activation_cache", key="cache_table", on_select="rerun",
                             selection_mode="multi-row")
    chosen = [rows[i]["key"] for i in event.selection.rows] if event is not None else []
    if chosen and st.button(f"Delete {len(chosen)} selected entr{'y' if len(chosen) == 1 else 'ies'}",
                            icon=":material/delete:"):
        for key in chosen:
            with engine.engine_errors(stop=False):
                delete_entry(key)
        st.rerun()
else:
    st.info("Nothing cached yet. **Cache all layers** above fills the cache for the heatmap and crossings; "
            "training caches what it needs by itself.")
