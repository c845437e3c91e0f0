"""The built-in mixture (its own per-text split, parts as evaluation domains), the frozen Python docs, and
evaluation by domain (``eval --domains``, ``domain_table``)."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from lft_core.data import corpus as C
from lft_core.data.corpus import CorpusError, load_corpus, make_windows


def test_the_mixture_is_the_default_with_parts_and_its_own_split():
    mix = load_corpus()
    assert C.DEFAULT == C.MIX and mix.id == C.MIX and mix.split_rule == C.MIX_SPLIT_RULE
    assert len(mix.splits) == len(mix.texts) == len(mix.parts) and set(mix.splits) == {"train", "heldout"}
    parts = C.mix_parts()
    assert len(parts) >= 7 and "english" in parts and set(mix.parts) == set(parts)
    manifest = C.mix_manifest()
    assert [p["name"] for p in manifest["parts"]] == parts
    assert manifest["total_tokens"] >= 5_000_000
    for p in manifest["parts"]:
        assert p["sources"] and all(s["licence"] and len(s["sha256"]) == 64 for s in p["sources"])
    # every part is a domain with both splits, and each part's text is the mixture's text of that part
    fiction = load_corpus("mix:fiction")
    assert fiction.id == "mix:fiction" and set(fiction.parts) == {"fiction"}
    assert set(fiction.splits) == {"train", "heldout"}
    assert fiction.texts == tuple(t for t, p in zip(mix.texts, mix.parts) if p == "fiction")
    assert fiction.content_hash != mix.content_hash


def test_a_part_that_does_not_exist_is_refused_with_the_list():
    with pytest.raises(CorpusError, match="no part 'novels': choose one of .*fiction"):
        load_corpus("mix:novels")


def test_mixture_windows_come_from_their_own_split_only(smol):
    tok = smol.tokenizer
    corpus = load_corpus("mix:dialogue")
    held = make_windows(corpus, tok, 64, 8, "heldout")
    train = make_windows(corpus, tok, 64, 8, "train")
    assert held.shape == train.shape == (8, 64)
    # the held-out windows are the start of the held-out texts' stream, never of the training texts'
    stream = C.tokenize_corpus(corpus.of_split("heldout"), tok, max_tokens=8 * 64)
    assert np.array_equal(held.ravel(), stream[: 8 * 64])
    assert not np.array_equal(train.ravel(), held.ravel())
    # a shorter request is a prefix of a longer one
    assert np.array_equal(make_windows(corpus, tok, 64, 3, "heldout"), held[:3])


def test_every_prefix_of_the_mixture_mixes_its_parts():
    mix = load_corpus()
    first = [p for p, s in zip(mix.parts, mix.splits) if s == "train"][:2000]
    assert len(set(first)) == len(C.mix_parts())  # 256 training windows already see every part


def test_python_docs_are_frozen_in_the_repository():
    meta = json.loads(C.PYTHON_DOCS_META.read_text())
    docs = load_corpus("builtin")
    assert docs.sources == (str(C.PYTHON_DOCS_FILE),) and meta["python"] == "3.11.7"
    with gzip.open(C.PYTHON_DOCS_FILE, "rt", encoding="utf-8") as f:
        topics = [json.loads(line) for line in f]
    assert [t["topic"] for t in topics] == sorted(t["topic"] for t in topics) and len(topics) == meta["topics"]
    assert docs.texts == tuple(t["text"] for t in topics) and docs.n_chars == meta["characters"]
    import hashlib

    assert hashlib.sha256(C.PYTHON_DOCS_FILE.read_bytes()).hexdigest() == meta["sha256"]


def test_evaluation_domains_and_split_rules():
    domains = C.evaluation_domains("mix")
    assert domains[: len(C.mix_parts())] == [f"mix:{p}" for p in C.mix_parts()]
    assert C.evaluation_domains("builtin")[0] == "builtin"
    if (C.LICENCE_DIR / "GPL-3").is_file():
        assert domains[-1] == C.LICENCES
        lic = load_corpus(C.LICENCES)
        assert lic.split_rule == C.SPLIT_RULE and len(lic.texts) >= 5
    assert C.split_rule_of("mix:code") == C.split_rule_of("mix") == C.MIX_SPLIT_RULE
    assert C.split_rule_of("english") == C.split_rule_of("/some/file.txt") == C.SPLIT_RULE


def test_domain_table_has_a_column_per_domain():
    from lft_core.analysis.evaluation import EvalResult, EvalRow, domain_table

    def res(kl: float, best: int) -> EvalResult:
        return EvalResult(span=(2, 4), tokens=10, teacher_ppl=20.0, rows=[
            EvalRow("lft", 3, kl, 30.0, 0.1), EvalRow("skip", 2, kl + 1, 40.0, None, "best", best),
            EvalRow("affine", 0, kl + 2, 50.0, 0.2)])

    table = domain_table({"mix:fiction": res(0.5, 7), "debian-licences": res(0.25, 9)}).splitlines()
    assert table[1].split() == ["model", "mix:fiction", "debian-licences"]
    assert table[2].split() == ["lft", "k=3", "0.5000", "0.2500"]
    assert table[3].split() == ["skip-2", "best", "1.5000", "@7", "1.2500", "@9"]
    assert table[-1].split() == ["teacher", "ppl", "20.00", "20.00"]


def test_cli_eval_by_domain_prints_one_table(tiny_neox, tiny_neox_dir, tmp_path, capsys):
    from lft_core.run.cli import main
    from lft_core.flow.config import TrainConfig
    from lft_core.flow.training import train_flow
    from lft_core.flow.store import read_flow_config

    train_flow(TrainConfig(model=str(tiny_neox_dir), span=(1, 3), steps=1, batch=2, seq_len=16, windows=4,
                           heldout_windows=1, name="t-domains", distill_steps=0), teacher=tiny_neox, verbose=False)
    assert read_flow_config("t-domains")["split_rule"] == C.MIX_SPLIT_RULE  # trained on the default mixture
    out = tmp_path / "d.json"
    rc = main(["eval", "--flow", "t-domains", "--k", "1", "--skip", "1", "--windows", "1", "--seq-len", "16",
               "--domains", "mix:code,mix:fiction,builtin", "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(out.read_text())
    assert list(data["domains"]) == ["mix:code", "mix:fiction", "builtin"]
    assert data["domains"]["mix:code"]["split_rule"] == C.MIX_SPLIT_RULE
    assert data["domains"]["builtin"]["split_rule"] == C.SPLIT_RULE
    kls = {d: next(r["kl"] for r in v["rows"] if r["model"] == "lft") for d, v in data["domains"].items()}
    assert len(set(kls.values())) == 3  # three different texts, three different numbers
    header = next(line for line in captured.out.splitlines() if line.startswith("model"))
    assert header.split() == ["model", "mix:code", "mix:fiction", "builtin"]
    # a mistyped domain is refused before any model loads; --domains with --corpus is refused
    assert main(["eval", "--flow", "t-domains", "--domains", "mix:novels"]) == 2
    assert "no part 'novels'" in capsys.readouterr().err
    assert main(["eval", "--flow", "t-domains", "--domains", "all", "--corpus", "english"]) == 2
    assert "not both" in capsys.readouterr().err
