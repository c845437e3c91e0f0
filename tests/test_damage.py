"""Every file the engine reads can be damaged: damage is one clear line or a rebuild, never a traceback. And every
request is checked before work starts and bounded in what it may cost."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lft_core.data.activations import CacheError, ensure_activations, open_activations
from lft_core.run.cli import main
from lft_core.data.corpus import CorpusError, load_corpus, read_text_file
from lft_core.run.jobs import jobs_dir, list_jobs, read_job
from lft_core.flow.store import FlowCheckpointError, flows_dir, list_flows, load_flow
from lft_core.flow.config import TrainConfig
from lft_core.flow.training import train_flow

REPO = Path(__file__).resolve().parents[1]

# damaged variants of a JSON record: (label, bytes)
DAMAGED_JSON = [
    ("empty", b""),
    ("truncated", b'{"kind": "train", "args": ["a'),
    ("a list", b"[1, 2, 3]"),
    ("a string", b'"hello"'),
    ("null", b"null"),
    ("not utf-8", b'{"kind": "\xff\xfe"}'),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
    ("wrong types", json.dumps({"kind": 3, "args": "x", "created": [], "span": "1:3", "history": 7, "k": "3",
                                "model": 1, "layers": "all", "windows": "16", "seq_len": True}).encode()),
]


def _cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def _one_line(rc: int, err: str, match: str) -> None:
    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert rc == 2 and "error: " in last and match in last, (rc, last)


@pytest.fixture(scope="module")
def good_flow(tiny_neox, tiny_neox_dir) -> Path:
    train_flow(TrainConfig(model=str(tiny_neox_dir), span=(1, 3), steps=1, batch=2, seq_len=16, windows=4,
                           heldout_windows=1, name="t-dmg-good", distill_steps=0), teacher=tiny_neox, verbose=False)
    return flows_dir() / "t-dmg-good"


def test_damaged_flow_configs_are_listed_as_unreadable(good_flow, capsys):
    names = []
    for i, (label, data) in enumerate(DAMAGED_JSON):
        name = f"t-dmg-{i}"
        shutil.copytree(good_flow, flows_dir() / name)
        (flows_dir() / name / "config.json").write_bytes(data)
        names.append((name, label))
    flows = {f.name: f for f in list_flows()}
    for name, label in names:
        assert flows[name].error, f"{label}: listed as readable"
        with pytest.raises(FlowCheckpointError):
            load_flow(flows_dir() / name)
    assert flows["t-dmg-good"].error is None
    rc, _ = _cli(["flows", "--json", Path(os.environ["LFT_CACHE_DIR"]) / "flows.json"], capsys)
    assert rc == 0
    listed = json.loads((Path(os.environ["LFT_CACHE_DIR"]) / "flows.json").read_text())["flows"]
    assert {f["name"] for f in listed if f.get("error")} >= {n for n, _ in names}
    for name, _ in names:
        shutil.rmtree(flows_dir() / name)


@pytest.mark.parametrize("bad", ["nan", "sigma0"])
def test_flows_with_impossible_values_are_refused(good_flow, bad, capsys):
    from safetensors.torch import load_file, save_file

    name = f"t-dmg-{bad}"
    shutil.copytree(good_flow, flows_dir() / name)
    weights = flows_dir() / name / "model.safetensors"
    state = load_file(str(weights))
    if bad == "nan":
        key = next(k for k in state if k.startswith("field."))
        state[key] = torch.full_like(state[key], float("nan"))
    else:
        state["sigma"] = torch.zeros_like(state["sigma"])
    save_file(state, str(weights))
    with pytest.raises(FlowCheckpointError, match="non-finite|sigma <= 0"):
        load_flow(flows_dir() / name)
    rc, err = _cli(["eval", "--flow", name, "--windows", "1", "--k", "1", "--skip", "1"], capsys)
    _one_line(rc, err, "non-finite" if bad == "nan" else "sigma")
    shutil.rmtree(flows_dir() / name)


def test_nan_evaluation_is_an_error_not_a_number(tiny_neox):
    from lft_core.analysis.evaluation import evaluate

    class Broken:
        span = (1, 3)

        def __call__(self, h, k=1):
            return torch.full_like(h, float("nan"))

    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(Exception, match="non-finite"):
        evaluate(tiny_neox, Broken(), None, ids, ks=[1], skips=[], best_skip=False)


def test_damaged_job_records_do_not_break_listings(tmp_path):
    made = []
    for i, (label, data) in enumerate(DAMAGED_JSON):
        d = jobs_dir() / f"99999999-dmg-{i}"
        d.mkdir()
        (d / "job.json").write_bytes(data)
        made.append(d)
    good = jobs_dir() / "99999999-dmg-good"
    good.mkdir()
    (good / "job.json").write_text(json.dumps({"kind": "train", "args": ["train"], "created": "2026", "pid": None}))
    lines = [b'{"step": 1, "steps": 2, "loss": 0.5}', b"[1]", b'{"step": "x"}', b'{"step": 2}', b"\xff\xfe", b"{"]
    (good / "progress.jsonl").write_bytes(b"\n".join(lines))
    (good / "result.json").write_text('{"name": 5}')  # a train result with the wrong types
    (good / "exit_code").write_text("0")
    jobs = {j.id: j for j in list_jobs()}
    for d in made:
        assert jobs[d.name].status == "damaged" and jobs[d.name].label.startswith("damaged job record")
    g = read_job(good.name)
    assert [e["step"] for e in g.events] == [1] and g.result is None and g.status == "complete"
    for d in made + [good]:
        shutil.rmtree(d)


def test_damaged_cache_metadata_is_rebuilt(tiny_neox):
    corpus = load_corpus()
    entry = ensure_activations(tiny_neox, corpus, 16, 3, [0, 1], progress=False)
    tokens = entry.tokens.copy()
    good_meta = (entry.dir / "meta.json").read_bytes()
    edited = json.loads(good_meta)
    variants = [data for _, data in DAMAGED_JSON] + [
        json.dumps({**edited, "windows": 99}).encode(),  # describes other arrays
        json.dumps({**edited, "layers": [0, 1, 77]}).encode(),  # a layer the model does not have
        json.dumps({**edited, "d_model": 0}).encode(),
    ]
    for data in variants:
        (entry.dir / "meta.json").write_bytes(data)
        with pytest.raises(CacheError):
            open_activations(entry.key)
        again = ensure_activations(tiny_neox, corpus, 16, 3, [0, 1], progress=False)
        assert not again.hit and again.shape == (3, 16, tiny_neox.d_model)
        assert (again.tokens == tokens).all()
        assert open_activations(entry.key).layers == [0, 1]


def test_jsonl_bad_lines_of_every_kind_are_skipped_and_counted(tmp_path):
    lines = ['{"text": "A good line of text."}', '{"text": "\\ud800 lone surrogate"}', "[" * 50_000 + "]" * 50_000,
             '["not", "an", "object"]', '{"title": "no text"}', '{"text": 5}', '{"text": "   "}', "{bad json",
             '{"text": "Another good line."}']
    (tmp_path / "c.jsonl").write_text("\n".join(lines), encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "c.jsonl"))
    assert corpus.texts == ("A good line of text.", "Another good line.") and corpus.skipped_lines == 7


def test_non_regular_files_are_refused_before_reading(tmp_path, capsys):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    outcome: dict = {}

    def read_all() -> None:
        for spec in ("/dev/zero", str(fifo)):
            try:
                load_corpus(spec)
            except CorpusError as e:
                outcome[spec] = str(e)
        try:
            read_text_file(fifo)
        except CorpusError as e:
            outcome["text"] = str(e)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(timeout=20)  # a FIFO would block forever, /dev/zero would read until memory runs out
    assert not reader.is_alive(), "reading a device or a FIFO did not return"
    assert all("not a regular file" in msg for msg in outcome.values()) and len(outcome) == 3
    rc, err = _cli(["cache", "--corpus", "/dev/zero", "--windows", "1", "--json", tmp_path / "o.json"], capsys)
    _one_line(rc, err, "not a regular file")


# ---------------------------------------------------------------------------------------------------------
# Check before working, bound what a request may cost


@pytest.mark.parametrize("where, match", [("folder", "is a folder"), ("missing", "does not exist")])
def test_json_path_is_checked_before_any_work(where, match, tmp_path, monkeypatch, capsys):
    import lft_core.model.loading as loading

    monkeypatch.setattr(loading, "load_teacher", lambda *a, **k: pytest.fail("worked before checking --json"))
    path = tmp_path if where == "folder" else tmp_path / "no" / "such" / "out.json"
    for argv in (["train", "--span", "1:3"], ["recoupling"], ["cache"], ["baselines", "--span", "1:3"]):
        rc, err = _cli(argv + ["--json", path], capsys)
        _one_line(rc, err, match)


def test_unusable_cache_dir_is_one_line(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    env = {**os.environ, "LFT_CACHE_DIR": str(not_a_folder), "HF_HUB_OFFLINE": "1"}
    for argv in (["flows"], ["recoupling", "--model", "smollm2-135m"], ["cache", "--windows", "1"]):
        proc = subprocess.run([sys.executable, "-m", "lft_core", *argv], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: LFT_CACHE_DIR="), proc.stderr[-500:]


@pytest.mark.parametrize("argv, match", [
    (["recoupling", "--pairs", "100000"], "at most 4096 pairs"),
    (["recoupling", "--seed", "-1"], "seed must be between 0 and 2**63 - 1"),
    (["toy", "--seed", str(2**64)], "seed must be between 0 and 2**63 - 1"),
    (["train", "--span", "1:3", "--seed", str(2**70)], "seed must be an integer between 0 and 2**63 - 1"),
])
def test_requests_beyond_their_bounds_are_refused(argv, match, capsys, tiny_neox_dir):
    if argv[0] == "train":
        argv = argv + ["--model", tiny_neox_dir]
    rc, err = _cli(argv, capsys)
    _one_line(rc, err, match)


@pytest.mark.slow
def test_evaluation_memory_does_not_grow_with_windows(tiny_neox_dir, tmp_path):
    """Evaluating 64 windows × 64 tokens after 8 (a 49k vocabulary) needs no more memory than 8 did: kept whole,
    the 64 windows' logits (the teacher's and a model's) would be ~1.6 GB. Slow (LFT_SLOW=1): a process of its
    own for a clean peak; the default run covers the streaming itself with test_evaluation (streamed metrics equal
    the whole-batch ones)."""
    script = (
        "import resource, torch\n"
        "from lft_core.model.loading import load_teacher\n"
        "from lft_core.analysis.evaluation import evaluate\n"
        f"t = load_teacher({str(tiny_neox_dir)!r})\n"
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
        "ids = torch.randint(0, 1000, (64, 64), generator=torch.Generator().manual_seed(0))\n"
        "evaluate(t, None, (1, 3), ids[:8], ks=[], skips=[1], best_skip=False)\n"
        "after_8 = peak()\n"
        "evaluate(t, None, (1, 3), ids, ks=[], skips=[1], best_skip=False)\n"
        "print(peak() - after_8)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_mib = int(proc.stdout.strip().splitlines()[-1])
    assert grown_mib < 200, f"8 -> 64 windows grew the peak memory by {grown_mib} MiB"
