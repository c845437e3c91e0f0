"""Text sources -> fixed-length token windows with a deterministic train / held-out split.

Corpus specs (``DEFAULT`` = ``mix`` is what training and every page use unless told otherwise). The built-in
corpora are files shipped with the engine (``BUILTINS`` names each, with a label and a line on what is inside):

* ``mix``: the broad human-written mixture (``lft_core/data/mix.jsonl.gz``, built by
  ``scripts/build_mix_corpus.py`` from pinned PyPI, npm and Debian packages; ``mix_manifest.json`` lists every
  source with its package, version, licence, sha256 and tokens). Parts: encyclopedic reference, speeches,
  fiction, dialogue, technical prose, source code and the ``english`` texts. ``mix:PART`` is one part alone
  (e.g. ``mix:fiction``): each part is also an evaluation domain.
* ``english``: everyday English shipped with the engine (``lft_core/data/english.jsonl.gz``, ~615k SmolLM2
  tokens in 1,351 texts): stories, explanations, conversations, letters, descriptions and short essays that
  the embedded SmolLM2-135M-Instruct wrote for 85 fixed requests × 16 seeds (``scripts/make_english_corpus.py``
  writes it). A 135M model's prose: fluent and varied, often not factual.
* ``builtin``: the Python reference documentation (``pydoc_data.topics``, ~465k characters, ~110k SmolLM2
  tokens), frozen from CPython 3.11.7 into ``lft_core/data/python_docs.jsonl.gz``
  (``scripts/freeze_python_docs.py``), so it is the same text on every Python.
* ``debian-licences``: the licence texts of Debian's ``/usr/share/common-licenses`` (``LICENCE_FILES``): text
  no corpus of the project ships, read from the machine (an evaluation domain; absent off Debian).
* a path to a ``.txt`` / ``.md`` file, a ``.jsonl`` file (one JSON object a line with a ``"text"`` field;
  bad lines are skipped and counted), or a folder of such files (sorted, recursive).
* ``hf:NAME[:CONFIG]`` a Hugging Face dataset's ``train`` split ``text`` column, when online and the optional
  ``datasets`` package is installed.

The mixture carries its own split: each text (a chunk of ≤ ~2,000 characters) says whether it is held out
(chunk i of each part when i % 10 == 9), and training chunks sharing a word 16-gram with any held-out chunk
were removed when the file was built (``MIX_SPLIT_RULE``). Its windows are cut from the texts of one split,
joined with EOS, in the file's order (interleaved so that every prefix holds each part at its share).

Every other corpus is split by token blocks. Split, then windows: the texts are tokenized (no special
tokens) and joined with the tokenizer's EOS token into one stream. The *stream* is split, once, independently of any
window length: it is cut into blocks of ``SPLIT_BLOCK`` = 512 tokens and block b is held out when b % 10 == 9 (10%,
spread over the whole corpus). Each split's tokens, in order, are then cut into consecutive non-overlapping windows
of ``seq_len`` tokens. So held-out windows of any length contain held-out tokens only, and training windows of any
length never touch them (``SPLIT_RULE`` says so in every flow and result). A window may join the end of one block of
its split to the start of the next, as texts are joined. A corpus needs 10 blocks (5120 tokens) to have held-out
text at all. Texts longer than 256K characters are tokenized in pieces cut after a newline, and only as much of the
corpus as the requested windows need is tokenized.
"""
from __future__ import annotations

import hashlib
import json
import re
import stat
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from lft_core.errors import LFTError

DATA_DIR = Path(__file__).resolve().parent
MIX = "mix"
ENGLISH = "english"
BUILTIN = "builtin"
LICENCES = "debian-licences"
DEFAULT = MIX  # the corpus of every default: training, caches, recoupling, evaluation, the app
MIX_FILE = DATA_DIR / "mix.jsonl.gz"
MIX_MANIFEST = DATA_DIR / "mix_manifest.json"
ENGLISH_FILE = DATA_DIR / "english.jsonl.gz"
PYTHON_DOCS_FILE = DATA_DIR / "python_docs.jsonl.gz"
PYTHON_DOCS_META = DATA_DIR / "python_docs.json"
LICENCE_DIR = Path("/usr/share/common-licenses")
LICENCE_FILES = ("GPL-2", "GPL-3", "LGPL-2.1", "LGPL-3", "Apache-2.0", "MPL-2.0", "Artistic", "GFDL-1.3", "CC0-1.0")
HELDOUT_EVERY = 10  # token block b is held out when b % HELDOUT_EVERY == HELDOUT_EVERY - 1
SPLIT_BLOCK = 512  # tokens per block of the train / held-out split (independent of the window length)
SPLIT_RULE = (f"token stream cut into blocks of {SPLIT_BLOCK}; block b held out when b % {HELDOUT_EVERY} == "
              f"{HELDOUT_EVERY - 1}; windows cut inside each split")
MIX_SPLIT_RULE = (f"each text carries its split (chunk i of each part held out when i % {HELDOUT_EVERY} == "
                  f"{HELDOUT_EVERY - 1}; training chunks sharing a word 16-gram with a held-out chunk removed); "
                  "windows cut inside each split")
MAX_FILE_BYTES = 200 * 1024 * 1024
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".jsonl"}
CHUNK_CHARS = 256 * 1024  # texts are tokenized in pieces of about this many characters (see tokenize_corpus)


class CorpusError(LFTError):
    """The corpus cannot be read or is too short."""


@dataclass(frozen=True)
class Corpus:
    """Texts with an id (what the user named) and a content hash (what the texts are).

    ``splits`` (one "train" / "heldout" per text, or empty) is a corpus's own split (the mixture's); a corpus
    without one is split by token blocks (``SPLIT_RULE``). ``parts`` names each text's part (or is empty)."""

    id: str
    texts: tuple[str, ...]
    content_hash: str
    skipped_lines: int = 0
    sources: tuple[str, ...] = field(default=())
    splits: tuple[str, ...] = field(default=())
    parts: tuple[str, ...] = field(default=())

    @property
    def n_chars(self) -> int:
        return sum(len(t) for t in self.texts)

    @property
    def split_rule(self) -> str:
        """How this corpus's held-out text is chosen (recorded in every cache entry, flow and result)."""
        return MIX_SPLIT_RULE if self.splits else SPLIT_RULE

    def of_split(self, split: str) -> Corpus:
        """The texts of one split (a corpus with its own split only), in order."""
        keep = [t for t, s in zip(self.texts, self.splits) if s == split]
        return Corpus(f"{self.id}[{split}]", tuple(keep), self.content_hash, sources=self.sources)


@dataclass(frozen=True)
class BuiltinCorpus:
    """A corpus shipped with the engine (or, for the licences, read from the machine): its name in specs, the
    label menus show, and one line on what is inside and where it came from."""

    name: str
    label: str
    about: str


BUILTINS: dict[str, BuiltinCorpus] = {c.name: c for c in (
    BuiltinCorpus(MIX, "Built-in broad mixture (human-written)",
                  "human-written text of seven kinds from openly licensed packages: encyclopedic reference (World "
                  "Factbook, FOLDOC, the Jargon File), U.S. State of the Union addresses, Jane Austen's novels, "
                  "dialogue (Shakespeare's plays, ChatterBot conversations), the Debian Administrator's Handbook, "
                  "Python source code, and the everyday-English texts"),
    BuiltinCorpus(ENGLISH, "Built-in everyday English (model-written)",
                  "stories, explanations, conversations and letters that the embedded SmolLM2-135M-Instruct wrote "
                  "for 85 fixed requests"),
    BuiltinCorpus(BUILTIN, "Built-in Python docs",
                  "the Python reference documentation (pydoc topics), frozen from CPython 3.11.7"),
)}
"""The corpora the Setup page offers by name (``debian-licences`` is an evaluation domain, not offered there)."""


def _hash_texts(texts: list[str] | tuple[str, ...], splits: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256()
    for i, t in enumerate(texts):
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
        if splits:
            h.update(splits[i].encode("ascii") + b"\x01")
    return h.hexdigest()[:16]


def _read_jsonl_gz(path: Path, what: str) -> list[dict]:
    """The JSON objects of a shipped gzip JSON-lines file (cached while the file is unchanged)."""
    try:
        info = path.stat()
    except OSError:
        raise CorpusError(f"the built-in {what} {path} is missing; restore it from the repository") from None
    return _read_jsonl_gz_cached(str(path), info.st_mtime_ns, info.st_size, what)


@lru_cache(maxsize=4)
def _read_jsonl_gz_cached(path: str, mtime_ns: int, size: int, what: str) -> list[dict]:
    import gzip

    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
            raise ValueError("a line has no text")
    except (OSError, EOFError, ValueError) as e:
        raise CorpusError(f"the built-in {what} {path} is damaged ({e}); restore it from the repository") from None
    return rows


def _english_texts() -> list[str]:
    texts = [r["text"].strip() for r in _read_jsonl_gz(ENGLISH_FILE, "English corpus")]
    return [t for t in texts if t]


def _builtin_texts() -> list[str]:
    return [r["text"] for r in _read_jsonl_gz(PYTHON_DOCS_FILE, "Python-docs corpus") if r["text"].strip()]


def mix_parts() -> list[str]:
    """The mixture's part names, in the order of its manifest (else of first appearance in the file)."""
    rows = _read_jsonl_gz(MIX_FILE, "mixture corpus")
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(str(r.get("part", "")), None)
    try:
        order = [p["name"] for p in mix_manifest()["parts"]]
    except (CorpusError, KeyError, TypeError):
        order = []
    return [p for p in order if p in seen] + [p for p in seen if p not in order]


def mix_manifest() -> dict:
    """The mixture's manifest: parts (name, kind, share, tokens, sources with package, version, licence,
    sha256, tokens) and totals. CorpusError when it is missing or damaged."""
    try:
        manifest = json.loads(MIX_MANIFEST.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("parts"), list):
            raise ValueError("no parts")
    except (OSError, ValueError) as e:
        raise CorpusError(f"the mixture's manifest {MIX_MANIFEST} is missing or damaged ({e}); restore it from "
                          "the repository") from None
    return manifest


def split_rule_of(spec: str) -> str:
    """The split rule of the corpus a spec names, without reading it (only the mixture carries its own split)."""
    spec = (spec or "").strip() or DEFAULT
    return MIX_SPLIT_RULE if spec == MIX or spec.startswith(MIX + ":") else SPLIT_RULE


def evaluation_domains(spec: str = DEFAULT) -> list[str]:
    """The held-out domains a flow trained on ``spec`` is judged on: each part of the mixture (``mix:PART``) when
    ``spec`` is the mixture, else ``spec`` itself; then the Debian licences (text no corpus ships) when this
    machine has them."""
    spec = (spec or "").strip() or DEFAULT
    domains = [f"{MIX}:{p}" for p in mix_parts()] if spec == MIX else [spec]
    if spec != LICENCES and any((LICENCE_DIR / f).is_file() for f in LICENCE_FILES):
        domains.append(LICENCES)
    return domains


def _load_mix(part: str | None) -> Corpus:
    rows = _read_jsonl_gz(MIX_FILE, "mixture corpus")
    if part is not None:
        parts = mix_parts()
        if part not in parts:
            raise CorpusError(f"the mixture has no part {part!r}: choose one of {', '.join(parts)}")
        rows = [r for r in rows if r.get("part") == part]
    keep = [r for r in rows if r["text"].strip() and r.get("split") in ("train", "heldout")]
    texts = tuple(r["text"] for r in keep)
    splits = tuple(r["split"] for r in keep)
    name = MIX if part is None else f"{MIX}:{part}"
    return Corpus(name, texts, _hash_texts(texts, splits), sources=(str(MIX_FILE),), splits=splits,
                  parts=tuple(str(r.get("part", "")) for r in keep))


def _load_licences() -> Corpus:
    texts, sources = [], []
    for name in LICENCE_FILES:
        path = LICENCE_DIR / name
        if path.is_file():
            texts.append(_read_text_file(path).strip())
            sources.append(str(path))
    if not texts:
        raise CorpusError(f"{LICENCE_DIR} has none of the licence files ({', '.join(LICENCE_FILES)}): the "
                          f"'{LICENCES}' domain needs a Debian machine")
    return Corpus(LICENCES, tuple(texts), _hash_texts(texts), sources=tuple(sources))


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
    if spec == MIX or spec.startswith(MIX + ":"):
        return _load_mix(spec.partition(":")[2] or None)
    if spec == BUILTIN:
        texts = _builtin_texts()
        return Corpus(BUILTIN, tuple(texts), _hash_texts(texts), sources=(str(PYTHON_DOCS_FILE),))
    if spec == ENGLISH:
        texts = _english_texts()
        return Corpus(ENGLISH, tuple(texts), _hash_texts(texts), sources=(str(ENGLISH_FILE),))
    if spec == LICENCES:
        return _load_licences()
    if spec.startswith("hf:"):
        return _load_hf(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus {spec!r} not found: use {', '.join(BUILTINS)}, mix:PART, a .txt/.jsonl file "
                          f"or folder, or hf:NAME")
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
    if corpus.splits:  # the corpus's own split: tokenize that split's texts only
        stream = tokenize_corpus(corpus.of_split(split), tokenizer,
                                 max_tokens=None if n_windows is None else n_windows * seq_len)
        tokens = stream
    else:
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
