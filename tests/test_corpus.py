"""Corpus: the built-in source, files, deterministic windows and split, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lft_core.data.corpus import CorpusError, load_corpus, make_windows, tokenize_corpus


def test_builtin_is_large_and_deterministic(smol):
    a, b = load_corpus("builtin"), load_corpus("builtin")
    assert a.content_hash == b.content_hash and a.id == "builtin"
    assert len(tokenize_corpus(a, smol.tokenizer)) >= 100_000
    w1 = make_windows(a, smol.tokenizer, 64, 20)
    w2 = make_windows(b, smol.tokenizer, 64, 20)
    assert w1.shape == (20, 64) and np.array_equal(w1, w2)


def test_train_and_heldout_are_disjoint(smol):
    c = load_corpus("builtin")
    train = make_windows(c, smol.tokenizer, 128)
    held = make_windows(c, smol.tokenizer, 128, split="heldout")
    assert len(held) > 0 and len(train) > 8 * len(held)
    seen = {w.tobytes() for w in train}
    assert not any(w.tobytes() in seen for w in held)


def test_files_and_folders(tmp_path, smol):
    (tmp_path / "a.txt").write_text("Hello world. " * 400)
    lines = [json.dumps({"text": "Line number %d is here." % i}) for i in range(300)] + ["{bad json", '{"x": 1}']
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    c = load_corpus(str(tmp_path))
    assert len(c.texts) == 301 and c.skipped_lines == 2
    assert make_windows(c, smol.tokenizer, 32, 4).shape == (4, 32)
    assert load_corpus(str(tmp_path / "a.txt")).content_hash != c.content_hash


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"   \n", "empty"), (b"\x00\x01\x02binary" * 10, "binary"), (b"caf\xe9 " * 50, "not UTF-8")],
)
def test_bad_files(tmp_path, content, message):
    p = tmp_path / "x.txt"
    p.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus(str(p))


def test_missing_and_short(tmp_path, smol):
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(str(tmp_path / "nope.txt"))
    p = tmp_path / "short.txt"
    p.write_text("Just a few words.")
    with pytest.raises(CorpusError, match="fewer than one window"):
        make_windows(load_corpus(str(p)), smol.tokenizer, 128)
    with pytest.raises(CorpusError, match="windows"):
        make_windows(load_corpus("builtin"), smol.tokenizer, 128, 100_000)
    (tmp_path / "empty.jsonl").write_text('{"title": 1}\n')
    with pytest.raises(CorpusError, match="no line"):
        load_corpus(str(tmp_path / "empty.jsonl"))


class _PositionTokenizer:
    """A stand-in tokenizer whose token ids are the characters' positions in the corpus (each character of the
    corpus is a distinct code point), so a window tells exactly which part of the text it holds."""

    BASE = 0x4E00
    eos_token_id = None

    def __call__(self, pieces, add_special_tokens=False):
        return {"input_ids": [[ord(ch) - self.BASE for ch in piece] for piece in pieces]}


def test_heldout_text_never_reaches_training_at_any_window_length():
    from lft_core.data.corpus import HELDOUT_EVERY, SPLIT_BLOCK, Corpus

    n = 30 * SPLIT_BLOCK + 77
    text = "".join(chr(_PositionTokenizer.BASE + i) for i in range(n))
    corpus = Corpus("positions", (text,), "h")
    tok = _PositionTokenizer()
    held_block = lambda p: (p // SPLIT_BLOCK) % HELDOUT_EVERY == HELDOUT_EVERY - 1  # noqa: E731
    heldout_seen, train_seen = set(), set()
    for seq_len in (16, 50, 64, 128, 300, 512, 700):
        train = make_windows(corpus, tok, seq_len, split="train")
        held = make_windows(corpus, tok, seq_len, split="heldout")
        assert not any(held_block(p) for p in train.ravel()), seq_len
        assert all(held_block(p) for p in held.ravel()), seq_len
        train_seen |= set(train.ravel().tolist())
        heldout_seen |= set(held.ravel().tolist())
        # a request for fewer windows is a prefix of the full split (the stream is tokenized only as needed)
        assert np.array_equal(make_windows(corpus, tok, seq_len, 2, split="heldout"), held[:2])
    assert not train_seen & heldout_seen
    assert len(heldout_seen) >= 0.9 * 3 * SPLIT_BLOCK  # the 3 held-out blocks are used


def test_split_rule_is_recorded(tiny_neox, tiny_neox_dir):
    from lft_core.data.corpus import MIX_SPLIT_RULE, SPLIT_RULE
    from lft_core.analysis.evaluation import eval_windows, evaluate
    from lft_core.flow.store import read_flow_config
    from lft_core.flow.config import TrainConfig
    from lft_core.flow.training import train_flow

    train_flow(TrainConfig(model=str(tiny_neox_dir), span=(1, 3), steps=1, batch=2, seq_len=16, windows=4,
                           heldout_windows=1, name="t-split-rule", distill_steps=0), teacher=tiny_neox, verbose=False)
    assert read_flow_config("t-split-rule")["split_rule"] == MIX_SPLIT_RULE  # the default corpus: the mixture
    ids = eval_windows(tiny_neox, "builtin", None, 1, 16)
    assert evaluate(tiny_neox, None, (1, 3), ids, ks=[], skips=[1], best_skip=False).to_json()["split_rule"] == SPLIT_RULE


def test_the_built_in_english_corpus_is_large_varied_and_split(smol):
    from lft_core.data.corpus import ENGLISH_FILE

    corpus = load_corpus("english")
    assert corpus.id == "english" and corpus.sources == (str(ENGLISH_FILE),)
    assert len(corpus.texts) > 1000 and load_corpus("english").content_hash == corpus.content_hash
    prompts = {json.loads(line)["prompt"] for line in __import__("gzip").open(ENGLISH_FILE, "rt")}
    assert len(prompts) >= 80  # stories, explanations, conversations, letters, descriptions, essays
    tokens = sum(len(t) for t in smol.tokenizer(list(corpus.texts), add_special_tokens=False)["input_ids"])
    assert tokens >= 500_000
    held = make_windows(corpus, smol.tokenizer, 128, 400, "heldout")
    train = make_windows(corpus, smol.tokenizer, 128, 400, "train")
    assert held.shape == train.shape == (400, 128)
    assert not ({tuple(w) for w in held} & {tuple(w) for w in train})
