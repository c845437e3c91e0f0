"""Hardening: bad inputs to the CLI and the engine, and the security contracts (docs/RELIABILITY.md).

Every bad input ends in ONE clear line: the engine raises an ``LFTError`` subclass; the CLI prints
``error: ...`` (argparse: ``python -m lft_core CMD: error: ...``) as its last stderr line, exits 2, never shows
a traceback, and leaves every existing cache entry and flow byte-for-byte unchanged (and adds no entry).
The CLI table runs in-process through ``lft_core.run.cli.main`` (exactly what ``python -m lft_core`` runs); a
representative handful also runs as real subprocesses. Tiny random models only (fast).
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from lft_core.data.activations import CacheError, ensure_activations, open_activations, parse_layers
from cli_helpers import run_cli as _cli
from lft_core.data.corpus import CorpusError, load_corpus, make_windows
from lft_core.errors import LFTError
from lft_core.analysis.evaluation import eval_windows, evaluate
from lft_core.flow.field import FieldSpec
from lft_core.flow.latent import LatentFlow
from lft_core.flow.store import FlowCheckpointError, load_flow, open_flow, save_flow
from lft_core.paths import cache_dir, cache_root
from lft_core.model.loading import load_teacher
from lft_core.model.teacher import Replace, TeacherLoadError
from lft_core.flow.config import TrainConfig
from lft_core.flow.training import train_flow

REPO = Path(__file__).resolve().parents[1]
FLOW = "hard-neox"  # the flow every flow case starts from (span 1:3 of the tiny GPT-NeoX)


class _Trap:
    """Unpickling this object creates a marker file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------------------
# The world: an existing entry and flow (which must not change), and the bad files, folders and flows


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_gpt2_dir):
    return load_teacher(str(tiny_gpt2_dir))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_neox, tiny_neox_dir, tiny_gpt2_dir) -> dict:
    d = tmp_path_factory.mktemp("bad-inputs")
    w = {"neox": str(tiny_neox_dir), "gpt2": str(tiny_gpt2_dir), "dir": d,
         "unpickled": d / "UNPICKLED", "remote_ran": d / "REMOTE_CODE_RAN"}
    # what must survive every bad input unchanged
    w["entry"] = ensure_activations(tiny_neox, load_corpus(), 32, 4, range(tiny_neox.n_layers + 1),
                                    progress=False).key
    train_flow(TrainConfig(model=str(tiny_neox_dir), span=(1, 3), method="sfm", k=1, steps=2, batch=2, seq_len=32,
                           windows=4, heldout_windows=2, eval_every=2, checkpoint_every=2, name=FLOW, distill_steps=0),
               teacher=tiny_neox, verbose=False)
    # bad corpora
    files = d / "files"
    files.mkdir()
    (files / "empty.txt").write_bytes(b"")
    (files / "blank.txt").write_bytes(b"  \n\t\n")
    (files / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (files / "latin1.txt").write_bytes("café au lait, crème brûlée. ".encode("latin-1") * 100)
    (files / "allbad.jsonl").write_text('{"text": ""}\n{bad json\n[1, 2]\n{"title": "no text field"}\n')
    with open(files / "huge.txt", "wb") as f:  # sparse: 201 MiB on paper, nothing on disk
        f.truncate(201 * 2**20)
    (d / "notext").mkdir()
    (d / "notext" / "data.csv").write_text("a,b\n1,2\n")
    for name in ("empty", "blank", "binary", "latin1", "allbad", "huge"):
        w[name] = str(next(files.glob(name + ".*")))
    w["notext"] = str(d / "notext")
    # folders that are not (safe) models
    neox = Path(tiny_neox_dir)
    tokenizer_files = [f for f in neox.iterdir() if f.name.startswith(("tokenizer", "special_tokens"))]

    def folder(name: str, config: str | None = None, tokenizer: bool = True) -> Path:
        p = d / name
        p.mkdir()
        if config is not None:
            (p / "config.json").write_text(config)
        for f in tokenizer_files if tokenizer else []:
            shutil.copy(f, p / f.name)
        w[name] = str(p)
        return p

    folder("nomodel", tokenizer=False)
    (d / "nomodel" / "README.md").write_text("not a model")
    folder("badjson", "{not json")
    folder("noweights", (neox / "config.json").read_text())
    binonly = folder("binonly", (neox / "config.json").read_text())
    torch.save({"gpt_neox.embed_in.weight": _Trap(w["unpickled"])}, binonly / "pytorch_model.bin")
    cfg = json.loads((neox / "config.json").read_text())
    cfg.update(model_type="evil_lm", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                         "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    remote = folder("remote", json.dumps(cfg))
    code = (f"open({str(w['remote_ran'])!r}, 'w').write('ran')\n"
            "from transformers import PretrainedConfig\n\n\nclass EvilConfig(PretrainedConfig):\n"
            "    model_type = 'evil_lm'\n")
    (remote / "configuration_evil.py").write_text(code)
    (remote / "modeling_evil.py").write_text(code)
    shutil.copy(neox / "model.safetensors", remote / "model.safetensors")
    w["a_file"] = str(neox / "config.json")
    # damaged copies of the flow
    good = cache_dir("flows") / FLOW
    flows = d / "flows"
    flows.mkdir()

    def flow_copy(name: str, edit=None) -> Path:
        p = flows / name
        shutil.copytree(good, p)
        if edit is not None:
            config = json.loads((p / "config.json").read_text())
            edit(config)
            (p / "config.json").write_text(json.dumps(config))
        w["flow_" + name] = str(p)
        return p

    truncated = flow_copy("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    flow_copy("span_beyond", lambda c: c.update(span=[1, 99]))
    flow_copy("span_reversed", lambda c: c.update(span=[3, 1]))
    flow_copy("span_garbage", lambda c: c.update(span="1:3"))
    flow_copy("span_unchecked", lambda c: (c.update(span=[1, 99]), c.pop("n_layers")))
    flow_copy("config_not_json")
    (flows / "config_not_json" / "config.json").write_text("{oops")
    other = flow_copy("other_weights")  # weights of a flow of another (narrower) model
    narrow = LatentFlow(FieldSpec(d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=64, mlp="plain",
                                  act="gelu", norm="layer", attn_bias=True, mlp_bias=True), span=(1, 3))
    save_flow(narrow, d / "narrow")
    shutil.copy(d / "narrow" / "model.safetensors", other / "model.safetensors")
    pt_only = flows / "pt_only"
    pt_only.mkdir()
    torch.save({"field.q_proj.weight": _Trap(w["unpickled"])}, pt_only / "model.pt")
    w["flow_pt_only"] = str(pt_only)
    return w


def _snapshot(own: tuple[str, ...]) -> dict[str, str]:
    """Every file of every activation entry and flow (lock files aside) by its size, modification time and inode
    (a write or an atomic replace changes them), and the sha256 of the files under the folders named in ``own``
    (this module's entry and flow). Hashing the whole session cache took 0.5 s a call, 66 s over this module."""
    out = {}
    for kind in ("activations", "flows"):
        for p in sorted(cache_dir(kind).rglob("*")):
            if p.is_file() and not p.name.endswith(".lock"):
                st = p.stat()
                name = str(p.relative_to(cache_root()))
                out[name] = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
                if any(part in own for part in p.parts):
                    out[name] += ":" + hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def unchanged(world):
    """The test must leave every existing cache entry and flow unchanged, and add none."""
    before = _snapshot((FLOW, world["entry"]))
    yield world
    after = _snapshot((FLOW, world["entry"]))
    assert after == before, f"cache changed: {sorted(set(after.items()) ^ set(before.items()))[:6]}"


def _assert_one_line_error(rc: int, err: str, match: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert rc == 2, f"exit {rc}: {last}"
    assert last.startswith("error: ") or re.match(r"python -m lft_core \w+: error: ", last), last
    assert re.search(match, last), f"{match!r} not in {last!r}"
    assert len(last) < 400, f"error line too long: {last}"
    return last


# ---------------------------------------------------------------------------------------------------------
# The CLI: one table of bad inputs

TRAIN = ["train", "--model", "{neox}", "--steps", "1", "--batch", "1", "--seq-len", "16", "--windows", "2",
         "--heldout-windows", "1", "--distill-steps", "0"]
CACHE = ["cache", "--model", "{neox}", "--seq-len", "16", "--windows", "2", "--layers", "0"]

CASES = {
    # spans
    "span-out-of-range": (TRAIN + ["--span", "0:99"], r"span 0:99 is not valid"),
    "span-reversed": (TRAIN + ["--span", "3:1"], r"span 3:1 is not valid"),
    "span-empty": (TRAIN + ["--span", "2:2"], r"span 2:2 is not valid"),
    "span-not-a-span": (TRAIN + ["--span", "six:twelve"], r"span must look like M:N"),
    "recoupling-span-reversed": (["recoupling", "--model", "{neox}", "--spans", "3:1"], r"span 3:1 is not valid"),
    "recoupling-span-out-of-range": (["recoupling", "--model", "{neox}", "--spans", "0:99"], r"span 0:99 is not valid"),
    "layers-out-of-range": (CACHE[:-1] + ["0:99"], r"layers \[5, 6, 7, 8, 9, \.\.\.\] \(95 in all\) are outside 0\.\.4"),
    "layers-reversed": (CACHE[:-1] + ["3:1"], r"layer range 3:1 is reversed"),
    # k
    "train-k-0": (TRAIN + ["--span", "1:3", "--k", "0"], r"k must be between 1 and 64, got 0"),
    "train-k-huge": (TRAIN + ["--span", "1:3", "--k", "1000000"], r"k must be between 1 and 64, got 1000000"),
    "eval-k-0": (["eval", "--flow", FLOW, "--k", "0"], r"--k values must be between 1 and 64, got 0"),
    "eval-k-huge": (["eval", "--flow", FLOW, "--k", "1,1000000"], r"between 1 and 64, got 1000000"),
    "eval-skip-0": (["eval", "--flow", FLOW, "--skip", "0"], r"--skip values must be at least 1"),
    "toy-k-0": (["toy", "--k", "0"], r"--k: must be at least 1, got 0"),
    "toy-k-huge": (["toy", "--k", "1000000", "--steps", "1"], r"k must be an integer between 1 and 64"),
    # windows
    "cache-windows-0": (["cache", "--model", "{neox}", "--windows", "0"], r"--windows: must be at least 1"),
    "train-windows-0": (TRAIN + ["--span", "1:3", "--windows", "0"], r"--windows: must be at least 1"),
    "eval-windows-0": (["eval", "--flow", FLOW, "--windows", "0"], r"--windows: must be at least 1"),
    "recoupling-windows-0": (["recoupling", "--model", "{neox}", "--windows", "0"], r"--windows: must be at least 1"),
    "cache-windows-more-than-corpus": (CACHE[:5] + ["--corpus", "builtin", "--windows", "100000"],
                                       r"100000 were asked for: use fewer"),
    # seq_len beyond the model's context (256 positions)
    "cache-seq-len-neox": (["cache", "--model", "{neox}", "--seq-len", "1000", "--windows", "2"], r"seq_len 1000 is longer than the model's context \(256"),
    "cache-seq-len-gpt2": (["cache", "--model", "{gpt2}", "--seq-len", "1000", "--windows", "2"], r"seq_len 1000 is longer than the model's context \(256"),
    "train-seq-len": (TRAIN + ["--span", "1:3", "--seq-len", "1000"], r"seq_len 1000 is longer"),
    "recoupling-seq-len": (["recoupling", "--model", "{neox}", "--seq-len", "1000"], r"seq_len 1000 is longer"),
    "eval-seq-len": (["eval", "--flow", FLOW, "--seq-len", "1000", "--windows", "1"], r"seq_len 1000 is longer"),
    # corpora
    "corpus-empty": (CACHE + ["--corpus", "{empty}"], r"empty\.txt is empty"),
    "corpus-blank": (CACHE + ["--corpus", "{blank}"], r"blank\.txt is empty"),
    "corpus-binary": (CACHE + ["--corpus", "{binary}"], r"looks binary, not text"),
    "corpus-not-utf8": (CACHE + ["--corpus", "{latin1}"], r"is not UTF-8 text \(bad byte at offset 3\)"),
    "corpus-jsonl-all-bad": (CACHE + ["--corpus", "{allbad}"], r"no line with a non-empty \"text\" field \(4 bad lines\)"),
    "corpus-over-200-MiB": (CACHE + ["--corpus", "{huge}"], r"is 201 MiB; the limit is 200 MiB"),
    "corpus-missing": (CACHE + ["--corpus", "/no/such/corpus.txt"], r"not found"),
    "corpus-folder-without-text": (CACHE + ["--corpus", "{notext}"], r"has no \.txt/\.md/\.rst/\.jsonl files"),
    "eval-text-binary": (["eval", "--flow", FLOW, "--text", "{binary}"], r"looks binary, not text"),
    "eval-text-empty": (["eval", "--flow", FLOW, "--text", "{empty}"], r"is empty"),
    "eval-text-and-corpus": (["eval", "--flow", FLOW, "--text", "{empty}", "--corpus", "builtin"], r"not both"),
    # models
    "model-absent-offline": (["cache", "--model", "EleutherAI/pythia-70m-no-such-model"], r"not available on this machine.*smollm2-135m"),
    "model-folder-missing": (["cache", "--model", "/no/such/model"], r"model folder /no/such/model does not exist"),
    "model-is-a-file": (["cache", "--model", "{a_file}"], r"is not a model folder"),
    "model-folder-without-config": (["cache", "--model", "{nomodel}"], r"is not a model folder \(it needs config\.json"),
    "model-config-not-json": (["cache", "--model", "{badjson}"], r"could not load the model folder .*not a valid JSON"),
    "model-without-weights": (["cache", "--model", "{noweights}"], r"could not load the model folder .*model\.safetensors"),
    "model-pickle-weights-only": (["cache", "--model", "{binonly}"], r"only PyTorch pickle weights.*never unpickles"),
    "model-remote-code": (["cache", "--model", "{remote}"], r"needs its own Python code.*--trust-remote-code"),
    # flow checkpoints
    "flow-missing": (["eval", "--flow", "no-such-flow"], r"no flow named 'no-such-flow'"),
    "flow-name-traversal": (["eval", "--flow", "../x/../../y"], r"bad flow name"),
    "flow-truncated": (["eval", "--flow", "{flow_truncated}"], r"cannot read flow weights .*truncated or corrupt"),
    "flow-span-beyond-model": (["eval", "--flow", "{flow_span_beyond}"], r"span 1:99 is not valid for a model of 4 blocks"),
    "flow-span-reversed": (["eval", "--flow", "{flow_span_reversed}"], r"span 3:1 is not valid"),
    "flow-span-garbage": (["eval", "--flow", "{flow_span_garbage}"], r"span must be two integers"),
    "flow-span-vs-teacher": (["eval", "--flow", "{flow_span_unchecked}"], r"span 1:99, width 64\) does not fit"),
    "flow-config-not-json": (["eval", "--flow", "{flow_config_not_json}"], r"missing or damaged config\.json"),
    "flow-weights-of-another-model": (["eval", "--flow", "{flow_other_weights}"], r"do not match its config"),
    "flow-for-another-model": (["eval", "--flow", FLOW, "--model", "{gpt2}"], r"was trained for model .*, not"),
    "flow-pickle-only": (["eval", "--flow", "{flow_pt_only}"], r"is not a flow checkpoint: it needs config\.json and model\.safetensors"),
}


def _argv(template: list[str], w: dict) -> list[str]:
    return [part.format(**{k: v for k, v in w.items() if isinstance(v, str)}) for part in template]


_TEACHERS: dict = {}


@pytest.fixture
def fast_teachers(monkeypatch):
    """Models that load fine are loaded once for the whole table (the CLI commands never mutate a teacher);
    every failing load still runs for real."""
    import lft_core.model.loading as teacher_module

    real = teacher_module.load_teacher

    def load(spec="smollm2-135m", device=None, trust_remote_code=False, device_map=None, max_memory=None):
        if device_map is not None:  # a spread teacher is loaded as asked
            return real(spec, trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory)
        key = (spec, device, trust_remote_code)
        if key not in _TEACHERS:
            _TEACHERS[key] = real(spec, device=device, trust_remote_code=trust_remote_code)
        return _TEACHERS[key]

    monkeypatch.setattr(teacher_module, "load_teacher", load)


@pytest.mark.parametrize("case", list(CASES))
def test_cli_bad_input_is_one_clear_line(case, unchanged, fast_teachers, capsys):
    template, match = CASES[case]
    rc, err = _cli(_argv(template, unchanged), capsys)
    _assert_one_line_error(rc, err, match)
    assert not unchanged["unpickled"].exists() and not unchanged["remote_ran"].exists()


SUBPROCESS_CASES = ["cache-windows-0", "model-absent-offline", "flow-truncated"]


def test_cli_bad_input_in_real_processes(unchanged):
    """The same contract from a real ``python -m lft_core``: exit status 2, last line ``error: ...``."""
    env = {**os.environ, "LFT_CACHE_DIR": os.environ["LFT_CACHE_DIR"], "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = {case: subprocess.Popen([sys.executable, "-m", "lft_core", *_argv(CASES[case][0], unchanged)],
                                    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for case in SUBPROCESS_CASES}
    for case, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        _assert_one_line_error(proc.returncode, err, CASES[case][1])
    assert not unchanged["remote_ran"].exists()


# ---------------------------------------------------------------------------------------------------------
# The engine: the same inputs, as exceptions


def test_engine_spans(tiny_neox, world, unchanged):
    for m, n in [(3, 1), (2, 2), (0, 99), (-1, 2)]:
        with pytest.raises(LFTError, match=f"span {m}:{n} is not valid"):
            tiny_neox.check_span(m, n)
        with pytest.raises(LFTError, match=f"span {m}:{n} is not valid"):
            TrainConfig(span=(m, n)).validate(tiny_neox.n_layers)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(LFTError, match="span 3:1"):
        evaluate(tiny_neox, None, (3, 1), ids)
    with pytest.raises(LFTError, match="span must satisfy"):
        LatentFlow(tiny_neox.field_spec(), span=(3, 1))
    with pytest.raises(CacheError, match="reversed"):
        parse_layers("3:1", 4)


def test_engine_k_limits_refuse_before_work(tiny_neox, world, unchanged):
    from lft_core.flow.toy import run_toy

    flow, _ = open_flow(FLOW, tiny_neox)
    h = torch.randn(1, 8, tiny_neox.d_model)
    ids = torch.zeros(1, 8, dtype=torch.long)
    start = time.perf_counter()
    for k in (0, -1, 10**6, True):
        with pytest.raises(LFTError, match="integration steps k must be an integer in 1..256"):
            flow(h, k=k)
        with pytest.raises(LFTError, match="k must be"):
            TrainConfig(k=k if k is not True else 0).validate()
    with pytest.raises(LFTError, match="integration steps"):
        tiny_neox.logits(ids, Replace(flow, 10**6))
    for k in (0, 10**6):
        with pytest.raises(LFTError, match="k must be between 1 and 64"):
            evaluate(tiny_neox, flow, (1, 3), ids, ks=[k])
        with pytest.raises(LFTError, match="k must be an integer between 1 and 64"):
            run_toy("mirror", "fw", steps=1, k=k)
    assert time.perf_counter() - start < 5, "a huge k must be refused before any work"
    assert flow(h, k=64).shape == h.shape  # the largest k training and evaluation allow works


def test_evaluate_refuses_bad_skip_before_any_forward(tiny_neox, world, monkeypatch):
    import lft_core.analysis.evaluation as ev

    flow, _ = open_flow(FLOW, tiny_neox)
    ids = torch.zeros(1, 8, dtype=torch.long)
    monkeypatch.setattr(ev, "reference_logits", lambda *a, **k: pytest.fail("ran the teacher before checking"))
    for k in (0, tiny_neox.n_layers + 1):
        with pytest.raises(LFTError, match=f"skip k must be between 1 and {tiny_neox.n_layers}"):
            evaluate(tiny_neox, flow, (1, 3), ids, ks=[1], skips=[k])


def test_engine_windows_zero_and_too_many(tiny_neox, world, unchanged):
    corpus = load_corpus()
    with pytest.raises(CorpusError, match="at least 1"):
        make_windows(corpus, tiny_neox.tokenizer, 32, 0)
    with pytest.raises(CacheError, match="at least 1"):
        ensure_activations(tiny_neox, corpus, 32, 0, [0], progress=False)
    with pytest.raises(LFTError, match="windows must be at least 1"):
        TrainConfig(windows=0).validate()
    with pytest.raises(CorpusError, match="use fewer windows"):  # the Python docs: a corpus tokenized in a second
        ensure_activations(tiny_neox, load_corpus("builtin"), 128, 10**5, [0], progress=False)


def test_engine_seq_len_beyond_context(tiny_gpt2, world, unchanged):
    corpus = load_corpus()
    with pytest.raises(CacheError, match="longer than the model's context"):
        ensure_activations(tiny_gpt2, corpus, 257, 2, [0], progress=False)
    with pytest.raises(LFTError, match="longer than the model's context"):
        eval_windows(tiny_gpt2, "builtin", None, 2, 1000)
    # a text longer than the context is cut to it (never an index error in the position embedding)
    ids = eval_windows(tiny_gpt2, text="word " * 2000, windows=4, seq_len=128)
    assert ids.shape == (1, 256)


@pytest.mark.parametrize("name, match", [("empty", "is empty"), ("blank", "is empty"), ("binary", "looks binary"),
                                         ("latin1", "not UTF-8"), ("allbad", "no line with"), ("huge", "limit is 200 MiB")])
def test_engine_bad_corpus_files(name, match, world):
    start = time.perf_counter()
    with pytest.raises(CorpusError, match=match):
        load_corpus(world[name])
    assert time.perf_counter() - start < 2  # the 201 MiB file is refused from its size, not read


def test_jsonl_bad_lines_are_skipped_and_counted(tmp_path, tiny_neox_dir, capsys):
    lines = [json.dumps({"text": f"Line {i} of a small corpus about rivers and towns."}) for i in range(200)]
    lines[10:10] = ["{not json", json.dumps({"title": "no text"}), json.dumps(["a", "list"]), json.dumps({"text": ""})]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    corpus = load_corpus(str(path))
    assert len(corpus.texts) == 200 and corpus.skipped_lines == 4
    out = tmp_path / "r.json"
    rc, err = _cli(["cache", "--model", tiny_neox_dir, "--corpus", path, "--seq-len", "16", "--windows", "2",
                    "--layers", "0", "--json", out], capsys)
    assert rc == 0 and "note: skipped 4 .jsonl lines" in err
    assert json.loads(out.read_text())["skipped_lines"] == 4


def test_50_mb_text_reads_only_what_it_needs(tmp_path, tiny_neox, tiny_neox_dir, capsys):
    """50 MB of text, 2 windows: only the first 256K-character piece is tokenized (was ~55 s and ~7 GB)."""
    from pydoc_data.topics import topics

    base = "\n\n".join(topics[k] for k in sorted(topics))
    size = 50 * 10**6
    path = tmp_path / "big.txt"
    path.write_text((base * (size // len(base) + 1))[:size])
    start = time.perf_counter()
    corpus = load_corpus(str(path))
    windows = make_windows(corpus, tiny_neox.tokenizer, 128, 2)
    held = make_windows(corpus, tiny_neox.tokenizer, 128, 2, "heldout")
    seconds = time.perf_counter() - start
    assert windows.shape == (2, 128) and held.shape == (2, 128)
    assert seconds < 15, f"50 MB text took {seconds:.1f} s for 2 windows"
    # the same stream whatever is asked: a short request is a prefix of a longer one
    assert np.array_equal(make_windows(corpus, tiny_neox.tokenizer, 128, 40)[:2], windows)
    rc, err = _cli(["cache", "--model", tiny_neox_dir, "--corpus", path, "--seq-len", "32", "--windows", "2",
                    "--layers", "0"], capsys)
    assert rc == 0, err


def test_model_absent_offline_and_not_a_model(world):
    with pytest.raises(TeacherLoadError, match="not available on this machine.*huggingface-cli download"):
        load_teacher("EleutherAI/pythia-70m-no-such-model")
    for name, match in [("nomodel", "not a model folder"), ("badjson", "could not load"),
                        ("noweights", "could not load"), ("a_file", "not a model folder")]:
        with pytest.raises(TeacherLoadError, match=match):
            load_teacher(world[name])


# ---------------------------------------------------------------------------------------------------------
# Flow checkpoints


def test_flow_checkpoints_damaged(world, tiny_neox, tiny_gpt2, unchanged):
    flow, config = open_flow(FLOW, tiny_neox)  # the original is fine
    assert config["span"] == [1, 3]
    for name, match in [("truncated", "truncated or corrupt"), ("span_beyond", "not valid for a model of 4"),
                        ("span_reversed", "span 3:1 is not valid"), ("span_garbage", "two integers"),
                        ("config_not_json", "invalid flow config"), ("other_weights", "do not match its config"),
                        ("pt_only", "flow checkpoint file not found: .*model.safetensors")]:
        with pytest.raises(FlowCheckpointError, match=match):
            load_flow(world["flow_" + name])
    # no n_layers in the config: caught against the span its weights carry (tests/test_reliability_flows.py)
    with pytest.raises(FlowCheckpointError, match="does not fit its weights, which were trained for span 1:3"):
        load_flow(world["flow_span_unchecked"])
    with pytest.raises(FlowCheckpointError, match="does not fit"):
        open_flow(world["flow_span_unchecked"], tiny_neox)
    with pytest.raises(LFTError, match="was trained for model"):
        open_flow(FLOW, tiny_gpt2)
    assert not world["unpickled"].exists()


# ---------------------------------------------------------------------------------------------------------
# Damaged cache entries: refused when read, rebuilt (only the damage) by `cache`


def test_cache_entry_without_meta(tiny_neox, tiny_neox_dir, tmp_path, capsys):
    entry = ensure_activations(tiny_neox, load_corpus(), 16, 3, [0, 2], progress=False)
    (entry.dir / "meta.json").unlink()
    with pytest.raises(CacheError, match="no valid meta.json.*rebuild"):
        open_activations(entry.key)
    out = tmp_path / "r.json"
    rc, err = _cli(["cache", "--model", tiny_neox_dir, "--seq-len", "16", "--windows", "3", "--layers", "0,2",
                    "--json", out], capsys)
    assert rc == 0, err
    result = json.loads(out.read_text())
    assert result["key"] == entry.key and not result["hit"] and result["computed_layers"] == [0, 2]
    assert open_activations(entry.key).layers == [0, 2]
    (entry.dir / "meta.json").write_text("{half a json")
    with pytest.raises(CacheError, match="no valid meta.json"):
        open_activations(entry.key)


def test_cache_entry_with_short_layer_file(tiny_neox):
    corpus = load_corpus()
    entry = ensure_activations(tiny_neox, corpus, 16, 5, [0, 1, 2], progress=False)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    kept = {i: digest(entry.dir / f"layer_{i:02d}.npy") for i in (0, 1)}
    layer2 = entry.dir / "layer_02.npy"
    layer2.write_bytes(layer2.read_bytes()[: layer2.stat().st_size // 2])
    with pytest.raises(CacheError, match=r"damaged \(layers \[2\]\)"):
        open_activations(entry.key)
    again = ensure_activations(tiny_neox, corpus, 16, 5, [0, 1, 2], progress=False)
    assert not again.hit and again.computed_layers == (2,)
    assert {i: digest(entry.dir / f"layer_{i:02d}.npy") for i in (0, 1)} == kept
    reread = open_activations(entry.key)
    fresh = tiny_neox.hidden_states(torch.from_numpy(np.asarray(reread.tokens, dtype=np.int64)), [2])[2]
    np.testing.assert_allclose(reread.layer(2), fresh.numpy().astype(np.float16), rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# Security


def _python_files() -> list[Path]:
    return sorted((REPO / "lft_core").glob("*.py")) + sorted((REPO / "app").rglob("*.py"))


def test_sources_never_unpickle_or_trust_remote_code():
    """AST scan of lft_core and app: no pickle-family imports, no torch.load / pickle.load(s), no
    allow_pickle=True, weights_only=False, use_safetensors=False or trust_remote_code=True literals."""
    banned_modules = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
    bad_keywords = {("allow_pickle", True), ("weights_only", False), ("use_safetensors", False),
                    ("trust_remote_code", True)}
    problems = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in banned_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (
                    (f.value.id == "torch" and f.attr == "load") or f.attr in ("Unpickler", "loads") and f.value.id == "pickle"
                ):
                    problems.append(f"{where} calls {f.value.id}.{f.attr}")
                for kw in node.keywords:
                    if isinstance(kw.value, ast.Constant) and (kw.arg, kw.value.value) in bad_keywords:
                        problems.append(f"{where} passes {kw.arg}={kw.value.value}")
    assert not problems, problems


def test_loading_uses_safetensors_and_no_remote_code(tiny_neox_dir, world, monkeypatch):
    """Every from_pretrained gets use_safetensors=True / trust_remote_code=False, and nothing is unpickled
    while a teacher, a flow and a cache entry are loaded (torch.load and pickle.load(s) are booby-trapped)."""
    import pickle

    import transformers

    calls = []

    def spy(cls_name):
        original = getattr(transformers, cls_name).from_pretrained

        def from_pretrained(*args, **kwargs):
            calls.append((cls_name, kwargs))
            return original(*args, **kwargs)

        return from_pretrained

    for cls_name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, cls_name), "from_pretrained", spy(cls_name))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    teacher = load_teacher(str(tiny_neox_dir))
    open_flow(FLOW, teacher)
    entry = open_activations(world["entry"])
    assert np.isfinite(np.asarray(entry.layer(1), dtype=np.float32)).all()
    assert {name for name, _ in calls} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(kw.get("trust_remote_code") is False for _, kw in calls)
    assert [kw.get("use_safetensors") for name, kw in calls if name == "AutoModelForCausalLM"] == [True]
    assert inspect.signature(load_teacher).parameters["trust_remote_code"].default is False


def test_pickle_weights_and_remote_code_are_refused(world):
    with pytest.raises(TeacherLoadError, match="only PyTorch pickle weights"):
        load_teacher(world["binonly"])
    with pytest.raises(TeacherLoadError, match="--trust-remote-code"):
        load_teacher(world["remote"])
    with pytest.raises(FlowCheckpointError, match="model.safetensors"):
        load_flow(world["flow_pt_only"])
    assert not world["unpickled"].exists(), "a pickle file was unpickled"
    assert not world["remote_ran"].exists(), "a model's own code ran without --trust-remote-code"
    # the CLI's flag is opt-in
    from lft_core.run.cli import build_parser

    args = build_parser().parse_args(["cache"])
    assert args.trust_remote_code is False


def test_uploads_are_size_limited_and_stay_in_cache():
    pytest.importorskip("streamlit")
    from app.uploads import UPLOAD_LIMIT_MB, save_upload

    uploads = cache_dir("uploads").resolve()
    text = b"A small corpus about rivers and bridges.\n" * 10
    saved_any = 0
    for name in ["../../etc/x.txt", "/etc/passwd.txt", "..\\..\\windows\\evil.txt", "a/b/../../c.md",
                 "~/.bashrc.txt", "x.jsonl", "....txt", "..", ""]:
        data = b'{"text": "one line"}\n' if name.endswith(".jsonl") else text
        try:
            saved = save_upload(name, data).resolve()
        except LFTError:
            continue  # refusing a strange name is also safe
        saved_any += 1
        assert saved.parent == uploads, f"{name!r} was written to {saved}"
        assert saved.read_bytes() == data
    assert saved_any >= 5
    with pytest.raises(LFTError, match=f"limited to {UPLOAD_LIMIT_MB} MB"):
        save_upload("big.txt", b"a" * (UPLOAD_LIMIT_MB * 2**20 + 1))
    for name, data, match in [("x.txt", bytes(range(256)), "binary"), ("x.txt", b"caf\xe9", "not UTF-8"),
                              ("x.txt", b"", "empty"), ("x.py", text, "only")]:
        with pytest.raises(LFTError, match=match):
            save_upload(name, data)
    assert not any(p.name.startswith("big") for p in uploads.iterdir())


def test_server_binds_to_localhost_by_default():
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^HOST \?= 127\.0\.0\.1$", make, re.M)
    run = make.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "--server.address $(HOST)" in run and "streamlit run" in run
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert config["server"]["headless"] is True
    assert config["server"]["maxUploadSize"] <= 20
    assert config["browser"]["gatherUsageStats"] is False
    for path in _python_files():
        assert "0.0.0.0" not in path.read_text(), f"{path} mentions 0.0.0.0"
