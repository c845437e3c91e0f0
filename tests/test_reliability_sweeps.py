"""Sweeps run at the same time share their cells, and torchrun failures say their one line once (issue 24,
class 4; the cases are listed in docs/reliability_new_sweeps.md).

Real processes where concurrency matters (two `python -m lft_core sweep` at once, a sweep killed with SIGKILL,
torchrun's ranks), on the tiny random GPT-NeoX model; a held flow lock stands in for "another job" where the
point is what the waiting sweep does.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lft_core.flow.config import TrainConfig
from lft_core.flow.store import flow_lock, flows_dir, read_flow_config
from lft_core.run import sweep_run
from lft_core.run.sweep import plan_sweep
from lft_core.run.sweep_run import run_sweep

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
FLAGS = ["--spans", "1:3", "--methods", "fw", "--k", "2", "--windows", "8", "--heldout-windows", "2",
         "--seq-len", "16", "--batch", "2", "--distill-steps", "0", "--lr", "3e-3"]


def sweep_cmd(model: Path, name: str, seeds: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lft_core", "sweep", "--model", str(model), *FLAGS, "--seeds", seeds,
            "--name", name, "--steps", str(steps), "--eval-every", str(steps), *extra]


def env() -> dict:
    """One thread each: two processes of two threads each on two cores train ~20x slower."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def base(model: Path, steps: int, **extra) -> TrainConfig:
    return TrainConfig(model=str(model), span=(1, 3), method="fw", k=2, windows=8, heldout_windows=2, seq_len=16,
                       batch=2, distill_steps=0, lr=3e-3, steps=steps, eval_every=steps, **extra)


def test_two_identical_sweeps_at_once_share_the_cells_and_both_succeed(tiny_neox_dir, tmp_path):
    """Before: each found the other training a cell and recorded it failed; both exited 2, each JSON with half
    the runs complete."""
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    procs = [subprocess.Popen(sweep_cmd(tiny_neox_dir, "twin", "0,1,2", 20, "--json", str(out)), cwd=REPO,
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for out in outs]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        assert "error:" not in err and "Traceback" not in err
    names = [f"twin-1-3-fw-k2-s{s}" for s in range(3)]
    runs = [json.loads(out.read_text())["runs"] for out in outs]
    for r in runs:  # each sweep reports every cell, complete, with its numbers
        assert [x["name"] for x in r] == names
        assert all(x["status"] == "complete" and x["heldout_nmse"] is not None for x in r), r
    for i, name in enumerate(names):  # every cell was trained once, by one of them; the other read it
        trained = [r[i]["action"] for r in runs if r[i]["action"] == "train"]
        assert len(trained) == 1, [r[i] for r in runs]
        assert {r[i]["action"] for r in runs} <= {"train", "skip", "waited"}
        assert runs[0][i]["heldout_nmse"] == runs[1][i]["heldout_nmse"]
        config = read_flow_config(name)
        assert config["status"] == "complete" and config["steps_done"] == 20
        assert [h["step"] for h in config["history"]] == list(range(1, 21))  # one run, not two interleaved


def test_a_sweep_waits_for_a_killed_sweeps_cell_then_resumes_it(tiny_neox, tiny_neox_dir, monkeypatch):
    """A second sweep started while the first trains a cell waits for it (before: refused up front, "being
    trained by another job right now"); the first is killed with SIGKILL mid-cell; its lock goes with it and
    the second resumes the cell from the last checkpoint to complete."""
    monkeypatch.setattr(sweep_run, "POLL_S", 0.2)
    name, steps = "dies-1-3-fw-k2-s0", 40
    first = subprocess.Popen(sweep_cmd(tiny_neox_dir, "dies", "0", steps, "--checkpoint-every", "5"), cwd=REPO,
                             env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        config = flows_dir() / name / "config.json"
        deadline = time.time() + 120
        while not config.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.01)
        assert config.exists(), first.stderr.read()[-2000:] if first.poll() is not None else "no checkpoint"
        os.kill(first.pid, signal.SIGSTOP)  # frozen mid-cell, holding the flow's lock
        plan = plan_sweep(base(tiny_neox_dir, steps, checkpoint_every=5), "1:3", "fw", "2", "0", prefix="dies",
                          teacher=tiny_neox)
        assert [c.action for c in plan.cells] == ["wait"] and "1 being trained by another job" in plan.summary()
        events = []

        def watch(event: dict) -> None:
            events.append(event)
            if event["event"] == "wait" and first.poll() is None:
                os.kill(first.pid, signal.SIGKILL)

        result = run_sweep(plan, tiny_neox, progress=watch, verbose=False)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL
    [run] = result.runs
    assert not result.stopped and (run.status, run.action) == ("complete", "resume"), run
    assert [e["event"] for e in events][:1] == ["wait"] and events[-1]["status"] == "complete"
    saved = read_flow_config(name)
    assert saved["status"] == "complete" and saved["steps_done"] == steps
    assert [h["step"] for h in saved["history"]] == list(range(1, steps + 1))  # resumed from its last checkpoint


def test_a_sweep_waiting_for_another_job_stops_when_asked_and_gives_up_after_lft_sweep_wait(
        tiny_neox, tiny_neox_dir, monkeypatch):
    monkeypatch.setattr(sweep_run, "POLL_S", 0.1)
    cfg = base(tiny_neox_dir, 5)
    with flow_lock("held-1-3-fw-k2-s0", "busy"):  # another job trains the cell (from this sweep's point of view)
        plan = plan_sweep(cfg, "1:3", "fw", "2", "0", prefix="held", teacher=tiny_neox)
        assert [c.action for c in plan.cells] == ["wait"]
        asked = {"stop": False}

        def watch(event: dict) -> None:
            if event["event"] == "wait":
                asked["stop"] = True

        t0 = time.monotonic()
        stopped = run_sweep(plan, tiny_neox, progress=watch, should_stop=lambda: asked["stop"], verbose=False)
        assert time.monotonic() - t0 < 5
        assert stopped.stopped and [(r.status, r.action) for r in stopped.runs] == [("pending", "wait")]

        monkeypatch.setenv("LFT_SWEEP_WAIT", "0.3")
        t0 = time.monotonic()
        gave_up = run_sweep(plan, tiny_neox, verbose=False)
        assert 0.3 <= time.monotonic() - t0 < 5
        [run] = gave_up.runs
        assert run.status == "failed" and "still being trained by another job after 0.3 s (LFT_SWEEP_WAIT)" in run.error
        monkeypatch.setenv("LFT_SWEEP_WAIT", "soon")
        with pytest.raises(Exception, match="LFT_SWEEP_WAIT must be a number of seconds"):
            run_sweep(plan, tiny_neox, verbose=False)
    assert not (flows_dir() / "held-1-3-fw-k2-s0").exists()  # nothing was trained while another job held it


def test_a_start_lost_to_another_jobs_lock_comes_back_instead_of_failing(tiny_neox, tiny_neox_dir, monkeypatch):
    """Another job takes the name between the sweep's look and its start (here: the lock is held exactly while
    the first start runs). Before: the cell was recorded failed ("being trained by another job")."""
    from lft_core.flow import training

    monkeypatch.setattr(sweep_run, "POLL_S", 0.05)
    real, calls = training.train_flow, []

    def contended(cfg, **kw):
        calls.append(cfg.name)
        if len(calls) == 1:
            with flow_lock(str(cfg.name), "busy"):
                return real(cfg, **kw)
        return real(cfg, **kw)

    monkeypatch.setattr(training, "train_flow", contended)
    plan = plan_sweep(base(tiny_neox_dir, 4), "1:3", "fw", "2", "0", prefix="race", teacher=tiny_neox)
    result = run_sweep(plan, tiny_neox, verbose=False)
    assert calls == ["race-1-3-fw-k2-s0"] * 2
    assert [(r.status, r.action) for r in result.runs] == [("complete", "train")]


def test_torchrun_bad_input_is_said_once_by_rank_0_and_named_in_torchruns_summary(tiny_neox_dir, tmp_path):
    """Before: every rank printed its own `error:` line (rank 1's first, and rank 0's could be cut by the agent's
    SIGTERM) and torchrun's summary said "To enable traceback see: https://..."."""
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "lft_core", "train", "--model",
           str(tiny_neox_dir), "--span", "1:9", "--steps", "3", "--batch", "2", "--seq-len", "16", "--windows", "8",
           "--heldout-windows", "2", "--distill-steps", "0", "--name", "tr-bad-span"]
    run = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    line = "error: span 1:9 is not valid (out of range): span must satisfy 0 <= m < n <= 4"
    assert run.returncode == 1, run.stderr[-3000:]  # torchrun's own status for any failed rank
    ours = [x for x in run.stderr.splitlines() if "error: " in x and "Traceback" not in x
            and not x.lstrip().startswith(("traceback", "torch."))]
    assert ours == [line], run.stderr[-3000:]  # said once, by rank 0; rank 1 was ended while it held back
    summary = run.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert "rank      : 0 (local_rank: 0)" in summary and "exitcode  : 2" in summary
    assert f"traceback : {line}" in summary and "To enable traceback" not in summary
    assert not (flows_dir() / "tr-bad-span").exists()
