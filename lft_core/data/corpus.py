"""Text sources -> fixed-length token windows with a deterministic train / held-out split.

Corpus specs (``DEFAULT`` = ``english`` is what training and every page use unless told otherwise):

* ``builtin``: the Python reference documentation that ships inside CPython (``pydoc_data.topics``,
  ~465k characters of English prose, ~110k SmolLM2 tokens), topics in sorted order. Always offline.
* ``english``: everyday English shipped with the engine (``lft_core/data/english.jsonl.gz``, ~615k SmolLM2
  tokens in 1,351 texts): stories, explanations, conversations, letters, descriptions and short essays that
  the embedded SmolLM2-135M-Instruct wrote for 85 fixed requests × 16 seeds (``scripts/make_english_corpus.py``
  writes it; the file's texts, in order). Always offline. A 135M model's prose: fluent and varied, often
  not factual; it stands for the text people type, not for any fact.
* a path to a ``.txt`` / ``.md`` file, a ``.jsonl`` file (one JSON object a line with a ``"text"`` field;
  bad lines are skipped and counted), or a folder of such files (sorted, recursive).
* ``hf:NAME[:CONFIG]`` a Hugging Face dataset's ``train`` split ``text`` column, when online and the optional
  ``datasets`` package is installed.

Split, then windows: the texts are tokenized (no special tokens) and joined with the tokenizer's EOS token
into one stream. The *stream* is split, once, independently of any window length: it is cut into blocks of
``SPLIT_BLOCK`` = 512 tokens and block b is held out when b % 10 == 9 (10%, spread over the whole corpus).
Each split's tokens, in order, are then cut into consecutive non-overlapping windows of ``seq_len`` tokens.
So held-out windows of any length contain held-out tokens only, and training windows of any length never
touch them (``SPLIT_RULE`` says so in every flow and result). A window may join the end of one block of its
split to the start of the next, as texts are joined. A corpus needs 10 blocks (5120 tokens) to have held-out
text at all. Texts longer than 256K characters are tokenized in
pieces cut after a newline, and only as much of the corpus as the requested windows need is tokenized.
"""
from __future__ import annotations

import hashlib
import json
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lft_core.errors import LFTError

BUILTIN = "builtin"
ENGLISH = "english"
DEFAULT = ENGLISH  # the corpus of every default: training, caches, recoupling, evaluation, the app
ENGLISH_FILE = Path(__file__).resolve().parent / "english.jsonl.gz"
HELDOUT_EVERY = 10  # token block b is held out when b % HELDOUT_EVERY == HELDOUT_EVERY - 1
SPLIT_BLOCK = 512  # tokens per block of the train / held-out split (independent of the window length)
SPLIT_RULE = (f"token stream cut into blocks of {SPLIT_BLOCK}; block b held out when b % {HELDOUT_EVERY} == "
              f"{HELDOUT_EVERY - 1}; windows cut inside each split")
MAX_FILE_BYTES = 200 * 1024 * 1024
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".jsonl"}
CHUNK_CHARS = 256 * 1024  # texts are tokenized in pieces of about this many characters (see tokenize_corpus)


class CorpusError(LFTError):
    """The corpus cannot be read or is too short."""


@dataclass(frozen=True)
class Corpus:
    """Texts with an id (what the user named) and a content hash (what the texts are)."""

    id: str
    texts: tuple[str, ...]
    content_hash: str
    skipped_lines: int = 0
    sources: tuple[str, ...] = field(default=())

    @property
    def n_chars(self) -> int:
        return sum(len(t) for t in self.texts)


def _hash_texts(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _builtin_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def _english_texts() -> list[str]:
    import gzip

    try:
        with gzip.open(ENGLISH_FILE, "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["text"].strip() for line in f if line.strip()]
    except (OSError, ValueError, KeyError) as e:
        raise CorpusError(f"the built-in English corpus {ENGLISH_FILE} is missing or damaged ({e}); restore it "
                          f"from the repository") from None
    return [t for t in texts if t]


def _read_text_file(path: Path) -> str:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a device, FIFO or socket would read forever or block
            raise CorpusError(f"{path} is not a regular file (a device, pipe or socket): give a text file")
        size = info.st_size
        if size > MAX_FILE_BYTES:
            raise CorpusError(f"{path} is {size / 2**20:.0f} MiB; the limit is {MAX_FILE_BYTES // 2**20} MiB")
        raw = path.read_bytes()
    except PermissionError:
        raise CorpusError(f"{path} cannot be read (permission denied)") from None
    except OSError as e:
        raise CorpusError(f"{path} cannot be read: {e.strerror or e}") from None
    return decode_text(raw, str(path))


def decode_text(raw: bytes, label: str) -> str:
    """``raw`` as UTF-8 text; CorpusError naming ``label`` when it is empty, binary or not UTF-8."""
    if not raw.strip():
        raise CorpusError(f"{label} is empty")
    if b"\x00" in raw[:8192]:
        raise CorpusError(f"{label} looks binary, not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{label} is not UTF-8 text (bad byte at offset {e.start})") from None


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's contents, with the corpus checks (size limit, empty, binary, not UTF-8)."""
    return _read_text_file(Path(path).expanduser())


def _read_jsonl(path: Path) -> tuple[list[str], int]:
    texts, skipped = [], 0
    for line in _read_text_file(path).splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj.get("text") if isinstance(obj, dict) else None
            if isinstance(text, str):
                text.encode("utf-8")  # a lone surrogate ("\ud800") decodes in JSON but is not text
        except (ValueError, RecursionError, UnicodeEncodeError):  # bad JSON, absurd nesting, lone surrogates
            text = None
        if isinstance(text, str) and text.strip():
            texts.append(text.strip())
        else:
            skipped += 1
    if not texts:
        raise CorpusError(f"{path} has no line with a non-empty \"text\" field ({skipped} bad lines)")
    return texts, skipped


def _read_path(path: Path) -> tuple[list[str], int, list[str]]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"folder {path} has no .txt/.md/.rst/.jsonl files")
        texts, skipped = [], 0
        for f in files:
            t, s, _ = _read_path(f)
            texts += t
            skipped += s
        return texts, skipped, [str(f) for f in files]
    if path.suffix.lower() == ".jsonl":
        texts, skipped = _read_jsonl(path)
        return texts, skipped, [str(path)]
    return [_read_text_file(path).strip()], 0, [str(path)]


def load_corpus(spec: str = DEFAULT) -> Corpus:
    """Read a corpus from a spec (see the module docstring; empty means ``DEFAULT``). Raises CorpusError with
    a clear message."""
    spec = (spec or "").strip() or DEFAULT
    if spec == BUILTIN:
        texts = _builtin_texts()
        return Corpus(BUILTIN, tuple(texts), _hash_texts(texts), sources=("pydoc_data.topics",))
    if spec == ENGLISH:
        texts = _english_texts()
        return Corpus(ENGLISH, tuple(texts), _hash_texts(texts), sources=(str(ENGLISH_FILE),))
    if spec.startswith("hf:"):
        return _load_hf(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus {spec!r} not found: use 'builtin', 'english', a .txt/.jsonl file or folder, "
                          f"or hf:NAME")
    texts, skipped, sources = _read_path(path)
    return Corpus(str(path.resolve()), tuple(texts), _hash_texts(texts), skipped, tuple(sources))


def _load_hf(spec: str) -> Corpus:
    parts = spec.split(":")
    name, config = parts[1], (parts[2] if len(parts) > 2 else None)
    try:
        import datasets  # optional dependency
    except ImportError:
        raise CorpusError("hf: corpora need the optional package `datasets` (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, config, split="train")
    except Exception as e:  # the hub raises many kinds; all mean "not available"
        raise CorpusError(f"dataset {name!r} is not available ({type(e).__name__}); are you online?") from None
    if "text" not in ds.column_names:
        raise CorpusError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    texts = [t.strip() for t in ds["text"] if isinstance(t, str) and t.strip()]
    return Corpus(spec, tuple(texts), _hash_texts(texts), sources=(spec,))


_CUTS = (re.compile(r"(?<=\S\n)(?=\S)"), re.compile(r"(?<=\S)(?= \S)"))  # after "x\n" before "y"; before " y"


def _pieces(text: str) -> list[str]:
    """``text`` cut into pieces of at most CHUNK_CHARS characters. A cut falls just after a single newline
    between two non-blank characters (else just before a space between words), where a byte-level BPE
    pre-tokenizer splits anyway, so the pieces' tokens are the whole text's. Texts of at most CHUNK_CHARS
    characters (every built-in topic) are one piece."""
    if len(text) <= CHUNK_CHARS:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = min(start + CHUNK_CHARS, len(text))
        if end < len(text):
            for pattern in _CUTS:
                cut = None
                for match in pattern.finditer(text, start + CHUNK_CHARS // 2, end):
                    cut = match.start()
                if cut is not None:
                    end = cut
                    break
        out.append(text[start:end])
        start = end
    return out


def tokenize_corpus(corpus: Corpus, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """The texts as one int32 token stream, texts joined by the EOS token (if the tokenizer has one).

    Texts are tokenized in pieces of about CHUNK_CHARS characters, in order, and tokenizing stops once the
    stream holds ``max_tokens`` tokens (None: the whole corpus). The stream is the same function of the
    corpus whatever ``max_tokens`` is, so a shorter request returns a prefix of a longer one; a 50 MB text
    asked for two windows tokenizes one piece, not 50 MB (which took ~55 s and ~7 GB of memory at once).
    """
    eos = tokenizer.eos_token_id
    parts: list[np.ndarray] = []
    count = 0
    batch: list[tuple[bool, str]] = []  # (first piece of a text after the first text, piece)
    batch_chars = 0

    def flush() -> None:
        nonlocal count, batch_chars
        encoded = tokenizer([piece for _, piece in batch], add_special_tokens=False)["input_ids"]
        for (starts_text, _), ids in zip(batch, encoded):
            if starts_text and eos is not None:
                parts.append(np.asarray([eos], dtype=np.int32))
                count += 1
            parts.append(np.asarray(ids, dtype=np.int32))
            count += len(ids)
        batch.clear()
        batch_chars = 0

    for i, text in enumerate(corpus.texts):
        for j, piece in enumerate(_pieces(text)):
            batch.append((i > 0 and j == 0, piece))
            batch_chars += len(piece)
            if batch_chars >= CHUNK_CHARS:
                flush()
                if max_tokens is not None and count >= max_tokens:
                    return np.concatenate(parts)
    if batch:
        flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def split_stream(stream: np.ndarray, split: str) -> np.ndarray:
    """The tokens of ``stream`` (shape (N,)) that belong to ``split``, in order: block b = position // SPLIT_BLOCK
    is held out when b % HELDOUT_EVERY == HELDOUT_EVERY - 1, train otherwise."""
    if split not in ("train", "heldout"):
        raise CorpusError(f"split must be 'train' or 'heldout', got {split!r}")
    held = (np.arange(len(stream)) // SPLIT_BLOCK) % HELDOUT_EVERY == HELDOUT_EVERY - 1
    return stream[held] if split == "heldout" else stream[~held]


def _stream_tokens_for(split_tokens: int, split: str) -> int:
    """How many stream tokens surely hold ``split_tokens`` tokens of ``split`` (whole cycles of 10 blocks)."""
    per_cycle = SPLIT_BLOCK * (1 if split == "heldout" else HELDOUT_EVERY - 1)
    cycles = -(-split_tokens // per_cycle)
    return cycles * SPLIT_BLOCK * HELDOUT_EVERY


def make_windows(
    corpus: Corpus, tokenizer, seq_len: int, n_windows: int | None = None, split: str = "train"
) -> np.ndarray:
    """Token windows of one split, shape (n_windows, seq_len), int32, deterministic (see the module docstring).

    ``n_windows=None`` takes every window of the split. Raises CorpusError when the corpus is too short.
    """
    if split not in ("train", "heldout"):
        raise CorpusError(f"split must be 'train' or 'heldout', got {split!r}")
    if seq_len < 2:
        raise CorpusError(f"seq_len must be at least 2, got {seq_len}")
    if n_windows is not None and n_windows < 1:
        raise CorpusError(f"the number of windows must be at least 1, got {n_windows}")
    needed = None if n_windows is None else _stream_tokens_for(n_windows * seq_len, split)
    stream = tokenize_corpus(corpus, tokenizer, max_tokens=needed)
    tokens = split_stream(stream, split)
    total = len(tokens) // seq_len
    if len(stream) < seq_len:
        raise CorpusError(f"corpus {corpus.id!r} has {len(stream)} tokens, fewer than one window of {seq_len}")
    if total == 0 or (n_windows is not None and n_windows > total):
        raise CorpusError(
            f"corpus {corpus.id!r} ({len(stream)} tokens) has {total} {split} windows of {seq_len} "
            f"tokens, {n_windows} were asked for: use fewer windows, a shorter seq_len or a larger corpus"
        )
    windows = tokens[: total * seq_len].reshape(total, seq_len)
    return np.ascontiguousarray(windows[:n_windows] if n_windows is not None else windows)
