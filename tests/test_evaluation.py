"""Evaluation against the teacher and layer skipping; per-token KL for the KL page."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lft_core.errors import LFTError
from lft_core.analysis.evaluation import evaluate, token_kl
from lft_core.flow.store import open_flow
from lft_core.model.teacher import Replace, Skip
from lft_core.flow.config import TrainConfig
from lft_core.flow.training import train_flow


class ExactFlow(torch.nn.Module):
    """A stand-in flow returning the teacher's true h_n: the LFT must then equal the teacher exactly."""

    def __init__(self, teacher, ids, m, n):
        super().__init__()
        self.x1 = teacher.hidden_states(ids, [n])[n]
        self.span = (m, n)

    def forward(self, h, k=1):
        return self.x1[: len(h)]


def test_exact_flow_has_zero_kl(tiny_neox):
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 1000, (1, 24)))
    flow = ExactFlow(tiny_neox, ids, 1, 3)
    res = evaluate(tiny_neox, flow, (1, 3), ids, ks=[1, 2], skips=[1], batch=1)
    lft = [r for r in res.rows if r.model == "lft"]
    assert [r.k for r in lft] == [1, 2] and all(r.kl < 1e-6 and r.nmse < 1e-12 for r in lft)
    skip = [r for r in res.rows if r.model == "skip"]
    assert {r.where for r in skip} == {"span", "best"} and all(r.kl > 0 for r in skip)
    best = next(r for r in skip if r.where == "best")
    span_row = next(r for r in skip if r.where == "span")
    assert best.kl <= span_row.kl + 1e-6
    assert res.tokens == 24 and res.teacher_ppl > 1
    assert set(res.to_json()) >= {"span", "tokens", "teacher_ppl", "rows"}


def test_bad_eval_requests(tiny_neox):
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(LFTError):
        evaluate(tiny_neox, None, (3, 2), ids)
    with pytest.raises(LFTError, match="k must"):
        evaluate(tiny_neox, None, (1, 3), ids, ks=[0], skips=[])


def test_token_kl(tiny_neox, tiny_neox_dir):
    train_flow(TrainConfig(model=str(tiny_neox_dir), span=(1, 3), steps=2, batch=2, seq_len=16, windows=4,
                           heldout_windows=1, name="t-kl", distill_steps=0), teacher=tiny_neox, verbose=False)
    flow, _ = open_flow("t-kl", tiny_neox)
    ids = tiny_neox.encode("The quick brown fox jumps over the lazy dog.")
    res = token_kl(tiny_neox, ids, {"LFT k=2": Replace(flow, 2), "skip 2": Skip(1, 2)})
    T = ids.shape[1]
    assert len(res.tokens) == T and set(res.kl) == {"teacher", "LFT k=2", "skip 2"}
    assert np.allclose(res.kl["teacher"], 0, atol=1e-6)
    assert res.kl["skip 2"].shape == (T,) and (res.kl["skip 2"] > 0).all()
    assert len(res.top["LFT k=2"][0]) == 5 and abs(sum(p for _, p in res.top["teacher"][0]) - 1) < 1


def test_streamed_metrics_equal_the_whole_batch(tiny_neox):
    """stream_metrics keeps one batch of logits alive at a time; its means equal the ones computed from every
    window's logits at once (the memory bound itself: test_damage, LFT_SLOW=1)."""
    from lft_core.analysis.evaluation import stream_metrics
    from lft_core.analysis.metrics import kl_per_token, nll_per_token

    ids = torch.randint(0, 1000, (6, 12), generator=torch.Generator().manual_seed(0))
    surgery = Skip(1, 2)
    (kl, ppl), = stream_metrics(tiny_neox, ids, [surgery], batch=4)  # batches of 4 and 2 windows
    ref, model = tiny_neox.logits(ids), tiny_neox.logits(ids, surgery)
    assert kl == pytest.approx(float(kl_per_token(ref, model).double().mean()), rel=1e-6)
    assert ppl == pytest.approx(math.exp(float(nll_per_token(model, ids).double().mean())), rel=1e-6)
