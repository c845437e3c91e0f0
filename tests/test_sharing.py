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
