"""Faults: jobs killed with SIGKILL mid-run, two writers of one cache entry at once, two trainers of one flow,
a full disk (docs/RELIABILITY.md). Real subprocesses of ``python -m lft_core`` on the tiny GPT-NeoX model."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lft_core.data.activations import CacheError, cache_key, ensure_activations, open_activations
from lft_core.run.cli import main
from lft_core.data.corpus import load_corpus
from lft_core.errors import LFTError
from lft_core.run.jobs import read_job, start_job
from lft_core.paths import cache_dir
from lft_core.flow.store import flows_dir, open_flow
from lft_core.flow.config import TrainConfig
from lft_core.flow.training import train_flow

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}  # tiny model, 2 cores shared: one thread per process


def _wait_for(condition, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies, already dead, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _slow_training_job(model_dir: Path, name: str):
    """A background FW training job of 400 steps with a checkpoint every 2 (long enough to be killed mid-run)."""
    return start_job("train", ["--model", str(model_dir), "--span", "1:3", "--method", "fw", "--k", "2",
                               "--steps", "400", "--batch", "4", "--seq-len", "64", "--windows", "16",
                               "--heldout-windows", "2", "--eval-every", "1000", "--checkpoint-every", "2",
                               "--distill-steps", "0", "--name", name])


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _matches_forward(teacher, entry, layers, windows: int = 3) -> None:
    """The entry's first windows equal a plain forward pass (float16 rounding aside)."""
    ids = torch.from_numpy(np.asarray(entry.tokens[:windows], dtype=np.int64))
    hs = teacher.hidden_states(ids, layers)
    for i in layers:
        np.testing.assert_allclose(np.asarray(entry.layer(i)[:windows], dtype=np.float32), hs[i].numpy(),
                                   rtol=1e-2, atol=2e-3)


# ---------------------------------------------------------------------------------------------------------


def test_training_job_killed_with_sigkill(tiny_neox, tiny_neox_dir):
    """SIGKILL to a training job's process group mid-run: the job reads "failed" (not running forever) and
    the last periodic checkpoint loads, and training resumes from it."""
    name = "fault-sigkill"
    job = _slow_training_job(tiny_neox_dir, name)
    pid = json.loads((job.dir / "job.json").read_text())["pid"]
    config_file = flows_dir() / name / "config.json"
    try:
        _wait_for(lambda: len(read_job(job.id).events) >= 3 and config_file.is_file(), 90,
                  "3 training steps and a checkpoint")
        assert read_job(job.id).status == "running"
        os.killpg(pid, signal.SIGKILL)
    finally:
        _kill_group(pid)
    status = _wait_for(lambda: read_job(job.id).status != "running" and read_job(job.id).status, 10, "status")
    killed = read_job(job.id)
    assert status == "failed" and killed.exit_code is None, (status, killed.exit_code)
    assert killed.events[-1]["step"] < 400, "the job finished before it was killed: make it slower"
    try:
        os.waitpid(pid, 0)  # reap the runner (a zombie read as not running above)
    except ChildProcessError:
        pass
    assert read_job(job.id).status == "failed"
    _wait_for(lambda: not _group_alive(pid), 10, "the killed command to be gone")  # it held the flow's lock

    flow, config = open_flow(name, tiny_neox)
    assert config["status"] == "running" and config["steps_done"] >= 2 and config["steps_done"] % 2 == 0
    from lft_core.flow.store import list_flows

    # nobody holds its training lock any more; Linux drops a killed process's flock a moment after the process
    # is gone (the last close of its files is deferred to a kernel worker), so allow that moment
    _wait_for(lambda: next(f for f in list_flows() if f.name == name).status == "interrupted", 5,
              "the flow to be listed as interrupted")
    h = tiny_neox.hidden_states(tiny_neox.encode("The river runs past the old mill."), [1])[1]
    assert torch.isfinite(flow(h, k=2)).all()
    done = config["steps_done"]
    resumed = train_flow(TrainConfig(model=str(tiny_neox_dir), span=(1, 3), method="fw", k=2, steps=done + 2,
                                     batch=4, seq_len=64, windows=16, heldout_windows=2, eval_every=1000,
                                     checkpoint_every=2, name=name, distill_steps=0),
                         teacher=tiny_neox, resume=True, verbose=False)
    assert resumed.steps == done + 2 and not resumed.stopped
    assert open_flow(name, tiny_neox)[1]["status"] == "complete"


def test_killing_only_the_runner_takes_its_trainer_down(tiny_neox_dir):
    """SIGKILL to the job runner alone (not its group): the CLI child it started dies with it (PDEATHSIG), so
    no orphaned trainer keeps running or keeps holding the flow's lock."""
    from lft_core.flow.store import list_flows

    name = "fault-runner-only"
    job = _slow_training_job(tiny_neox_dir, name)
    pid = json.loads((job.dir / "job.json").read_text())["pid"]
    config_file = flows_dir() / name / "config.json"
    try:
        _wait_for(lambda: len(read_job(job.id).events) >= 2 and config_file.is_file(), 90, "2 training steps")
        os.kill(pid, signal.SIGKILL)  # the runner only
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        _wait_for(lambda: not _group_alive(pid), 10, "the trainer to die with its runner")
    finally:
        _kill_group(pid)
    assert read_job(job.id).status == "failed"
    steps = len(read_job(job.id).events)
    time.sleep(0.5)
    assert len(read_job(job.id).events) == steps and steps < 400  # nothing trains on
    _wait_for(lambda: next(f for f in list_flows() if f.name == name).status == "interrupted", 5,
              "the flow to be listed as interrupted")


def test_cache_job_killed_mid_write(tiny_neox, tiny_neox_dir):
    """SIGKILL while layers 1..4 are being written to an entry that holds layer 0: the entry still reads
    as exactly layer 0 (the half-written layers are .partial files nobody lists), and a rerun completes."""
    corpus = load_corpus()
    seq_len, windows = 128, 400
    first = ensure_activations(tiny_neox, corpus, seq_len, windows, [0], progress=False, batch_size=64)
    before = _digests(first.dir)
    proc = subprocess.Popen([sys.executable, "-m", "lft_core", "cache", "--model", str(tiny_neox_dir),
                             "--seq-len", str(seq_len), "--windows", str(windows), "--layers", "all",
                             "--batch-size", "1"],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _wait_for(lambda: any(first.dir.glob("*.partial")) or proc.poll() is not None, 90, "a .partial file")
        time.sleep(0.2)  # well inside the write
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        _kill_group(proc.pid)
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"the cache command ended by itself ({proc.returncode}): make it slower"
    assert sorted(p.name for p in first.dir.glob("*.partial")) == [f"layer_{i:02d}.npy.partial" for i in (1, 2, 3, 4)]
    entry = open_activations(first.key)
    assert entry.layers == [0]
    assert {k: v for k, v in _digests(first.dir).items() if not k.endswith(".partial")} == before
    for i in (1, 2, 3, 4):
        with pytest.raises(CacheError, match=f"layer {i} is not in cache entry"):
            entry.layer(i)

    redo = ensure_activations(tiny_neox, corpus, seq_len, windows, range(5), progress=False, batch_size=64)
    assert not redo.hit and redo.computed_layers == (1, 2, 3, 4)
    assert not any(redo.dir.glob("*.partial")) and not any(redo.dir.glob("*.tmp-*"))
    assert open_activations(first.key).layers == [0, 1, 2, 3, 4]
    _matches_forward(tiny_neox, redo, [0, 4])


def test_two_processes_cache_the_same_entry(tiny_neox, tiny_neox_dir, tmp_path):
    """Two `cache` commands on the same arguments at once (two browser tabs): both succeed, exactly one
    computes, the other waits on the entry's lock and finds it complete; one good entry results."""
    args = ["cache", "--model", str(tiny_neox_dir), "--seq-len", "64", "--windows", "300", "--layers", "all",
            "--batch-size", "2"]
    procs = [subprocess.Popen([sys.executable, "-m", "lft_core", *args, "--json", str(tmp_path / f"r{i}.json")],
                              cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    results = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    assert results[0]["key"] == results[1]["key"]
    assert sorted(len(r["computed_layers"]) for r in results) == [0, 5], results
    entry = open_activations(results[0]["key"])
    assert entry.layers == [0, 1, 2, 3, 4]
    assert not any(entry.dir.glob("*.partial")) and not any(entry.dir.glob("*.tmp-*"))
    _matches_forward(tiny_neox, entry, [0, 2, 4])


def test_second_trainer_of_one_flow_is_refused(tiny_neox, tiny_neox_dir):
    """Two tabs training the same flow name: the second gets a clear error at once, not a mixed checkpoint."""
    from filelock import FileLock

    name = "fault-busy"
    lock = FileLock(str(flows_dir() / f".{name}.lock"))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom filelock import FileLock\n"
                               f"lock = FileLock({str(lock.lock_file)!r})\nlock.acquire()\nprint('held', flush=True)\n"
                               "time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        with pytest.raises(LFTError, match="being trained by another job"):
            train_flow(TrainConfig(model=str(tiny_neox_dir), span=(1, 3), steps=2, batch=2, seq_len=16, windows=4,
                                   heldout_windows=1, name=name, distill_steps=0), teacher=tiny_neox, verbose=False)
        assert time.perf_counter() - start < 5
        assert not (flows_dir() / name).exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_full_disk_is_refused_before_writing(tiny_neox, tiny_neox_dir, monkeypatch, capsys):
    """A (mocked) full disk: caching refuses with a clear message before writing anything, leaves the
    existing entry as it was, and creates no new entry."""
    import shutil

    corpus = load_corpus()
    existing = ensure_activations(tiny_neox, corpus, 16, 6, [0], progress=False)
    before = _digests(existing.dir)
    entries_before = sorted(p.name for p in cache_dir("activations").iterdir())
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))

    with pytest.raises(CacheError, match=r"caching needs .* GiB but only 0\.00 GiB is free .*free space"):
        ensure_activations(tiny_neox, corpus, 16, 6, [0, 1, 2], progress=False)  # add layers to it
    assert _digests(existing.dir) == before
    with pytest.raises(CacheError, match="is free"):
        ensure_activations(tiny_neox, corpus, 16, 7, [0], progress=False)  # a new entry
    new_key = cache_key(tiny_neox.model_id, tiny_neox.weights_hash, corpus.id, corpus.content_hash, 16, 7, "train")
    assert not (cache_dir("activations") / new_key).exists()
    rc = main(["cache", "--model", str(tiny_neox_dir), "--seq-len", "16", "--windows", "8", "--layers", "all"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: caching needs") and "is free" in last
    assert sorted(p.name for p in cache_dir("activations").iterdir() if not p.name.endswith(".lock")) == [
        n for n in entries_before if not n.endswith(".lock")]
    assert _digests(existing.dir) == before
