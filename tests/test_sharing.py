"""One Teacher shared by many threads (the app's sessions): each call's result is the one it gets alone."""
from __future__ import annotations

import threading

import numpy as np
import torch

from lft_core.analysis.affine import AffineReplacement
from lft_core.model.teacher import Replace, Skip


def _a_replacement(teacher, span=(1, 3)) -> AffineReplacement:
    """A fixed, non-trivial replacement of a span (a random affine map: no fitting needed)."""
    g = torch.Generator().manual_seed(0)
    d = teacher.d_model
    return AffineReplacement(span, torch.randn(d, d, generator=g) * 0.05, torch.randn(d, generator=g) * 0.1,
                             torch.zeros(d), torch.ones(d))


def test_concurrent_surgery_never_leaks_into_another_threads_forward(tiny_neox):
    teacher = tiny_neox
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 1000, (2, 24)))
    flow = _a_replacement(teacher)
    calls = {
        "teacher": lambda: teacher.logits(ids),
        "skip": lambda: teacher.logits(ids, Skip(1, 2)),
        "lft": lambda: teacher.logits(ids, Replace(flow)),
        "hidden": lambda: torch.cat([teacher.hidden_states(ids, [0, 2, 4])[i] for i in (0, 2, 4)]),
        "hidden-early": lambda: teacher.hidden_states(ids, [1])[1],
    }
    alone = {name: fn() for name, fn in calls.items()}
    # the calls really differ, so a leaked surgery would show
    assert not torch.allclose(alone["teacher"], alone["skip"]) and not torch.allclose(alone["teacher"], alone["lft"])

    wrong: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(calls) * 2)

    def worker(name: str) -> None:
        try:
            start.wait()
            for _ in range(15):
                if not torch.equal(calls[name](), alone[name]):
                    wrong.append(name)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(name,)) for name in calls for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert not wrong, f"{len(wrong)} results differed from the same call alone: {sorted(set(wrong))}"
    # and the model is as it was
    assert torch.equal(teacher.logits(ids), alone["teacher"])


def test_surgery_is_per_thread_and_nests(tiny_neox):
    teacher = tiny_neox
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 1000, (1, 16)))
    plain = teacher.logits(ids)
    inside: dict[str, torch.Tensor] = {}
    with teacher.skipped_blocks(0, 2):
        skipped = teacher.model(ids, use_cache=False).logits.float()
        other = threading.Thread(target=lambda: inside.setdefault("plain", teacher.logits(ids)))
        other.start()
        other.join()
        with teacher.skipped_blocks(2, 1):  # nested: blocks 0, 1 and 2 are skipped
            nested = teacher.model(ids, use_cache=False).logits.float()
    assert torch.equal(inside["plain"], plain)  # the other thread ran the whole model meanwhile
    assert torch.equal(skipped, teacher.logits(ids, Skip(0, 2)))
    assert torch.equal(nested, teacher.logits(ids, Skip(0, 3)))
    assert torch.equal(teacher.logits(ids), plain)


def test_ten_sessions_asking_for_the_same_background_work_start_it_once(monkeypatch):
    """``start_unique_job`` under one lock: the same (kind, label) asked by ten threads at once starts one job;
    another label starts its own."""
    import os
    import shutil

    from lft_core.atomic import write_json
    from lft_core.run import jobs

    started = []

    def fake_start(kind, args, label=""):  # a job "running" as this process, so it stays running
        job_id = f"test-unique-{len(started)}-{threading.get_ident()}"
        started.append(job_id)
        d = jobs.jobs_dir() / job_id
        d.mkdir(parents=True)
        write_json(d / "job.json", {"id": job_id, "kind": kind, "label": label, "args": [kind, *args],
                                    "created": "2026-01-01T00:00:00+00:00", "pid": os.getpid()})
        return jobs.read_job(job_id)

    monkeypatch.setattr(jobs, "start_job", fake_start)
    got = []
    try:
        threads = [threading.Thread(target=lambda: got.append(jobs.start_unique_job("baselines", ["x"], "fit same")))
                   for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(started) == 1 and {j.id for j in got} == {started[0]}
        assert jobs.running_job("baselines", "fit same").id == started[0]
        other = jobs.start_unique_job("baselines", ["y"], "fit other")
        assert len(started) == 2 and other.id == started[1] and other.status == "running"
    finally:
        for job_id in started:
            shutil.rmtree(jobs.jobs_dir() / job_id, ignore_errors=True)
