"""Sweeps (spans × methods × k × seeds, one flow per cell) through the library, the CLI and a background job;
the command every job reproduces."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lft_core.errors import LFTError
from lft_core.span import Span
from lft_core.run.sweep import cell_name, default_prefix, expand, parse_grid, plan_sweep, saved_train_config
from lft_core.run.sweep_run import run_sweep
from lft_core.flow.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = dict(span=(2, 4), steps=3, windows=8, heldout_windows=2, seq_len=32, batch=2, eval_every=2,
            checkpoint_every=100, distill_steps=0)
TINY_FLAGS = ["--steps", "3", "--windows", "8", "--heldout-windows", "2", "--seq-len", "32", "--batch", "2",
              "--eval-every", "2", "--distill-steps", "0"]


def test_grid_expansion_and_names():
    base = TrainConfig(steps=5, distill_steps=0)
    configs = expand(base, [Span(6, 12), Span(12, 18)], ["fw", "sfm"], [3], [0, 1, 2], "pre")
    assert len(configs) == 12
    assert [c.name for c in configs[:4]] == ["pre-6-12-fw-k3-s0", "pre-6-12-fw-k3-s1", "pre-6-12-fw-k3-s2",
                                            "pre-6-12-sfm-k3-s0"]
    assert len({c.name for c in configs}) == 12
    assert all(c.sweep == "pre" and c.steps == 5 for c in configs)
    assert configs[-1].span == (12, 18) and configs[-1].method == "sfm" and configs[-1].seed == 2
    assert base.name is None and base.sweep is None  # the base is not touched
    args = configs[0].cli_args()
    assert args[args.index("--sweep") + 1] == "pre" and args[args.index("--name") + 1] == "pre-6-12-fw-k3-s0"
    assert cell_name("x", Span(0, 1), "hybrid", 2, 7) == "x-0-1-hybrid-k2-s7"
    assert default_prefix(TrainConfig(steps=400, distill_steps=200)) == "sw-smollm2-135m-st400-kl200"
    assert default_prefix(TrainConfig(model="/some/folder/My Model/", steps=9, distill_steps=0)) == "sw-My_Model-st9"
    spans, methods, ks, seeds = parse_grid("6:12, 12:18, 6:12", "FW,sfm", "1,3", "0, 1,2")
    assert spans == [Span(6, 12), Span(12, 18)] and methods == ["fw", "sfm"] and ks == [1, 3] and seeds == [0, 1, 2]


@pytest.mark.parametrize("spans,methods,ks,seeds,message", [
    ("6-12", "fw", "3", "0", "span must look like M:N"),
    ("12:6", "fw", "3", "0", "not valid"),
    ("", "fw", "3", "0", "at least one span"),
    ("6:12", "fw,xx", "3", "0", "unknown method"),
    ("6:12", "", "3", "0", "at least one method"),
    ("6:12", "fw", "0", "0", "k must be between"),
    ("6:12", "fw", "3", "a", "seeds must be a comma list of integers"),
    ("6:12", "fw", "3", "-1", "seeds must be between"),
])
def test_bad_grid_text(spans, methods, ks, seeds, message):
    with pytest.raises(LFTError, match=message):
        parse_grid(spans, methods, ks, seeds)


def test_the_whole_grid_is_checked_before_training(smol, monkeypatch):
    from lft_core.run import sweep
    from lft_core.flow.store import flows_dir

    base = TrainConfig(**TINY)
    with pytest.raises(LFTError, match="span 2:40 is not valid for"):
        plan_sweep(base, "2:4,2:40", "fw", "3", "0", prefix="v", teacher=smol)
    with pytest.raises(LFTError, match="batch"):
        plan_sweep(TrainConfig(**{**TINY, "batch": 50}), "2:4", "fw", "3", "0", prefix="v", teacher=smol)
    with pytest.raises(LFTError, match="too long"):
        plan_sweep(base, "2:4", "hybrid", "3", "0", prefix="p" * 70, teacher=smol)
    with pytest.raises(LFTError, match="sweep name"):
        plan_sweep(base, "2:4", "fw", "3", "0", prefix="../evil", teacher=smol)
    monkeypatch.setattr(sweep, "MAX_RUNS", 4)
    with pytest.raises(LFTError, match="5 runs; at most 4"):
        plan_sweep(base, "2:4", "fw", "3", "0,1,2,3,4", prefix="v", teacher=smol)
    # a name taken by a flow of other settings is refused before anything is trained
    taken = flows_dir() / "v-2-4-fw-k3-s1"
    taken.mkdir()
    (taken / "config.json").write_text(json.dumps({"model": smol.model_id, "weights_hash": smol.weights_hash,
                                                   "span": [2, 4], "method": "fw", "k": 3, "seed": 1, "steps": 99,
                                                   "status": "complete"}))
    try:
        with pytest.raises(LFTError, match="exists with other settings.*steps = 99"):
            plan_sweep(base, "2:4", "fw", "3", "0,1", prefix="v", teacher=smol)
        assert not (flows_dir() / "v-2-4-fw-k3-s0").exists()
    finally:
        import shutil

        shutil.rmtree(taken)


def test_a_tiny_sweep_runs_then_is_a_no_op(smol):
    from lft_core.flow.store import flows_dir, read_flow_config

    base = TrainConfig(**TINY)
    plan = plan_sweep(base, "2:4", "fw", "2", "0,1", prefix="lib", teacher=smol)
    assert [c.action for c in plan.cells] == ["train", "train"]
    events = []
    result = run_sweep(plan, smol, progress=events.append, verbose=False)
    assert not result.stopped and [r.status for r in result.runs] == ["complete", "complete"]
    assert [r.name for r in result.runs] == ["lib-2-4-fw-k2-s0", "lib-2-4-fw-k2-s1"]
    for r in result.runs:
        config = read_flow_config(r.name)
        assert config["sweep"] == "lib" and config["status"] == "complete" and config["steps_done"] == 3
        assert r.heldout_nmse == pytest.approx(config["history"][-1]["heldout_nmse"], rel=1e-4)
    # different seeds give different flows (the error bar is not zero by construction)
    assert result.runs[0].final_loss != result.runs[1].final_loss
    summary = result.to_json()["summary"]
    assert len(summary) == 1 and summary[0]["seeds"] == 2 and summary[0]["nmse_std"] is not None
    # events: run i of N, the flow's own step inside it
    steps = [e for e in events if e["event"] == "step"]
    assert [(e["step"], e["flow_step"]) for e in steps] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert all(e["steps"] == 2 and e["flow_steps"] == 3 and "loss" in e for e in steps)
    assert steps[-1]["label"] == "lib-2-4-fw-k2-s1" and steps[0]["eta_s"] is not None
    assert [e["status"] for e in events if e["event"] == "done"] == ["complete", "complete"]
    # the second run of the same sweep trains nothing
    stamps = [(flows_dir() / r.name / "model.safetensors").stat().st_mtime_ns for r in result.runs]
    again = plan_sweep(base, "2:4", "fw", "2", "0,1", prefix="lib", teacher=smol)
    assert [c.action for c in again.cells] == ["skip", "skip"]
    events2 = []
    second = run_sweep(again, smol, progress=events2.append, verbose=False)
    assert [r.status for r in second.runs] == ["complete", "complete"]
    assert [r.final_loss for r in second.runs] == pytest.approx([r.final_loss for r in result.runs], rel=1e-4)
    assert not [e for e in events2 if e["event"] == "step"]
    assert stamps == [(flows_dir() / r.name / "model.safetensors").stat().st_mtime_ns for r in result.runs]


def test_a_stopped_sweep_resumes_its_interrupted_cell(smol):
    from lft_core.flow.store import flows_dir, list_flows, read_flow_config

    base = TrainConfig(**TINY)
    flag = {"stop": False}

    def watch(event: dict) -> None:  # stop after the first flow's second step
        if event["event"] == "step" and event["flow_step"] == 2:
            flag["stop"] = True

    plan = plan_sweep(base, "2:4", "sfm", "1", "0,1", prefix="rs", teacher=smol)
    first = run_sweep(plan, smol, progress=watch, should_stop=lambda: flag["stop"], verbose=False)
    assert first.stopped and [r.status for r in first.runs] == ["stopped", "pending"]
    assert first.runs[0].steps_done == 2
    assert not (flows_dir() / "rs-2-4-sfm-k1-s1").exists()  # the STOP came before the second flow started
    stopped = {f.name: f for f in list_flows()}["rs-2-4-sfm-k1-s0"]
    assert stopped.status == "stopped" and stopped.last_nmse is not None  # the NMSE at the stop is kept
    # a killed trainer leaves a checkpoint that says "running": listed as interrupted, and resumed
    path = flows_dir() / "rs-2-4-sfm-k1-s0" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": "running"}))
    assert {f.name: f for f in list_flows()}["rs-2-4-sfm-k1-s0"].status == "interrupted"
    again = plan_sweep(base, "2:4", "sfm", "1", "0,1", prefix="rs", teacher=smol)
    assert [c.action for c in again.cells] == ["resume", "train"]
    second = run_sweep(again, smol, verbose=False)
    assert [r.status for r in second.runs] == ["complete", "complete"]
    config = read_flow_config("rs-2-4-sfm-k1-s0")
    assert config["steps_done"] == 3 and [h["step"] for h in config["history"]] == [1, 2, 3]
    # the resumed flow's settings read back from its config reproduce the cell
    cfg = saved_train_config(config, model="smollm2-135m")
    assert cfg == again.cells[0].config


@pytest.mark.slow
def test_sweep_job_and_cli_round_trip(smol):
    """A 2-run sweep as a background job (progress events, result, command); the same command run again by
    hand is a no-op.

    Slow (LFT_SLOW=1): the default run covers it with test_app_train's
    test_a_sweep_job_from_the_page_shows_its_command_and_results (the same `python -m lft_core sweep` job end to
    end: its command, results, and the same sweep again trains nothing) and test_a_sweep_job_stops_when_asked
    (its progress events), and with test_a_tiny_sweep_runs_then_is_a_no_op here (events, a second run is a
    no-op with the same numbers)."""
    from lft_core.run.jobs import read_job, start_job

    args = ["--spans", "2:4", "--methods", "fw,sfm", "--k", "2", "--seeds", "3", "--name", "cli", *TINY_FLAGS]
    job = start_job("sweep", args, label="sweep cli")
    deadline = time.time() + 300
    while read_job(job.id).status in ("running", "stopping") and time.time() < deadline:
        time.sleep(1)
    job = read_job(job.id)
    assert job.status == "complete", job.log_tail()
    assert [(r["name"], r["status"], r["action"]) for r in job.result["runs"]] == [
        ("cli-2-4-fw-k2-s3", "complete", "train"), ("cli-2-4-sfm-k2-s3", "complete", "train")]
    for r in job.result["runs"]:
        assert r["span"] == [2, 4] and r["k"] == 2 and r["seed"] == 3 and r["seconds"] > 0
        assert r["final_loss"] > 0 and r["heldout_nmse"] > 0
    assert job.events and job.events[-1]["step"] == 2 and job.events[-1]["steps"] == 2
    assert any(e.get("flow_step") == 3 and e["label"] == "cli-2-4-sfm-k2-s3" for e in job.events)
    # the job's command: the given arguments, without the job's own files
    assert job.command.startswith("python -m lft_core sweep --spans 2:4")
    assert shlex.split(job.command) == ["python", "-m", "lft_core", "sweep", *args]
    assert "--json" not in job.command and "--progress-file" not in job.command and "STOP" not in job.command
    # run by hand again: nothing to train
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = Path(os.environ["LFT_CACHE_DIR"]) / "sweep-again.json"
    argv = shlex.split(job.command)[1:] + ["--json", str(out)]
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(out.read_text())
    assert [(r["status"], r["action"]) for r in again["runs"]] == [("complete", "skip")] * 2
    assert [r["heldout_nmse"] for r in again["runs"]] == pytest.approx(
        [r["heldout_nmse"] for r in job.result["runs"]], rel=1e-4)
    assert "complete already" in proc.stderr and "2 complete already" in proc.stderr


def test_cli_sweep_bad_grid_is_one_line(tmp_path):
    """A bad grid fails with one line before the model loads (a real process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "sweep-bad.json"
    bad = subprocess.run([sys.executable, "-m", "lft_core", "sweep", "--spans", "2:4,9", "--json", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == \
        "error: span must look like M:N (e.g. 6:12), got '9'"


def test_job_command_leaves_out_the_internal_arguments(tmp_path):
    from lft_core.run.jobs import Job

    given = ["train", "--span", "2:4", "--name", "it's a name", "--corpus", "/data/my corpus.txt"]
    job = Job("x", tmp_path, "train", "label", [*given, "--json", "/j/result.json", "--progress-file", "/j/p",
                                                  "--stop-file", "/j/STOP", "--json=/elsewhere"], "now", "running")
    assert shlex.split(job.command) == ["python", "-m", "lft_core", *given]
    assert "/j/" not in job.command and "elsewhere" not in job.command
