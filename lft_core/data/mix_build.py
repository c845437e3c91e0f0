"""Building the ``mix`` corpus: chunking, the held-out split, deduplication, share control and interleaving.

Pure functions (no network, no tokenizer) used by ``scripts/build_mix_corpus.py``, which fetches the sources
and extracts their text, and by the tests. The steps, in order:

1. **Chunks.** Each document is normalised (``\\r\\n`` -> ``\\n``, trailing spaces dropped, 3+ newlines -> 2)
   and cut into chunks of at most ``max_chars`` characters at paragraph boundaries (blank lines), else at
   line boundaries, else at spaces (:func:`chunk_document`).
2. **Budget.** A part with ``max_chars`` keeps only its first chunks (documents in their given order) up to
   that many characters, so its size is stated, not accidental (:data:`Part.max_chars`).
3. **Split.** Chunk ``i`` of a part (0-based, over the whole part after the budget) is held out when
   ``i % 10 == 9``, training otherwise (:func:`split_of`).
4. **Exact duplicates.** Chunks equal after whitespace normalisation and lower-casing keep their first
   occurrence only; a held-out occurrence wins over every training one (:func:`dedup_key`).
5. **Held-out contamination.** Every training chunk that shares a word 16-gram (``re.findall(r"\\w+",
   text.lower())``, hashed with blake2b) with any held-out chunk of any part is dropped (:func:`word_ngrams`).
6. **Interleaving.** The kept chunks are ordered by ``((j + 0.5) / n, split, part index)`` where ``j`` counts
   a part's kept chunks of one split and ``n`` is their number, so every prefix of the training stream and of
   the held-out stream holds each part at about its share (:func:`interleave`).

:func:`write_corpus` writes the records as gzip'd JSON lines, byte-identical for identical inputs, and
:func:`build_manifest` describes the result (parts, shares, tokens, sources, rules, the file's sha256).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from lft_core.atomic import atomic_write, file_sha256

HELDOUT_EVERY = 10
NGRAM = 16
CHUNK_CHARS = 2000
TRAIN, HELDOUT = "train", "heldout"

SPLIT_RULE_TEXT = (f"chunk i of each part (0-based, in document order, after the part's character budget) is held "
                   f"out when i % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}, training otherwise")
DEDUP_RULE_TEXT = ("(a) exact duplicates (whitespace-normalised, lower-cased) keep their first occurrence only, held-"
                   "out occurrences first; (b) every training chunk sharing a word 16-gram (re.findall(r'\\w+', "
                   "text.lower()), blake2b-8 of the space-joined words) with any held-out chunk of any part is "
                   "dropped")
INTERLEAVE_RULE_TEXT = ("chunks ordered by ((j + 0.5) / n, split, part index) where j counts a part's kept chunks "
                        "of one split and n is their number: every prefix of each split holds each part at about "
                        "its share")
CHUNK_RULE_TEXT = (f"documents normalised (CRLF -> LF, trailing spaces dropped, 3+ newlines -> 2) and cut into "
                   f"chunks of at most {CHUNK_CHARS} characters at blank lines, else line ends, else spaces")


@dataclass(frozen=True)
class Document:
    """One source document: its text and where it comes from (``source_id``, kept on every chunk)."""

    text: str
    source_id: str


@dataclass
class Part:
    """A part of the mixture: a name, a kind (what sort of text), its documents in order and an optional
    character budget (only the first chunks up to ``max_chars`` characters are kept)."""

    name: str
    kind: str
    documents: list[Document]
    max_chars: int | None = None


@dataclass(frozen=True)
class Record:
    """One chunk of the written corpus."""

    part: str
    split: str
    text: str
    source: str


@dataclass
class PartStats:
    """What happened to a part's chunks."""

    chunks: int = 0  # chunks cut from all documents, before the budget
    chars: int = 0  # characters of those chunks
    dropped_budget: int = 0  # chunks past the part's character budget
    train: int = 0  # kept training chunks
    heldout: int = 0  # kept held-out chunks
    dropped_duplicate: int = 0  # exact duplicates (either split)
    dropped_ngram: int = 0  # training chunks sharing a word 16-gram with a held-out chunk


@dataclass
class MixResult:
    """The interleaved records and the per-part statistics."""

    records: list[Record]
    stats: dict[str, PartStats] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- chunking

def normalise_document(text: str) -> str:
    """CRLF / CR -> LF, trailing spaces of each line dropped, runs of 3+ newlines collapsed to 2."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text)


def _pack(pieces: Sequence[str], sep: str, max_chars: int) -> list[str]:
    """Greedily join ``pieces`` with ``sep`` into strings of at most ``max_chars`` (a longer piece alone)."""
    out: list[str] = []
    cur = ""
    for piece in pieces:
        if not cur:
            cur = piece
        elif len(cur) + len(sep) + len(piece) <= max_chars:
            cur = cur + sep + piece
        else:
            out.append(cur)
            cur = piece
    if cur:
        out.append(cur)
    return out


def _split_long(text: str, max_chars: int, level: int) -> list[str]:
    """Cut ``text`` at paragraphs (level 0), lines (1), spaces (2), else hard cuts, to pieces <= max_chars."""
    if len(text) <= max_chars:
        return [text]
    if level >= 3:
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    sep = ("\n\n", "\n", " ")[level]
    pieces: list[str] = []
    for piece in text.split(sep):
        pieces.extend(_split_long(piece, max_chars, level + 1) if len(piece) > max_chars else [piece])
    return _pack(pieces, sep, max_chars)


def _clean_chunk(chunk: str) -> str:
    """Drop surrounding blank lines and trailing whitespace; keep the first line's indentation (code)."""
    return re.sub(r"\A(?:[ \t]*\n)+", "", chunk).rstrip()


def chunk_document(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut one document into chunks of at most ``max_chars`` characters.

    The text is normalised (:func:`normalise_document`), then cut at paragraph boundaries (blank lines);
    a paragraph longer than ``max_chars`` is cut at line ends, a line at spaces, a word by hard cuts.
    Neighbouring pieces are packed greedily. Each chunk loses its surrounding blank lines and trailing
    whitespace (the first line's indentation is kept, for code); empty chunks are dropped.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    chunks = (_clean_chunk(c) for c in _split_long(normalise_document(text), max_chars, 0))
    return [c for c in chunks if c.strip()]


# ---------------------------------------------------------------------------------- split and dedup keys

def split_of(i: int) -> str:
    """The split of a part's chunk ``i``: held out when ``i % 10 == 9``."""
    return HELDOUT if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else TRAIN


def dedup_key(text: str) -> str:
    """The exact-duplicate key: whitespace runs -> one space, lower case."""
    return " ".join(text.split()).lower()


def words_of(text: str) -> list[str]:
    """The words of the n-gram check: ``re.findall(r"\\w+", text.lower())``."""
    return re.findall(r"\w+", text.lower())


def _hash_words(words: Sequence[str]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=8).digest(), "big")


def word_ngrams(text: str, n: int = NGRAM) -> set[int]:
    """The stable 64-bit hashes (blake2b) of the text's word ``n``-grams (none when it has fewer words)."""
    w = words_of(text)
    return {_hash_words(w[i:i + n]) for i in range(len(w) - n + 1)}


def shared_ngram_rate(train_texts: Iterable[str], heldout_texts: Iterable[str], n: int = NGRAM) -> float:
    """The fraction of training texts that share at least one word ``n``-gram with the held-out texts."""
    held: set[int] = set()
    for t in heldout_texts:
        held |= word_ngrams(t, n)
    total = shared = 0
    for t in train_texts:
        total += 1
        if not held.isdisjoint(word_ngrams(t, n)):
            shared += 1
    return shared / total if total else 0.0


# ------------------------------------------------------------------------------------------ the mixture

@dataclass
class _Chunk:
    part: int
    index: int  # within its part, after the budget
    text: str
    source: str
    split: str
    keep: bool = True


def _budgeted_chunks(part: Part, pi: int, max_chunk_chars: int, stats: PartStats) -> list[_Chunk]:
    out: list[_Chunk] = []
    used = 0
    over = False
    for doc in part.documents:
        for text in chunk_document(doc.text, max_chunk_chars):
            stats.chunks += 1
            stats.chars += len(text)
            if over or (part.max_chars is not None and used + len(text) > part.max_chars):
                over = True
                stats.dropped_budget += 1
                continue
            used += len(text)
            i = len(out)
            out.append(_Chunk(pi, i, text, doc.source_id, split_of(i)))
    return out


def interleave(streams: Sequence[Sequence[object]]) -> list[tuple[int, int]]:
    """The merged order of several streams as ``(stream index, position)`` pairs: item ``j`` of stream ``p``
    (of ``n_p`` items) sorts by ``((j + 0.5) / n_p, p)``, so every prefix holds each stream at about its share."""
    keys = [((j + 0.5) / len(s), p, j) for p, s in enumerate(streams) for j in range(len(s))]
    keys.sort()
    return [(p, j) for _, p, j in keys]


def build_mix(parts: Sequence[Part], max_chunk_chars: int = CHUNK_CHARS, n: int = NGRAM) -> MixResult:
    """Chunk, budget, split, deduplicate and interleave ``parts`` (see the module's docstring)."""
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"part names repeat: {names}")
    stats = {p.name: PartStats() for p in parts}
    per_part = [_budgeted_chunks(p, pi, max_chunk_chars, stats[p.name]) for pi, p in enumerate(parts)]
    everything = [c for chunks in per_part for c in chunks]

    # (a) exact duplicates: held-out chunks first (in part order), then training chunks.
    seen: set[str] = set()
    for c in [c for c in everything if c.split == HELDOUT] + [c for c in everything if c.split == TRAIN]:
        key = dedup_key(c.text)
        if key in seen:
            c.keep = False
            stats[parts[c.part].name].dropped_duplicate += 1
        else:
            seen.add(key)

    # (b) training chunks sharing a word n-gram with any kept held-out chunk.
    held: set[int] = set()
    for c in everything:
        if c.keep and c.split == HELDOUT:
            held |= word_ngrams(c.text, n)
    for c in everything:
        if c.keep and c.split == TRAIN and not held.isdisjoint(word_ngrams(c.text, n)):
            c.keep = False
            stats[parts[c.part].name].dropped_ngram += 1

    # interleave: one stream per (split, part); every prefix of each split holds each part at its share.
    streams: list[list[_Chunk]] = []
    for split in (TRAIN, HELDOUT):
        for pi, chunks in enumerate(per_part):
            kept = [c for c in chunks if c.keep and c.split == split]
            setattr(stats[parts[pi].name], split, len(kept))
            streams.append(kept)
    order = interleave(streams)
    records = [Record(parts[streams[s][j].part].name, streams[s][j].split, streams[s][j].text,
                      streams[s][j].source) for s, j in order]
    return MixResult(records, stats)


# ------------------------------------------------------------------------------------------- the files

def write_corpus(records: Iterable[Record], path: str | os.PathLike[str]) -> str:
    """Write ``records`` as gzip'd JSON lines (sorted keys, compact, UTF-8; gzip mtime 0, level 9), atomically
    (``atomic.atomic_write``). The same records give a byte-identical file. Returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9,
                                                   mtime=0) as gz:
            for r in records:
                row = {"part": r.part, "split": r.split, "text": r.text, "source": r.source}
                gz.write((json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
                          + "\n").encode("utf-8"))
        os.chmod(tmp, 0o644)

    atomic_write(path, fill)
    return file_sha256(path)


def read_corpus(path: str | os.PathLike[str]) -> list[Record]:
    """The records of a corpus file written by :func:`write_corpus`."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Record(r["part"], r["split"], r["text"], r["source"]) for r in rows]


def source_of(record_source: str, source_ids: Iterable[str]) -> str | None:
    """The manifest source a record's ``source`` belongs to: the id equal to it or the longest id it starts
    with followed by ``:`` (records may name a file inside the source: ``ID:path``)."""
    best = None
    for sid in source_ids:
        if (record_source == sid or record_source.startswith(sid + ":")) and (best is None or len(sid) > len(best)):
            best = sid
    return best


def build_manifest(parts: Sequence[Part], result: MixResult, sources: Mapping[str, Sequence[Mapping[str, object]]],
                   count_tokens: Callable[[str], int], tokenizer: str, corpus_path: str | os.PathLike[str],
                   corpus_name: str = "mix") -> dict:
    """The manifest of a written mixture.

    ``sources`` maps each part name to its sources, dicts the caller fills (registry, package, version, file,
    licence, archive_sha256, file_sha256, ...) with an ``id`` that the records' ``source`` equals or starts
    with (``ID:path``); each gets ``tokens`` (of its kept chunks) added here, and ``sha256`` (= its
    ``archive_sha256``) when the caller gave none. Per part: name, kind, share (of
    all tokens, 3 decimals), max_chars, tokens (total, train, heldout), chunks (train, heldout, budget /
    duplicate / n-gram drops) and sources. Then totals (also ``total_tokens``), the rules, the tokenizer's
    name and the corpus file's name and sha256. Tokens are counted with ``count_tokens`` on each kept chunk.
    """
    by_part: dict[str, dict[str, int]] = {p.name: {TRAIN: 0, HELDOUT: 0} for p in parts}
    by_source: dict[str, int] = {}
    all_ids = [str(s["id"]) for p in parts for s in sources.get(p.name, ())]
    for r in result.records:
        n = count_tokens(r.text)
        by_part[r.part][r.split] += n
        sid = source_of(r.source, [str(s["id"]) for s in sources.get(r.part, ())])
        if sid is None:
            raise ValueError(f"record source {r.source!r} of part {r.part!r} matches no listed source")
        by_source[sid] = by_source.get(sid, 0) + n
    total = sum(v[TRAIN] + v[HELDOUT] for v in by_part.values())
    out_parts = []
    for p in parts:
        st = result.stats[p.name]
        tok = by_part[p.name]
        srcs = []
        for s in sources.get(p.name, ()):
            entry = dict(s)
            entry["tokens"] = by_source.get(str(s["id"]), 0)
            if "sha256" not in entry and "archive_sha256" in entry:
                entry["sha256"] = entry["archive_sha256"]  # the short name the readers of the manifest use
            srcs.append(entry)
        out_parts.append({
            "name": p.name, "kind": p.kind, "max_chars": p.max_chars,
            "share": round((tok[TRAIN] + tok[HELDOUT]) / total, 3) if total else 0.0,
            "tokens": {"total": tok[TRAIN] + tok[HELDOUT], "train": tok[TRAIN], "heldout": tok[HELDOUT]},
            "chunks": {"train": st.train, "heldout": st.heldout, "dropped_duplicate": st.dropped_duplicate,
                       "dropped_ngram": st.dropped_ngram, "dropped_budget": st.dropped_budget,
                       "cut": st.chunks},
            "sources": srcs,
        })
    if len(set(all_ids)) != len(all_ids):
        raise ValueError("source ids repeat")
    corpus_path = Path(corpus_path)
    return {
        "name": corpus_name,
        "corpus_file": corpus_path.name,
        "corpus_sha256": file_sha256(corpus_path),
        "tokenizer": tokenizer,
        "total_tokens": total,
        "chunk_rule": CHUNK_RULE_TEXT,
        "split_rule": SPLIT_RULE_TEXT,
        "dedup_rule": DEDUP_RULE_TEXT,
        "interleave_rule": INTERLEAVE_RULE_TEXT,
        "totals": {
            "tokens": {"total": total, "train": sum(v[TRAIN] for v in by_part.values()),
                       "heldout": sum(v[HELDOUT] for v in by_part.values())},
            "chunks": {"train": sum(s.train for s in result.stats.values()),
                       "heldout": sum(s.heldout for s in result.stats.values()),
                       "dropped_duplicate": sum(s.dropped_duplicate for s in result.stats.values()),
                       "dropped_ngram": sum(s.dropped_ngram for s in result.stats.values()),
                       "dropped_budget": sum(s.dropped_budget for s in result.stats.values())},
        },
        "parts": out_parts,
    }
