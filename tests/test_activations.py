"""Activation cache: equals a plain forward pass, computes only what is missing, survives crashes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lft_core.data.activations import CacheError, ensure_activations, open_activations, parse_layers
from lft_core.data.corpus import load_corpus, make_windows
from lft_core.run.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3, 4]
    assert parse_layers("1:3", 4) == [1, 2, 3]
    assert parse_layers("3,0,3", 4) == [0, 3]
    for bad in ["5", "3:1", "a,b", ""]:
        with pytest.raises(CacheError):
            parse_layers(bad, 4)


def test_cache_matches_forward_pass_and_hits(smol, tmp_path):
    corpus = load_corpus("builtin")
    c1 = ensure_activations(smol, corpus, 32, 4, [0, 6], progress=False, root=tmp_path)
    assert not c1.hit and c1.computed_layers == (0, 6)
    c2 = ensure_activations(smol, corpus, 32, 4, [0, 6, 12, 30], progress=False, root=tmp_path)
    assert c2.key == c1.key and c2.computed_layers == (12, 30)  # only the missing ones
    with pytest.MonkeyPatch.context() as mp:  # a hit must not run the model
        mp.setattr(smol, "hidden_states", lambda *a, **k: pytest.fail("the model ran on a cache hit"))
        c3 = ensure_activations(smol, corpus, 32, 4, [6, 30], progress=False, root=tmp_path)
    assert c3.hit and c3.computed_layers == ()
    windows = make_windows(corpus, smol.tokenizer, 32, 4)
    assert np.array_equal(c3.tokens, windows)
    ref = smol.hidden_states(torch.from_numpy(windows.astype(np.int64)), [0, 6, 12, 30])
    for i in [0, 6, 12, 30]:
        got = torch.from_numpy(np.asarray(c3.layer(i), dtype=np.float32))
        assert got.shape == (4, 32, 576)
        torch.testing.assert_close(got, ref[i], rtol=2e-3, atol=2e-3)
    meta = json.loads((c3.dir / "meta.json").read_text())
    assert meta["layers"] == [0, 6, 12, 30] and meta["dtype"] == "float16"


def test_crash_mid_write_is_rebuilt(tiny_neox, tmp_path, monkeypatch):
    corpus = load_corpus("builtin")
    ensure_activations(tiny_neox, corpus, 16, 16, [0], progress=False, root=tmp_path, batch_size=4)
    real = tiny_neox.hidden_states
    calls = {"n": 0}

    def dying(ids, layers):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill mid-write")
        return real(ids, layers)

    monkeypatch.setattr(tiny_neox, "hidden_states", dying)
    with pytest.raises(KeyboardInterrupt):
        ensure_activations(tiny_neox, corpus, 16, 16, [0, 2], progress=False, root=tmp_path, batch_size=4)
    monkeypatch.setattr(tiny_neox, "hidden_states", real)
    entry = open_activations(next(p for p in tmp_path.iterdir() if p.is_dir()))
    assert entry.layers == [0]  # the half-written layer 2 does not count
    # a killed process cannot clean up: leave a partial file behind as SIGKILL would
    (entry.dir / "layer_02.npy.partial").write_bytes(b"\x93NUMPY half")
    again = ensure_activations(tiny_neox, corpus, 16, 16, [0, 2], progress=False, root=tmp_path, batch_size=4)
    assert again.computed_layers == (2,) and not list(again.dir.glob("*.partial"))
    assert np.isfinite(np.asarray(again.layer(2), dtype=np.float32)).all()


def test_short_layer_file_and_missing_meta_are_rebuilt(tiny_neox, tmp_path):
    corpus = load_corpus("builtin")
    c = ensure_activations(tiny_neox, corpus, 16, 8, [0, 1], progress=False, root=tmp_path)
    good = np.asarray(c.layer(1)).copy()
    f = c.dir / "layer_01.npy"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    with pytest.raises(CacheError, match="damaged"):
        open_activations(c.dir)
    again = ensure_activations(tiny_neox, corpus, 16, 8, [0, 1], progress=False, root=tmp_path)
    assert again.computed_layers == (1,) and np.array_equal(np.asarray(again.layer(1)), good)
    (c.dir / "meta.json").unlink()
    with pytest.raises(CacheError, match="missing or damaged"):
        open_activations(c.dir)
    rebuilt = ensure_activations(tiny_neox, corpus, 16, 8, [0, 1], progress=False, root=tmp_path)
    assert rebuilt.computed_layers == (0, 1)


def test_refuses_when_disk_is_full(tiny_neox, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with pytest.raises(CacheError, match="GiB is free"):
        ensure_activations(tiny_neox, load_corpus("builtin"), 16, 8, [0, 1], progress=False, root=tmp_path)
    assert not [f for p in tmp_path.iterdir() if p.is_dir() for f in p.glob("layer_*")]


def test_bad_requests(tiny_neox, tmp_path):
    corpus = load_corpus("builtin")
    with pytest.raises(CacheError, match="context"):
        ensure_activations(tiny_neox, corpus, 100_000, 2, [0], progress=False, root=tmp_path)
    with pytest.raises(CacheError, match="layers"):
        ensure_activations(tiny_neox, corpus, 16, 2, [9], progress=False, root=tmp_path)


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "lft_core", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_cache_json_and_errors(tiny_neox_dir, tmp_path, capsys):
    out = tmp_path / "out.json"
    args = ["cache", "--model", str(tiny_neox_dir), "--seq-len", "16", "--windows", "8", "--layers", "0,2,4",
            "--json", str(out)]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    first = json.loads(out.read_text())
    assert set(first) >= {"key", "dir", "layers", "windows", "seq_len", "d_model", "hit", "seconds",
                          "tokens_per_second"}
    assert first["hit"] is False and first["layers"] == [0, 2, 4] and first["d_model"] == 64
    assert np.load(Path(first["dir"]) / "layer_02.npy", mmap_mode="r").shape == (8, 16, 64)
    files = sorted(Path(first["dir"]).glob("*.npy"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert main(args) == 0  # the hit and the bad layer run in-process (the same main); the first call was real
    second = json.loads(out.read_text())
    # a hit rewrites nothing (timings on this 64-wide model are noise; the embedded-model hit is timed in BENCHMARKS)
    assert second["hit"] is True and second["key"] == first["key"]
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert main(["cache", "--model", str(tiny_neox_dir), "--layers", "7"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: layers [7]") and "Traceback" not in err
