"""Fixtures shared by the app tests (AppTest and the browser test): a tiny trained flow and a small all-layer
activation cache of the embedded model, both written under the session's LFT_CACHE_DIR.

Import the fixtures into a test module with ``from tests.app_fixtures import *`` (pytest finds them there).
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app" / "streamlit_app.py"
# Small windows keep the analysis pages fast: 8 windows x 32 tokens (248 token pairs without position 0).
SMALL = {"seq_len": 32, "n_windows": 8}
TINY_SPAN = (2, 4)


@pytest.fixture(scope="session")
def tiny_flow(smol) -> dict:
    """A 3-step Flow Walking flow for span 2:4 of the embedded model (a few seconds on CPU)."""
    from lft_core.flow.store import read_flow_config
    from lft_core.flow.config import TrainConfig
    from lft_core.flow.training import train_flow

    from lft_core.flow.store import flows_dir

    # each module that imports this fixture gets its own copy of it: train once, then reuse (a saved flow is
    # never overwritten)
    if not (flows_dir() / "tiny-fw").is_dir():
        train_flow(TrainConfig(span=TINY_SPAN, steps=3, windows=8, heldout_windows=2, seq_len=32, batch=2,
                               eval_every=2, distill_steps=0, name="tiny-fw"), teacher=smol, verbose=False)
    return read_flow_config("tiny-fw")


@pytest.fixture(scope="session")
def small_cache(smol):
    """Every hidden state h_0 ... h_L of 8 training windows x 32 tokens of the default corpus (the app's)."""
    from lft_core.data.activations import ensure_activations
    from lft_core.data.corpus import load_corpus

    return ensure_activations(smol, load_corpus(), SMALL["seq_len"], SMALL["n_windows"],
                              range(smol.n_layers + 1), progress=False)
