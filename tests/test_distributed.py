"""Beyond one process: the commands under torchrun (gloo on CPU), the batch plan, and big-teacher loading.

The torchrun tests launch real ranks (``torchrun --standalone --nproc-per-node 2 -m lft_core ...``) on the
tiny GPT-NeoX model and compare what they leave with a one-process run of the same command.
"""
from __future__ import annotations

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
from safetensors.torch import load_file

from lft_core.data.activations import list_entries
from lft_core.run.cli import main
from lft_core.model.loading import load_teacher
from lft_core.flow.store import flows_dir, load_flow
from lft_core.flow.pairs import BatchPlan

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(args: list[str], cache: Path, nproc: int = 2, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "LFT_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    cmd = [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", "-m", "lft_core", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def train_args(model: Path, name: str, steps: int = 6, *flags: str, **extra: str) -> list[str]:
    args = {"--model": str(model), "--span": "1:3", "--steps": str(steps), "--batch": "4", "--seq-len": "16",
            "--windows": "10", "--heldout-windows": "2", "--eval-every": "3", "--checkpoint-every": "3",
            "--name": name, "--lr": "3e-3", "--seed": "5", "--distill-steps": "0"}
    args.update(extra)
    return ["train", *[x for kv in args.items() for x in kv], *flags]


@pytest.fixture(scope="module")
def shared_cache(session_cache) -> Path:
    """torchrun's ranks and this process share the session's cache folder (as ranks on one machine do)."""
    return session_cache


def weights(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(flows_dir() / name / "model.safetensors"))


def assert_same_weights(a: str, b: str, atol: float = 1e-4) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < atol, f"{a} and {b} differ by {worst}"


# ---------------------------------------------------------------------------------------------------------
# The batch plan: one rule for every world size


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_shares_are_disjoint_and_make_up_the_global_batch(world):
    plan = BatchPlan(windows=23, batch=8, seed=3)
    seen_in_epoch: list[int] = []
    for step in range(plan.per_epoch):
        batch = plan.global_batch(step)
        shares = [batch[BatchPlan.positions(r, world, 8)] for r in range(world)]
        assert all(len(s) == 8 // world for s in shares)
        assert sorted(np.concatenate(shares).tolist()) == sorted(batch.tolist())
        seen_in_epoch += batch.tolist()
    assert len(set(seen_in_epoch)) == len(seen_in_epoch) == 16  # an epoch reads each window at most once
    # the next epoch is another permutation, so the two windows left out now are read later
    later = {int(i) for s in range(plan.per_epoch, 10 * plan.per_epoch) for i in plan.global_batch(s)}
    assert later == set(range(23))


def test_the_batch_plan_depends_on_the_seed_only():
    a, b, c = BatchPlan(40, 8, 0), BatchPlan(40, 8, 0), BatchPlan(40, 8, 1)
    assert all(np.array_equal(a.global_batch(s), b.global_batch(s)) for s in range(12))
    assert not np.array_equal(a.global_batch(0), c.global_batch(0))


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tiny_neox, tiny_neox_dir, monkeypatch):
    from lft_core import distributed
    from lft_core.errors import LFTError
    from lft_core.flow import training
    from lft_core.flow.config import TrainConfig

    monkeypatch.setattr(training, "current", lambda: distributed.Dist(rank=0, world=3))
    cfg = TrainConfig(model=str(tiny_neox_dir), span=(1, 3), steps=1, batch=4, seq_len=16, windows=8,
                      distill_steps=0)
    with pytest.raises(LFTError, match=r"global batch \(4\) must be a multiple of the number of ranks \(3\)"):
        training.train_flow(cfg, teacher=tiny_neox, verbose=False)


# ---------------------------------------------------------------------------------------------------------
# torchrun: training


def test_two_ranks_train_the_flow_one_process_trains(tiny_neox_dir, shared_cache, tmp_path):
    out = tmp_path / "ddp.json"
    run = torchrun(train_args(tiny_neox_dir, "ddp-two", **{"--json": str(out)}), shared_cache)
    assert run.returncode == 0, run.stderr[-3000:]
    # rank 0 alone speaks and writes: one summary line, one JSON, one flow folder with one checkpoint
    assert run.stdout.count("trained ddp-two") == 1, run.stdout
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["steps"] == 6
    config = json.loads((flows_dir() / "ddp-two" / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == 4 and config["steps_done"] == 6
    assert not list(flows_dir().glob("ddp-two?*")) and not list((flows_dir() / "ddp-two").glob("*.tmp"))

    assert main(train_args(tiny_neox_dir, "ddp-one")) == 0  # the same run in this one process
    assert_same_weights("ddp-two", "ddp-one")
    one = json.loads((flows_dir() / "ddp-one" / "config.json").read_text())
    assert one["world_size"] == 1
    losses = lambda c: [h["loss"] for h in c["history"]]  # noqa: E731  (the logged loss is the global mean)
    assert np.allclose(losses(config), losses(one), rtol=1e-4)

    # the 2-rank checkpoint (weights, optimiser moments, RNG, step) continues in one process exactly as the
    # one-process checkpoint does
    assert main(train_args(tiny_neox_dir, "ddp-two", 9, "--resume")) == 0
    assert main(train_args(tiny_neox_dir, "ddp-one", 9, "--resume")) == 0
    assert json.loads((flows_dir() / "ddp-two" / "config.json").read_text())["steps_done"] == 9
    assert json.loads((flows_dir() / "ddp-two" / "config.json").read_text())["world_size"] == 1
    assert_same_weights("ddp-two", "ddp-one")


def _rank_pids(parent: int, rank: int) -> list[int]:
    """PIDs of torchrun workers (children of ``parent``) whose environment says RANK=<rank>."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_and_leaves_the_last_checkpoint(tiny_neox_dir, shared_cache):
    """Slow (LFT_SLOW=1): a long torchrun run killed mid-way. The default run covers torchrun's failure path with
    test_reliability_sweeps' torchrun test (one error line, named in torchrun's summary) and checkpoints that
    survive a kill with test_faults' killed training jobs."""
    name = "ddp-killed"
    env = {**os.environ, "LFT_CACHE_DIR": str(shared_cache), "PYTHONUNBUFFERED": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "lft_core",
           *train_args(tiny_neox_dir, name, 100000, **{"--checkpoint-every": "5", "--eval-every": "1000"})]
    agent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        config = flows_dir() / name / "config.json"
        deadline = time.time() + 240
        while not config.exists() and time.time() < deadline and agent.poll() is None:
            time.sleep(0.2)
        assert config.exists(), "no checkpoint appeared"
        time.sleep(1.0)
        victims = _rank_pids(agent.pid, 1)
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        _, err = agent.communicate(timeout=120)  # ends: no rank is left waiting for the dead one
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0
    assert "lft_core" in err and "FAILED" in err and "Signal 9" in err, err[-2000:]  # torchrun names the cause
    # the surviving rank says what happened in one line, with no traceback of ours
    assert "error: another rank of this run stopped" in err and "[rank0]: Traceback" not in err, err[-3000:]
    flow, saved = load_flow(flows_dir() / name)  # the last checkpoint is whole
    assert saved["status"] == "running" and saved["steps_done"] % 5 == 0 and saved["steps_done"] >= 5
    assert main(train_args(tiny_neox_dir, name, saved["steps_done"] + 2, "--resume")) == 0


# ---------------------------------------------------------------------------------------------------------
# torchrun: caching


@pytest.mark.slow
def test_two_rank_cache_writes_the_bytes_one_process_writes(tiny_neox_dir, tmp_path):
    """Slow (LFT_SLOW=1): two torchrun ranks and a second process. The default run covers data-parallel work with
    test_two_ranks_train_the_flow_one_process_trains (the same weights as one process) and the cache's bytes
    with test_activations and test_faults (two processes caching one entry)."""
    args = ["cache", "--model", str(tiny_neox_dir), "--windows", "11", "--seq-len", "16", "--layers", "all",
            "--batch-size", "3"]
    two, one = tmp_path / "two", tmp_path / "one"
    for root in (two, one):
        (root / "models").parent.mkdir(parents=True, exist_ok=True)
        (root / "models").symlink_to(REPO / "cache" / "models", target_is_directory=True)
    run = torchrun([*args, "--json", str(tmp_path / "c.json")], two)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "c.json").read_text())["world_size"] == 2
    single = subprocess.run([sys.executable, "-m", "lft_core", *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "LFT_CACHE_DIR": str(one)}, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    [a], [b] = list_entries(two / "activations"), list_entries(one / "activations")
    assert a["key"] == b["key"] and a["meta"]["layers"] == list(range(5))
    files = sorted(p.name for p in Path(a["dir"]).iterdir())
    assert files == sorted(p.name for p in Path(b["dir"]).iterdir())  # no part markers or partial files left
    for f in files:
        if f.endswith(".npy"):
            assert (Path(a["dir"]) / f).read_bytes() == (Path(b["dir"]) / f).read_bytes(), f
    assert np.load(Path(a["dir"]) / "layer_04.npy", mmap_mode="r").shape == (11, 16, 64)


def test_commands_that_run_in_one_process_say_so_under_torchrun(shared_cache):
    run = torchrun(["flows"], shared_cache, timeout=120)
    assert run.returncode != 0 and "error: `flows` runs in one process" in run.stderr


# ---------------------------------------------------------------------------------------------------------
# A teacher spread over devices (here: CPU memory and disk, by an explicit Accelerate device map)


def test_a_teacher_spread_over_devices_gives_the_same_states_and_surgery(tiny_neox, tiny_neox_dir):
    from lft_core.flow.field import VelocityField
    from lft_core.flow.latent import LatentFlow
    from lft_core.model.teacher import Replace, Skip

    names = {"gpt_neox.embed_in": "cpu", "gpt_neox.layers.0": "cpu", "gpt_neox.layers.1": "disk",
             "gpt_neox.layers.2": "disk", "gpt_neox.layers.3": "cpu", "gpt_neox.final_layer_norm": "cpu",
             "gpt_neox.rotary_emb": "cpu", "lm_head": "disk"}
    spread = load_teacher(str(tiny_neox_dir), device_map=names)
    assert spread.dispatched and not tiny_neox.dispatched
    assert spread.weights_hash == tiny_neox.weights_hash  # the same cache entries and flows serve both
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = tiny_neox.hidden_states(ids, [0, 2, 4]), spread.hidden_states(ids, [0, 2, 4])
    assert all(torch.equal(a[i], b[i]) for i in a)
    torch.manual_seed(0)
    flow = LatentFlow(VelocityField(tiny_neox.field_spec()), span=(1, 3))
    for surgery in (None, Skip(1, 2), Replace(flow, 2)):
        assert torch.equal(tiny_neox.logits(ids, surgery), spread.logits(ids, surgery)), surgery
    assert not torch.equal(spread.logits(ids, Replace(flow, 2)), spread.logits(ids))


def test_cli_device_map_caches_the_same_bytes(tiny_neox_dir, tmp_path, monkeypatch):
    out = {}
    for label, extra in (("plain", []), ("spread", ["--device-map", "auto", "--max-memory", "cpu=1MB"])):
        monkeypatch.setenv("LFT_CACHE_DIR", str(tmp_path / label))
        (tmp_path / label).mkdir()
        (tmp_path / label / "models").symlink_to(REPO / "cache" / "models", target_is_directory=True)
        assert main(["cache", "--model", str(tiny_neox_dir), "--windows", "3", "--seq-len", "16", "--layers", "0,2,4",
                     "--json", str(tmp_path / f"{label}.json"), *extra]) == 0
        out[label] = Path(json.loads((tmp_path / f"{label}.json").read_text())["dir"])
    for f in ("layer_00.npy", "layer_02.npy", "layer_04.npy"):
        assert (out["plain"] / f).read_bytes() == (out["spread"] / f).read_bytes()


def test_placement_flags_are_checked(tiny_neox_dir, monkeypatch, capsys):
    from lft_core import distributed

    assert main(["cache", "--model", str(tiny_neox_dir), "--max-memory", "cpu=1GB"]) == 2
    assert "--max-memory goes with --device-map" in capsys.readouterr().err
    assert main(["cache", "--model", str(tiny_neox_dir), "--device-map", "auto", "--max-memory", "lots"]) == 2
    assert "DEVICE=SIZE" in capsys.readouterr().err
    monkeypatch.setattr(distributed, "current", lambda: distributed.Dist(rank=0, world=2))
    assert main(["cache", "--model", str(tiny_neox_dir), "--device-map", "auto"]) == 2
    assert "--device-map spreads one teacher" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Streamed pairs


def test_training_pairs_stay_on_disk_and_batches_come_back_in_order(tiny_neox, tiny_neox_dir):
    from lft_core.flow.config import TrainConfig
    from lft_core.flow.pairs import load_pairs

    cfg = TrainConfig(model=str(tiny_neox_dir), span=(1, 3), steps=1, batch=2, seq_len=16, windows=6,
                      heldout_windows=2, distill_steps=0)
    data = load_pairs(tiny_neox, cfg, progress=False)
    assert all(isinstance(a, np.memmap) for a in (data.x0, data.x1, data.held_x0, data.held_x1))
    index = np.array([4, 0, 5, 2])
    x0, x1 = data.batch(index)
    assert x0.dtype == torch.float32 and x0.shape == (4, 16, tiny_neox.d_model)
    for row, i in enumerate(index):
        assert torch.equal(x0[row], torch.from_numpy(np.asarray(data.x0[i], dtype=np.float32)))
        assert torch.equal(x1[row], torch.from_numpy(np.asarray(data.x1[i], dtype=np.float32)))


def test_streamed_normalisation_statistics_equal_the_pooled_ones(monkeypatch):
    from lft_core.flow import pairs

    rng = np.random.default_rng(0)
    x0 = (rng.standard_normal((7, 5, 3)) * [1, 10, 100] + [0, -5, 1e3]).astype(np.float16)
    x1 = (rng.standard_normal((7, 5, 3)) * 3 + 7).astype(np.float16)
    pooled = np.concatenate([x0.reshape(-1, 3), x1.reshape(-1, 3)]).astype(np.float64)
    monkeypatch.setattr(pairs, "STATS_CHUNK_TOKENS", 10)  # 2 windows per chunk, a ragged last chunk
    mu, sigma = pairs.normalisation_stats(x0, x1)
    assert np.allclose(mu.numpy(), pooled.mean(0), rtol=1e-6)
    assert np.allclose(sigma.numpy(), pooled.std(0, ddof=1), rtol=1e-5)
