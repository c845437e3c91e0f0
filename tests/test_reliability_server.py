"""A shared server that no visitor can fill or confuse (issue 24, class 3): saved texts under a quota, with 128-bit
ids, a collision check and repair on re-save; Teaching-lab CSVs parsed within bounds, one line on failure; no
error details in the served app; pages that survive a damaged demo manifest.

Every test here fails on the code before it (texts of 12-hex ids saved for good, CSVs parsed unbounded, the
manifest read with partial type checks). docs/reliability_new_server.md lists the cases.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app_fixtures import APP, SMALL

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache folder of this test's own (texts, demo manifest), with the shared converted models."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "models").symlink_to(REPO / "cache" / "models", target_is_directory=True)
    monkeypatch.setenv("LFT_CACHE_DIR", str(root))
    return root


def open_app(page: str = "home", query: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for key, value in SMALL.items():
        at.session_state[key] = value
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()
    if page != "home":
        at.switch_page(f"views/{page}.py").run()
    return at


# -- saved texts ----------------------------------------------------------------------------------------------


def test_text_ids_are_128_bits_and_old_links_still_read(cache):
    from lft_core.data import texts
    from lft_core.errors import LFTError

    text = "A river runs through it."
    tid = texts.save_text(text)
    assert re.fullmatch(r"[0-9a-f]{32}", tid) and load(tid) == text
    # a link made before 128-bit ids: its file is still read while it exists ...
    import hashlib

    old = "An old link's text."
    old_id = hashlib.sha256(old.encode()).hexdigest()[:12]
    (cache / "texts" / f"{old_id}.txt").write_text(old)
    assert load(old_id) == old
    # ... and once it is gone, the link says so politely
    (cache / "texts" / f"{old_id}.txt").unlink()
    with pytest.raises(LFTError, match="not saved on this server .*removed.*paste the text again"):
        load(old_id)


def load(tid: str) -> str:
    from lft_core.data.texts import load_text

    return load_text(tid)


class _OneDigest:
    """hashlib stand-in whose sha256 gives every text the same digest: two texts forced onto one id."""

    def sha256(self, data: bytes = b""):
        return type("H", (), {"hexdigest": lambda self: "0" * 64})()


def test_two_texts_on_one_id_never_serve_the_wrong_text(cache, monkeypatch):
    from lft_core.data import texts
    from lft_core.errors import LFTError

    monkeypatch.setattr(texts, "hashlib", _OneDigest())
    first = texts.save_text("the first text")
    with pytest.raises(LFTError, match="collision"):
        texts.save_text("the second text")  # same id, other bytes: refused, not saved over the first
    assert texts.load_text(first) == "the first text"
    assert texts.save_text("the first text") == first  # the first one's own re-save is fine


@contextmanager
def _at_most(seconds: int):
    """Fail (instead of hanging) when the block takes longer than ``seconds``."""

    def expire(*_):
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("damage", ["truncated", "edited", "folder", "symlink", "fifo", "oversize"])
def test_a_damaged_text_is_repaired_when_saved_again(cache, damage):
    from lft_core.data import texts
    from lft_core.errors import LFTError

    text = "Every word of this sentence matters to its link."
    tid = texts.save_text(text)
    path = cache / "texts" / f"{tid}.txt"
    path.unlink()
    if damage == "truncated":
        path.write_text(text[:10])
    elif damage == "edited":
        path.write_text(text.replace("word", "ward"))
    elif damage == "folder":
        (path / "inside").mkdir(parents=True)
    elif damage == "symlink":
        (cache / "elsewhere.txt").write_text(text)  # even a link to the right bytes is not followed
        path.symlink_to(cache / "elsewhere.txt")
    elif damage == "fifo":
        os.mkfifo(path)  # reading it would block the page for ever
    else:
        with open(path, "wb") as f:
            f.truncate(texts.MAX_BYTES + 10)
    with _at_most(10):  # the old code blocked for ever on the FIFO
        with pytest.raises(LFTError, match="damaged"):
            texts.load_text(tid)
        assert texts.save_text(text) == tid
        assert path.is_file() and not path.is_symlink() and texts.load_text(tid) == text
    assert (cache / "elsewhere.txt").exists() or damage != "symlink"  # the link's target is left alone


def test_the_store_of_texts_keeps_its_bounds_removing_texts_out_of_use_first(cache, monkeypatch):
    from lft_core.data import texts

    monkeypatch.setattr(texts, "MAX_TEXTS", 8, raising=False)
    folder = cache / "texts"
    now = time.time()
    old = [texts.save_text(f"old text {i}") for i in range(4)]       # out of use: last used 2+ days ago,
    for i, tid in enumerate(old):                                     # old[0] the longest ago
        os.utime(folder / f"{tid}.txt", (now - 3 * 86400 + i, now - 3 * 86400 + i))
    recent = [texts.save_text(f"recent text {i}") for i in range(4)]  # in use (saved just now)
    os.utime(folder / f"{recent[0]}.txt", (now - 3600, now - 3600))
    texts.load_text(old[3])  # opening a text marks it used again: it is in use now
    (folder / f".{old[0]}.txt.123.tmp").write_text("a killed write")
    os.utime(folder / f".{old[0]}.txt.123.tmp", (now - 7200, now - 7200))

    new = [texts.save_text(f"new text {i}") for i in range(3)]
    kept = {p.name[:-4] for p in folder.glob("*.txt")}
    assert len(kept) == 8
    assert kept == set(old[3:] + recent + new[:]) - {old[0], old[1], old[2]} or \
        kept == {old[3], *recent, *new} - {recent[0]}
    assert not set(old[:3]) & kept  # the three out of use went first, oldest first
    assert not list(folder.glob(".*.tmp"))  # and the stale temporary of a killed write
    # only when nothing out of use is left do texts in use go, least recently used first; never the one saved
    monkeypatch.setattr(texts, "MAX_TEXTS", 3, raising=False)
    last = texts.save_text("the newest text")
    kept = {p.name[:-4] for p in folder.glob("*.txt")}
    assert last in kept and len(kept) == 3 and recent[0] not in kept
    # the size bound: one text as large as the whole store keeps only itself
    monkeypatch.setattr(texts, "MAX_TOTAL_BYTES", 5000, raising=False)
    big = texts.save_text("x" * 5000)
    assert {p.name[:-4] for p in folder.glob("*.txt")} == {big}
    assert sum(p.stat().st_size for p in folder.glob("*.txt")) == 5000


def test_a_thousand_texts_stay_within_the_quota(cache, monkeypatch):
    from lft_core.data import texts

    monkeypatch.setattr(texts, "MAX_TEXTS", 50, raising=False)
    for i in range(200):
        texts.save_text(f"visitor text number {i}")
    assert len(list((cache / "texts").glob("*.txt"))) == 50
    assert texts.load_text(texts.text_id("visitor text number 199")) == "visitor text number 199"


def test_links_with_odd_text_ids_are_one_warning(cache):
    from lft_core.data import texts

    saved = texts.save_text("Linked text of the new kind.")
    at = open_app(query={"text": saved})
    assert not at.exception and at.session_state["w_text"] == "Linked text of the new kind."
    for odd, expected in [("abcdefabcdef", "removed"), ("0" * 32, "not saved"), ("<b>x</b>" * 300, "not a text id"),
                          ("../../etc/passwd", "not a text id"), ("", "not a text id"), ("A" * 32, "not a text id")]:
        at = open_app(query={"text": odd})
        assert not at.exception, (odd[:20], [e.value for e in at.exception])
        problem = at.session_state["_text_error"]
        assert expected in problem and "<b>" not in problem and len(problem) < 300, problem


# -- Teaching-lab CSV -------------------------------------------------------------------------------------------


def _rows(n: int) -> str:
    return "x0,y0,x1,y1\n" + "".join(f"{i},{i + 1},{-i},{2 * i}\n" for i in range(n))


@pytest.mark.parametrize("data, message", [
    (b"x0,y0,x1,y1\n" + b"1" * (10 * 1024 * 1024) + b",1,1,1\n", "larger than 2 MB"),
    ("x0,y0,x1,y1\n" + "1" * 200_000 + ",1,1,1\n" + "1,1,1,1\n" * 4, "line 2 has 200,006 characters"),
    (_rows(4) + '"' + "7" * 500 + '",1,1,1\n', "cell of 500 characters"),
    (_rows(4) + '"' + "7\n" * 70_000 + '",1,1,1\n', "not a CSV this lab can read .*field larger than field limit"),
    (_rows(4).replace("1,", "1\x00,", 1), "NUL"),
    ("x0,y0,x1,y1\n" + "1,1,1,1\n" * 200_000, "at most 5000 data rows, got 200000"),
    (_rows(4) + '1,"2\r3",4,5\n' + '"unterminated', "can read|is not a number"),
    ("x,y,u,v\n" + "1,1,1,1\n" * 4, "missing x0, y0, x1, y1"),
    ("x0,x0,y0,x1,y1\n" + "1,1,1,1,1\n" * 4, "column x0 more than once"),
    (_rows(4) + "1_000,1,1,1\n", "'1_000' is not a number"),
    (_rows(4) + "\uff11,1,1,1\n", "is not a number"),
    (_rows(4) + "0x10,1,1,1\n", "is not a number"),
    (_rows(4) + "1,-Infinity,1,1\n", "not finite"),
    (_rows(4) + "1,1,1e309,1\n", "not finite"),
    (_rows(4) + "1,1,1,1e300\n", "larger than 1e\\+06"),
    (",".join(["x0", "y0", "x1", "y1"] + [f"c{i}" for i in range(100)]) + "\n", "at most 64"),
])
def test_a_bad_csv_is_one_line(data, message):
    from lft_core.errors import LFTError
    from lft_core.flow.toy import pairs_from_csv

    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    start = time.perf_counter()
    with pytest.raises(LFTError, match=message) as caught:
        pairs_from_csv(io.BytesIO(raw), name="csv")
    assert time.perf_counter() - start < 5
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_the_lab_page_shows_a_bad_csv_as_one_error_line(cache):
    at = open_app("toy")
    at.selectbox(key="w_toy_dataset").select("upload a CSV").run()
    long_line = b"x0,y0,x1,y1\n" + b"9" * 300_000 + b",1,1,1\n" + b"1,1,1,1\n" * 4
    at.file_uploader(key="w_toy_csv").set_value(("long.csv", long_line, "text/csv")).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1 and "line 2 has 300,006 characters" in at.error[0].value
    assert "/" not in at.error[0].value  # no server path
    at = next(b for b in at.button if b.label.startswith("Train")).click().run()  # pressing Train: the same line
    assert not at.exception and len(at.error) == 1 and "toy_runs" not in at.session_state


def test_the_served_app_shows_no_error_details():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "none"
    make = (REPO / "Makefile").read_text()
    run = make.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "--client.showErrorDetails none" in run


# -- the demo manifest ------------------------------------------------------------------------------------------


def _good_manifest() -> dict:
    from lft_core.run.demo.settings import DemoSettings
    from lft_core.run.demo.status import new_manifest
    from lft_core.run.demo.steps import FlowStep, demo_steps

    settings = DemoSettings()
    steps = demo_steps(settings)
    manifest = new_manifest(settings, steps)
    spans = {"low": {"span": [1, 7], "R": 0.1, "affine_nmse": 0.2},
             "high": {"span": [20, 26], "R": 0.5, "affine_nmse": None}, "rule": "why"}
    manifest.update(spans=spans, cache={"train": "k1", "heldout": "k2"}, grids={"recoupling": "r.json"},
                    flows=[s.plan(settings, spans, "HuggingFaceTB/SmolLM2-135M-Instruct") for s in steps
                           if isinstance(s, FlowStep)])
    return manifest


DAMAGED = {  # each: a change to a whole manifest
    "span-not-a-span": lambda m: m["spans"]["low"].update(span="x"),
    "steps-ints": lambda m: m.update(steps=[1, 2]),
    "seq_len-string": lambda m: m["settings"].update(seq_len="abc"),
    "flow-name-int": lambda m: m.update(flows=[{"name": 5}]),
    "methods-ints": lambda m: m["settings"].update(methods=[5, 6]),
    "methods-lists": lambda m: m["settings"].update(methods=[["sfm"]]),
    "train-list": lambda m: m["settings"].update(train=[1]),
    "flows-null-with-list-step": lambda m: m.update(flows=None, steps=[{"step": [1], "state": "done"}]),
    "step-state-unknown": lambda m: m["steps"][0].update(state="exploded"),
    "R-not-finite": lambda m: m["spans"]["high"].update(R=float("nan")),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_a_damaged_manifest_reads_as_damaged(cache, name):
    from lft_core.run.demo.status import demo_status, manifest_path

    manifest = _good_manifest()
    manifest_path().write_text(json.dumps(manifest))
    assert demo_status().damaged is None  # a manifest as the preparation writes it is whole
    DAMAGED[name](manifest)
    manifest_path().write_text(json.dumps(manifest))
    status = demo_status()
    assert status.line == "demo damaged: prepare again" and status.damaged and not status.ready
    json.dumps(status.to_json())


def test_a_manifest_that_is_not_a_file_or_too_big_reads_as_damaged(cache):
    from lft_core.run.demo.status import MAX_MANIFEST_BYTES, demo_status, manifest_path

    manifest_path().mkdir()
    assert demo_status().line == "demo damaged: prepare again"
    manifest_path().rmdir()
    with open(manifest_path(), "w") as f:
        f.write('{"version": 1, "pad": "')
        f.truncate(MAX_MANIFEST_BYTES + 1)
    start = time.perf_counter()
    assert demo_status().line == "demo damaged: prepare again" and time.perf_counter() - start < 0.5


def test_pages_survive_a_damaged_manifest_and_start_here_offers_to_prepare_again(cache):
    from lft_core.run.demo.status import manifest_path

    manifest = _good_manifest()
    manifest["settings"]["methods"] = [5]  # took down every page: the sidebar drew the steps' labels
    manifest_path().write_text(json.dumps(manifest))
    at = open_app()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Demo damaged: prepare again" in w.value for w in at.warning)
    assert any(b.label == "Prepare the demo" and not b.disabled for b in at.button)
    assert any("demo damaged: prepare again" in c.value for c in at.sidebar.caption)
    at.switch_page("views/toy.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("demo damaged: prepare again" in c.value for c in at.sidebar.caption)
