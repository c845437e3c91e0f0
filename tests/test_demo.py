"""The demo in one command (lft_core.run.demo, `python -m lft_core demo`, the "demo" job kind), with tiny budgets:
4 windows x 16 tokens, 48 token pairs, spans of 2 blocks, 2 training steps per flow."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lft_core.run.demo import DemoSettings, choose_spans, demo_status, manifest_path, prepare_demo, read_manifest
from lft_core.errors import LFTError

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"steps": 2, "distill_steps": 0, "windows": 4, "heldout_windows": 2, "batch": 2}
TINY = DemoSettings(seq_len=16, windows=4, pairs=48, blocks=2, train=TRAIN)
TINY_FLAGS = ["--seq-len", "16", "--windows", "4", "--pairs", "48", "--blocks", "2", "--steps", "2",
              "--distill-steps", "0", "--train-windows", "4", "--heldout-windows", "2", "--batch", "2"]


def ensure_tiny(smol, **kw):
    """The tiny demo, prepared (idempotent: after the first test this only checks, or retrains what is missing)."""
    return prepare_demo(TINY, teacher=smol, **kw)


def flow_record(name: str):
    from lft_core.flow.store import list_flows

    return {f.name: f for f in list_flows()}.get(name)


def test_status_of_an_empty_cache_is_not_prepared_and_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("LFT_CACHE_DIR", str(tmp_path))
    demo_status()  # imports warm
    start = time.perf_counter()
    status = demo_status()
    assert time.perf_counter() - start < 0.5
    assert not status.ready and not status.running and status.done == 0 and status.total == 7
    assert status.line == "not prepared"
    assert [state for _, state in status.steps] == ["pending"] * 7
    assert status.spans == () and status.flows == []
    assert status.model == "smollm2-135m" and status.seq_len == 128 and status.windows == 16 and status.pairs == 256


def test_defaults_are_the_apps_and_the_recipes():
    from lft_core.data.corpus import DEFAULT
    from lft_core.model.loading import DEFAULT_MODEL

    s = DemoSettings()
    assert (s.model, s.corpus, s.seq_len, s.windows, s.pairs, s.blocks, s.methods, s.train) == \
        (DEFAULT_MODEL, DEFAULT, 128, 16, 256, 6, ("sfm", "fw"), {})
    assert s.flow_name("fw", (6, 12)) == "demo-fw-6-12"  # the default recipe's flows carry no tag
    assert DemoSettings(train={"steps": 400}).normalised().flow_name("fw", (6, 12)) == "demo-fw-6-12"
    assert TINY.flow_name("fw", (6, 12)).startswith("demo-fw-6-12-")


@pytest.mark.parametrize("settings, message", [
    (replace(TINY, pairs=1000), "hold only"),
    (replace(TINY, methods=("fw", "fw")), "distinct"),
    (replace(TINY, train={**TRAIN, "batch": 8}), "batch"),
    (replace(TINY, train={**TRAIN, "colour": 1}), "unknown training setting"),
])
def test_bad_settings_are_refused_before_any_work(settings, message):
    before = manifest_path().read_bytes() if manifest_path().exists() else None
    with pytest.raises(LFTError, match=message):
        prepare_demo(settings)
    assert (manifest_path().read_bytes() if manifest_path().exists() else None) == before


def test_a_full_tiny_demo(smol):
    events: list[dict] = []
    result = ensure_tiny(smol, progress=events.append)
    assert result.ready and not result.stopped
    assert [s["state"] for s in result.steps] == ["done"] * 7
    status = demo_status()
    assert status.ready and status.line == "demo ready" and status.done == status.total == 7
    assert [state for _, state in status.steps] == ["done"] * 7
    assert demo_status(TINY).ready  # asked with the same settings
    assert not demo_status(DemoSettings()).ready  # the default demo is another one

    # the spans: lowest and highest R among the 2-block spans starting at block >= 1, from the persisted grid
    from lft_core.data.activations import open_activations
    from lft_core.analysis.recoupling import read_recoupling_grid

    manifest = read_manifest()
    grid = read_recoupling_grid(open_activations(manifest["cache"]["train"]), TINY.pairs)
    assert grid is not None
    candidates = {m: grid.matrix[m, m + 2] for m in range(1, 29)}
    low, high = status.spans
    assert (low.n - low.m, high.n - high.m) == (2, 2) and low != high
    assert grid.matrix[low] == min(candidates.values()) < grid.matrix[high] == max(candidates.values())
    assert manifest["spans"]["low"]["R"] == grid.matrix[low] and "lowest recoupling ratio" in manifest["spans"]["rule"]
    assert choose_spans(grid.matrix, 2)["low"]["span"] == list(low)

    # the flows: SFM and FW on both spans, complete, of these settings
    assert status.flows == [TINY.flow_name(m, s) for s in (low, high) for m in ("sfm", "fw")]
    for info in status.flow_info:
        record = flow_record(info["name"])
        assert record is not None and record.status == "complete" and record.steps_done == 2
        assert record.method == info["method"] and tuple(record.span) == tuple(info["span"])
        assert record.config["windows"] == 4 and record.config["seq_len"] == 16
    # the steps this run did have their seconds (steps another test's demo did on the same cache may have none)
    assert all(isinstance(s["seconds"], (int, float)) for s in result.steps if not s["already"])

    # progress: every event names its step of 7; training events carry the flow's own progress; honest ETA
    if events:  # empty when an earlier test of this session prepared it already
        assert all(e["steps"] == 7 and 1 <= e["step"] <= 7 and e["label"] and "eta_s" in e for e in events)
        assert events[-1]["state"] == "complete"
        training = [e for e in events if "flow_step" in e]
        assert all(e["flow_steps"] == 2 and e["step"] >= 4 for e in training)
        assert all(e["eta_s"] is None or e["eta_s"] >= 0 for e in events)


def test_a_second_run_is_a_no_op(smol):
    ensure_tiny(smol)
    stamps = {name: flow_record(name).stamp for name in demo_status().flows}
    manifest = manifest_path().read_bytes()
    start = time.perf_counter()
    result = prepare_demo(TINY)  # no teacher given: a run with work to do would load the model (seconds)
    assert time.perf_counter() - start < 1.0
    assert result.ready and result.did_nothing and all(s["already"] for s in result.steps)
    assert "every step was done already" in result.summary()
    assert {name: flow_record(name).stamp for name in stamps} == stamps
    assert manifest_path().read_bytes() == manifest


def test_persisted_grids_equal_a_fresh_computation(smol):
    from lft_core.data.activations import open_activations
    from lft_core.analysis.affine import affine_grid, affine_grid_path, read_affine_grid
    from lft_core.analysis.recoupling import read_recoupling_grid, recoupling_for_cache, recoupling_grid_path

    ensure_tiny(smol)
    manifest = read_manifest()
    train, held = (open_activations(manifest["cache"][k]) for k in ("train", "heldout"))
    saved = read_recoupling_grid(train, TINY.pairs, seed=0, drop_first=True)
    fresh = recoupling_for_cache(train, pairs=TINY.pairs, drop_first=True, seed=0)
    np.testing.assert_array_equal(saved.matrix, fresh.matrix)
    np.testing.assert_array_equal(saved.token_index, fresh.token_index)
    assert read_recoupling_grid(train, TINY.pairs + 1) is None  # other settings: not this file
    assert recoupling_grid_path(train.key, TINY.pairs).name == manifest["grids"]["recoupling"]

    affine = read_affine_grid(train, held)
    spans = [tuple(manifest["spans"][w]["span"]) for w in ("low", "high")] + [(3, 9), (20, 21)]
    check = affine_grid(train.layer, held.layer, train.meta["n_layers"], spans=spans)
    for span in spans:
        assert affine.matrix[span] == pytest.approx(check.matrix[span], rel=1e-9)
        assert affine.ridge[span] == check.ridge[span]
    assert affine_grid_path(train.key, held.key).name == manifest["grids"]["affine"]

    # a grid of an earlier build of the entry is not read back; a missing grid file makes the demo not ready
    from lft_core.data.activations import ActivationCache

    rebuilt = ActivationCache(train.dir, {**train.meta, "created": "2000-01-01T00:00:00+00:00"})
    assert read_recoupling_grid(rebuilt, TINY.pairs) is None and read_affine_grid(rebuilt, held) is None
    path = affine_grid_path(train.key, held.key)
    path.rename(path.with_suffix(".moved"))
    try:
        status = demo_status()
        assert not status.ready and [state for _, state in status.steps][:3] == ["done", "done", "pending"]
    finally:
        path.with_suffix(".moved").rename(path)
    assert demo_status().ready


def test_deleting_a_demo_flow_makes_it_not_ready_and_a_rerun_retrains_only_it(smol):
    from lft_core.flow.store import delete_flow

    ensure_tiny(smol)
    names = demo_status().flows
    stamps = {name: flow_record(name).stamp for name in names}
    delete_flow(names[1])
    status = demo_status()
    assert not status.ready and status.done == 6 and status.line == "not ready: 6 of 7 steps done"
    assert [state for _, state in status.steps][4] == "pending"
    result = ensure_tiny(smol)
    assert result.ready and [s["already"] for s in result.steps] == [True] * 4 + [False] + [True] * 2
    assert flow_record(names[1]).status == "complete"
    assert {n: flow_record(n).stamp for n in names if n != names[1]} == \
        {n: s for n, s in stamps.items() if n != names[1]}


def test_resume_after_a_stop_and_after_a_kill(smol):
    settings = replace(TINY, methods=("sfm",), train={**TRAIN, "seed": 1})  # new flows, the same cache and grids
    started = threading.Event()

    def progress(event: dict) -> None:
        if "flow_step" in event:
            started.set()

    result = prepare_demo(settings, teacher=smol, progress=progress, should_stop=started.is_set)
    assert result.stopped and not result.ready
    assert [s["state"] for s in result.steps] == ["done"] * 3 + ["pending"] * 2
    status = demo_status()
    assert not status.ready and not status.running and status.done == 3 and status.total == 5
    first = status.flows[0]
    assert flow_record(first).status == "stopped" and flow_record(first).steps_done == 1

    # a killed trainer leaves its checkpoint saying "running" and the manifest saying the step runs
    config_file = flow_record(first).dir / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "status": "running"}))
    manifest = read_manifest()
    manifest["steps"][3]["state"] = "running"
    manifest_path().write_text(json.dumps(manifest))
    assert flow_record(first).status == "interrupted"
    status = demo_status()
    assert not status.running and status.steps[3][1] == "pending" and status.line.startswith("not ready: 3 of 5")

    events: list[dict] = []
    result = prepare_demo(settings, teacher=smol, progress=events.append)
    assert result.ready and demo_status().ready
    resumed = [e for e in events if e["step"] == 4 and "flow_step" in e]
    assert resumed and resumed[0]["flow_step"] == 2  # continued from its checkpoint, not started over
    assert flow_record(first).status == "complete" and flow_record(first).steps_done == 2


def test_a_second_preparation_at_once_is_refused(smol):
    ensure_tiny(smol)
    holding, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold(event: dict) -> None:
        holding.set()
        release.wait(30)

    def run() -> None:
        try:
            prepare_demo(TINY, teacher=smol, progress=hold, job="test-job-1")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert holding.wait(30)
        status = demo_status()
        assert status.running and status.job == "test-job-1"
        with pytest.raises(LFTError, match=r"being prepared by another process \(job test-job-1\)"):
            prepare_demo(TINY, teacher=smol)
    finally:
        release.set()
        thread.join(30)
    assert not errors and not demo_status().running


def test_cli_status(smol, tmp_path):
    ensure_tiny(smol)
    out = tmp_path / "status.json"
    run = subprocess.run([sys.executable, "-m", "lft_core", "demo", *TINY_FLAGS, "--status", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "demo ready" and len(lines) == 8 and all("[done]" in line for line in lines[1:])
    status = json.loads(out.read_text())
    assert status["ready"] and status["done"] == 7 and status["flows"] == demo_status().flows
    assert not demo_status(replace(TINY, train={**TRAIN, "batch": 4})).ready  # another demo: not prepared


def test_cli_demo_as_a_job(tiny_neox_dir):
    """`start_job("demo", ...)`: `python -m lft_core demo ... --json` in the background, with the progress and
    result files the app reads (a 4-block random model keeps it quick)."""
    from lft_core.run.jobs import read_job, start_job

    flags = ["--model", str(tiny_neox_dir), *TINY_FLAGS[:6], "--blocks", "1", *TINY_FLAGS[8:]]
    job = start_job("demo", flags, label="Prepare the demo")
    deadline = time.time() + 180
    while (job := read_job(job.id)).status in ("running", "stopping") and time.time() < deadline:
        time.sleep(0.3)
    assert job.status == "complete", job.log_tail()
    result = job.result
    assert result["ready"] and not result["stopped"] and not result["did_nothing"]
    assert [s["state"] for s in result["steps"]] == ["done"] * 7 and all(s["seconds"] is not None
                                                                          for s in result["steps"])
    assert result["spans"]["low"]["R"] <= result["spans"]["high"]["R"] and len(result["flows"]) == 4
    assert job.events and all(e["steps"] == 7 for e in job.events) and job.last["state"] == "complete"
    assert any("flow_step" in e for e in job.events)
    log = job.log_tail(300)
    assert "[1/7] Cache all layers" in log and "[7/7] Train FW on span" in log
    assert "demo ready: spans" in log
    status = demo_status()
    assert status.ready and status.flows == result["flows"] and status.model == str(tiny_neox_dir)

    # the same demo again, from this process: nothing to do
    settings = replace(TINY, model=str(tiny_neox_dir), blocks=1)
    again = prepare_demo(settings)
    assert again.ready and again.did_nothing
