"""Shared fixtures: offline hub, a per-session cache folder, the embedded model, tiny random models."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SLOW = os.environ.get("LFT_SLOW") == "1"
"""LFT_SLOW=1 (`make test-slow`) also runs the tests marked ``@pytest.mark.slow``: long integration runs whose
points a quicker test of the default run covers too (each one's docstring names it). `make test` skips them, so
that it stays within 6 minutes on 2 cores."""


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: a long integration run, only with LFT_SLOW=1 (make test-slow)")


def pytest_collection_modifyitems(config, items) -> None:
    if SLOW:
        return
    skip = pytest.mark.skip(reason="long integration run: LFT_SLOW=1 (make test-slow) runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    """Every test writes under a fresh cache folder; the converted embedded model is shared with the repo's
    cache/models (converting it takes ~20 s, and it is the same file for everyone)."""
    root = tmp_path_factory.mktemp("lft-cache")
    os.environ["LFT_CACHE_DIR"] = str(root)
    shared_models = REPO / "cache" / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(shared_models, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def smol():
    from lft_core.model.loading import load_teacher

    return load_teacher("smollm2-135m")


def _tokenizer_folder() -> Path:
    from lft_core.model.loading import embedded_model_folder

    return embedded_model_folder("smollm2-135m")


def make_tiny_model(folder: Path, family: str) -> Path:
    """A small random model of a family (GPT-NeoX, GPT-2 or Llama) saved as a local folder, with the
    embedded model's tokenizer. No download."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    torch.manual_seed(0)
    vocab = 49152
    if family == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=256, max_position_embeddings=256, rotary_pct=0.25,
                            bos_token_id=0, eos_token_id=0)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    for f in _tokenizer_folder().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-neox"), "gpt_neox")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_neox(tiny_neox_dir):
    from lft_core.model.loading import load_teacher

    return load_teacher(str(tiny_neox_dir))
