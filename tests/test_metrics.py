"""Metrics with known answers: KL, NLL/perplexity, NMSE, recoupling (exact, Sinkhorn, grid), crossings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lft_core.analysis import recoupling as recoupling_module
from lft_core.analysis import metrics
from lft_core.errors import LFTError
from lft_core.analysis.recoupling import cost_matrix, recoupling_grid, recoupling_ratio, sinkhorn_recoupling
from lft_core.analysis.crossings import crossings, flow_recoupled
from lft_core.flow.losses import straight_path
from lft_core.analysis.metrics import MetricError, kl_per_token, nll_per_token, nmse, perplexity

# ------------------------------------------------------------------------------------------------------------
# Next-token metrics
# ------------------------------------------------------------------------------------------------------------


def test_kl_is_zero_for_identical_logits():
    logits = torch.randn(2, 5, 11)
    kl = kl_per_token(logits, logits.clone())
    assert kl.shape == (2, 5) and kl.dtype == torch.float32
    assert torch.all(kl == 0)


def test_kl_two_class_hand_value():
    # P = (1/2, 1/2), Q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[math.log(3.0), 0.0]])
    assert kl_per_token(p, q).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    # and not symmetric: KL(Q || P) = 3/4 ln(3/2) + 1/4 ln(1/2)
    assert kl_per_token(q, p).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)


def test_kl_finite_for_huge_logits_and_half_precision():
    torch.manual_seed(0)
    p = torch.randn(3, 7, 50) * 1e4
    q = torch.randn(3, 7, 50) * 1e4
    kl = kl_per_token(p.half().float(), q)
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    # A point mass P against a uniform Q over V = 4 tokens: KL = ln 4, even at logit 1e4.
    point = torch.tensor([[1e4, 0.0, 0.0, 0.0]])
    assert kl_per_token(point, torch.zeros(1, 4)).item() == pytest.approx(math.log(4), abs=1e-5)
    # float16 inputs are upcast (log_softmax in half would lose the answer)
    assert kl_per_token(point.half(), torch.zeros(1, 4).half()).item() == pytest.approx(math.log(4), abs=1e-5)


def test_kl_chunks_agree_with_one_shot(monkeypatch):
    torch.manual_seed(1)
    p, q = torch.randn(4, 9, 13), torch.randn(4, 9, 13)
    whole = kl_per_token(p, q)
    monkeypatch.setattr(metrics, "_ROWS_PER_CHUNK", 5)
    chunked = kl_per_token(p, q)
    ref = (torch.softmax(p, -1) * (torch.log_softmax(p, -1) - torch.log_softmax(q, -1))).sum(-1)
    assert torch.allclose(whole, ref, atol=1e-6) and torch.allclose(chunked, ref, atol=1e-6)


def test_kl_shape_mismatch_raises():
    with pytest.raises(MetricError, match="same shape"):
        kl_per_token(torch.zeros(2, 3), torch.zeros(2, 4))


def test_perplexity_of_uniform_logits_is_vocab_size():
    ids = torch.randint(0, 7, (2, 6))
    assert perplexity(torch.zeros(2, 6, 7), ids) == pytest.approx(7.0, rel=1e-6)


def test_nll_uses_next_token_shift():
    ids = torch.tensor([[2, 0, 1, 3]])
    logits = torch.zeros(1, 4, 4)
    for t in range(3):
        logits[0, t, ids[0, t + 1]] = math.log(3.0)  # P(next) = 3 / (3 + 3) = 1/2
    nll = nll_per_token(logits, ids)
    assert nll.shape == (1, 3)
    assert torch.allclose(nll, torch.full((1, 3), math.log(2.0)), atol=1e-6)
    assert perplexity(logits, ids) == pytest.approx(2.0, rel=1e-6)


def test_nll_rejects_bad_shapes():
    with pytest.raises(MetricError):
        nll_per_token(torch.zeros(1, 4, 5), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(MetricError, match="at least 2"):
        nll_per_token(torch.zeros(1, 1, 5), torch.zeros(1, 1, dtype=torch.long))


def test_nmse_hand_value_numpy_and_torch():
    pred = [[1.0, 0.0], [0.0, 0.0]]
    target = [[2.0, 0.0], [0.0, 1.0]]
    # token 0: 1/4, token 1: 1/1 -> mean 0.625
    assert nmse(np.array(pred), np.array(target)) == pytest.approx(0.625, abs=1e-12)
    assert nmse(torch.tensor(pred, dtype=torch.float16), torch.tensor(target)) == pytest.approx(0.625, abs=1e-12)
    # leading dims are flattened into tokens
    assert nmse(np.array([pred]), np.array([target])) == pytest.approx(0.625, abs=1e-12)


def test_nmse_zero_target_raises():
    with pytest.raises(MetricError, match="all zeros"):
        nmse(np.ones((2, 3)), np.zeros((2, 3)))


# ------------------------------------------------------------------------------------------------------------
# Exact and Sinkhorn recoupling
# ------------------------------------------------------------------------------------------------------------


def _two_cluster_swap(per_cluster: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster A near the origin, cluster B near (10, 10, …). Token i of A moves to (almost exactly) where
    token i of B starts and vice versa, so the cheapest assignment sends every A token to a B token's target
    (cost ~1e-6) instead of its own (cost ~ 10² d): the exact answer is R = 1, σ = the swap."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((per_cluster, 4))
    b = rng.standard_normal((per_cluster, 4)) + 10.0
    x0 = np.concatenate([a, b])
    x1 = np.concatenate([b, a]) + 1e-3 * rng.standard_normal((2 * per_cluster, 4))
    return x0, x1


def test_recoupling_zero_for_translation():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((64, 16))
    rec = recoupling_ratio(x0, x0 + 5.0 * rng.standard_normal(16))
    assert rec.ratio == 0.0 and rec.n == 64
    assert np.array_equal(rec.assignment, np.arange(64))
    # torch input too
    assert recoupling_ratio(torch.from_numpy(x0).float(), torch.from_numpy(x0 + 3.0).float()).ratio == 0.0


def test_recoupling_one_for_cluster_swap():
    x0, x1 = _two_cluster_swap(20)
    rec = recoupling_ratio(x0, x1)
    assert rec.ratio == 1.0
    assert np.array_equal(rec.assignment, np.r_[np.arange(20, 40), np.arange(0, 20)])


def test_recoupling_half_for_one_swapped_pair():
    x0 = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x1 = x0[[1, 0, 2, 3]]
    rec = recoupling_ratio(x0, x1)
    assert rec.ratio == 0.5
    assert rec.assignment.tolist() == [1, 0, 2, 3]


def test_cost_matrix_hand_values():
    x0 = np.array([[0.0, 0.0], [1.0, 1.0]])
    x1 = np.array([[3.0, 4.0], [1.0, 1.0]])
    c = cost_matrix(x0, x1)
    assert c.dtype == np.float64
    assert c.tolist() == [[25.0, 2.0], [13.0, 0.0]]
    big = np.full((3, 5), 1e4) + np.arange(3)[:, None]
    assert (cost_matrix(big, big) >= 0).all()


def test_recoupling_rejects_bad_input():
    with pytest.raises(MetricError, match="same shape"):
        recoupling_ratio(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(MetricError, match="non-finite"):
        recoupling_ratio(np.array([[np.inf, 0.0]]), np.zeros((1, 2)))
    assert issubclass(MetricError, LFTError)


@pytest.mark.parametrize("case", ["translation", "swap", "half"])
def test_sinkhorn_agrees_with_exact_on_easy_cases(case):
    rng = np.random.default_rng(3)
    if case == "translation":
        x0 = rng.standard_normal((30, 8)) * 3
        x1 = x0 + 0.5
    elif case == "swap":
        x0, x1 = _two_cluster_swap(15)
    else:
        x0 = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
        x1 = x0[[1, 0, 2, 3]]
    exact = recoupling_ratio(x0, x1)
    soft = sinkhorn_recoupling(x0, x1, eps=0.01)
    assert soft.converged
    assert soft.ratio == exact.ratio
    n = x0.shape[0]
    assert soft.plan.shape == (n, n)
    assert np.allclose(soft.plan.sum(axis=0), 1.0 / n) and np.abs(soft.plan.sum(axis=1) - 1.0 / n).sum() < 1e-6
    assert np.array_equal(np.argmax(soft.plan, axis=1), exact.assignment)
    assert soft.eps == pytest.approx(0.01 * np.median(cost_matrix(x0, x1)))


def test_sinkhorn_large_eps_blurs_the_plan():
    x0 = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    soft = sinkhorn_recoupling(x0, x0, eps=100.0)
    # nearly uniform plan, still diagonal argmax for identical points
    assert soft.plan.max() < 0.3 and soft.ratio == 0.0


def test_sinkhorn_reports_non_convergence():
    x0, x1 = _two_cluster_swap(10)
    soft = sinkhorn_recoupling(x0, x1, eps=1e-4, max_iter=2, tol=1e-12)
    assert soft.iterations == 2 and not soft.converged


# ------------------------------------------------------------------------------------------------------------
# Recoupling grid
# ------------------------------------------------------------------------------------------------------------


def _translation_stack(n_layers: int, windows: int, seq: int, d: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    hs = [rng.standard_normal((windows, seq, d))]
    for _ in range(n_layers):
        hs.append(hs[-1] + rng.standard_normal(d))
    return hs


def test_grid_is_zero_for_translations_and_nan_elsewhere():
    L = 5
    hs = _translation_stack(L, windows=4, seq=10, d=8)
    grid = recoupling_grid(lambda i: hs[i], L, pairs=20)
    assert grid.matrix.shape == (L + 1, L + 1)
    upper = np.triu(np.ones((L + 1, L + 1), dtype=bool), k=1)
    assert np.all(grid.matrix[upper] == 0.0)
    assert np.all(np.isnan(grid.matrix[~upper]))
    assert grid.n_layers == L and grid.pairs == 20 and grid.drop_first
    js = grid.to_json_matrix()
    assert js[0][1] == 0.0 and js[1][0] is None and js[3][3] is None


def test_grid_permuting_layer_recouples_spans_that_contain_it():
    # Block k = 2 cyclically shifts positions 1..T-1 of every window (position 0 stays); all other blocks
    # translate. With every non-first token sampled, a span [m, n) has x1_i = x0_π(i) + c when m <= 2 < n
    # (R = 1, π has no fixed point) and x1 = x0 + c otherwise (R = 0).
    L, k, W, T, d = 5, 2, 3, 6, 8
    hs = _translation_stack(L, W, T, d, seed=1)
    shift = np.r_[0, np.roll(np.arange(1, T), 1)]
    for i in range(k + 1, L + 1):
        hs[i] = hs[i][:, shift]
    grid = recoupling_grid(lambda i: hs[i], L, pairs=W * (T - 1))
    expected = np.full((L + 1, L + 1), np.nan)
    for m in range(L):
        for n in range(m + 1, L + 1):
            expected[m, n] = 1.0 if m <= k < n else 0.0
    np.testing.assert_array_equal(grid.matrix, expected)


def test_grid_drop_first_excludes_position_zero():
    # Block 1 swaps the position-0 tokens of windows 0 and 1 (as attention-sink tokens are all alike).
    L, W, T, d = 3, 2, 5, 4
    hs = _translation_stack(L, W, T, d, seed=2)
    for i in range(2, L + 1):
        hs[i] = hs[i].copy()
        hs[i][[0, 1], 0] = hs[i][[1, 0], 0]
    dropped = recoupling_grid(lambda i: hs[i], L, pairs=W * (T - 1), drop_first=True)
    assert np.all(dropped.token_index[:, 1] >= 1)
    assert np.nansum(dropped.matrix) == 0.0
    kept = recoupling_grid(lambda i: hs[i], L, pairs=W * T, drop_first=False)
    assert not kept.drop_first and (kept.token_index[:, 1] == 0).sum() == W
    assert kept.matrix[1, 2] == pytest.approx(2 / (W * T)) and kept.matrix[0, 3] == pytest.approx(2 / (W * T))
    assert kept.matrix[0, 1] == 0.0 and kept.matrix[2, 3] == 0.0
    with pytest.raises(LFTError, match="only 8 tokens are available"):
        recoupling_grid(lambda i: hs[i], L, pairs=W * T - 1, drop_first=True)


def test_grid_matches_direct_ratio_reads_each_layer_once_and_reports_progress(monkeypatch, tmp_path):
    L, W, T, d = 6, 5, 12, 16
    rng = np.random.default_rng(4)
    for i in range(L + 1):
        np.save(tmp_path / f"layer_{i:02d}.npy", (rng.standard_normal((W, T, d)) * (1 + 0.3 * i)).astype(np.float16))
    calls: list[int] = []

    def layer(i: int) -> np.ndarray:
        calls.append(i)
        return np.load(tmp_path / f"layer_{i:02d}.npy", mmap_mode="r")

    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(recoupling_module, "_GRID_BLOCK_ELEMENTS", 2 * 30 * 30)  # force several blocks per start layer
    spans = [(0, 6), (0, 2), (1, 3), (2, 6), (0, 3)]
    grid = recoupling_grid(layer, L, pairs=30, spans=spans, seed=7, progress=lambda a, b: seen.append((a, b)))
    assert sorted(calls) == [0, 1, 2, 3, 6]  # each needed layer read once
    assert seen[-1] == (5, 5) and len(seen) == 5
    w, p = grid.token_index[:, 0], grid.token_index[:, 1]
    assert len({(a, b) for a, b in grid.token_index.tolist()}) == 30 and p.min() >= 1
    for m, n in spans:
        x0 = np.load(tmp_path / f"layer_{m:02d}.npy")[w, p].astype(np.float64)
        x1 = np.load(tmp_path / f"layer_{n:02d}.npy")[w, p].astype(np.float64)
        assert grid.matrix[m, n] == recoupling_ratio(x0, x1).ratio
    assert np.isfinite(grid.matrix).sum() == len(spans)
    assert grid.matrix[0, 6] > 0.5  # unrelated random layers: almost everything recouples
    again = recoupling_grid(layer, L, pairs=30, spans=spans, seed=7)
    np.testing.assert_array_equal(again.token_index, grid.token_index)
    other = recoupling_grid(layer, L, pairs=30, spans=spans, seed=8)
    assert not np.array_equal(other.token_index, grid.token_index)


def test_grid_rejects_bad_arguments():
    hs = _translation_stack(3, windows=2, seq=4, d=3)
    with pytest.raises(LFTError, match="out of range"):
        recoupling_grid(lambda i: hs[i], 3, pairs=4, spans=[(2, 4)])
    with pytest.raises(LFTError, match="out of range"):
        recoupling_grid(lambda i: hs[i], 3, pairs=4, spans=[(2, 2)])
    with pytest.raises(LFTError, match="at least 2"):
        recoupling_grid(lambda i: hs[i], 3, pairs=1)
    bad = [h.copy() for h in hs]
    bad[2][0, 1, 0] = np.inf
    with pytest.raises(LFTError, match="layer 2"):
        recoupling_grid(lambda i: bad[i], 3, pairs=6)


# ------------------------------------------------------------------------------------------------------------
# Crossings, flow recoupling, straight paths
# ------------------------------------------------------------------------------------------------------------


def test_crossing_hand_case_x_shape():
    x0 = np.array([[0.0, 0.0], [0.0, 2.0]])
    x1 = np.array([[2.0, 2.0], [2.0, 0.0]])
    c = crossings(x0, x1)
    assert c.pairs.tolist() == [[0, 1]]
    assert c.delta.tolist() == [8.0]  # 8 + 8 − (4 + 4)
    assert c.t_star.tolist() == [0.5] and c.distance.tolist() == [0.0]
    assert c.share == 1.0 and c.n == 2
    frame = c.to_frame()
    assert list(frame.columns) == ["i", "j", "delta", "t_star", "distance"] and len(frame) == 1


def test_crossing_in_3d_passes_at_distance_one():
    # Same X in the (x, y) plane, but the paths are 1 apart in z: closest at t* = 1/2, distance 1.
    x0 = np.array([[0.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    x1 = np.array([[2.0, 2.0, 0.0], [2.0, 0.0, 1.0]])
    c = crossings(x0, x1)
    assert c.pairs.tolist() == [[0, 1]]
    assert c.delta[0] == pytest.approx(6.0) and c.t_star[0] == pytest.approx(0.5) and c.distance[0] == pytest.approx(1.0)


def test_parallel_paths_do_not_cross():
    x0 = np.array([[0.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    x1 = x0 + np.array([2.0, 0.0])
    c = crossings(x0, x1)
    assert c.pairs.shape == (0, 2) and c.delta.shape == (0,) and c.share == 0.0 and c.n == 3
    assert c.to_frame().empty


def test_crossings_match_brute_force():
    rng = np.random.default_rng(5)
    n = 25
    x0, x1 = rng.standard_normal((n, 6)), rng.standard_normal((n, 6))
    c = crossings(x0, x1)
    found = {tuple(p) for p in c.pairs.tolist()}
    ts = np.linspace(0, 1, 20001)
    expected = set()
    for i in range(n):
        for j in range(i + 1, n):
            keep = np.sum((x0[i] - x1[i]) ** 2) + np.sum((x0[j] - x1[j]) ** 2)
            swap = np.sum((x0[i] - x1[j]) ** 2) + np.sum((x0[j] - x1[i]) ** 2)
            if keep > swap:
                expected.add((i, j))
                k = c.pairs.tolist().index([i, j])
                assert c.delta[k] == pytest.approx(keep - swap)
                path_i = x0[i] + ts[:, None] * (x1[i] - x0[i])
                path_j = x0[j] + ts[:, None] * (x1[j] - x0[j])
                dist = np.linalg.norm(path_i - path_j, axis=1)
                assert c.t_star[k] == pytest.approx(ts[np.argmin(dist)], abs=1e-3)
                assert c.distance[k] == pytest.approx(dist.min(), abs=1e-5)
    assert found == expected and len(found) > 0
    # A crossing pair's closest approach always lies strictly inside (0, 1).
    assert np.all((c.t_star > 0) & (c.t_star < 1))
    involved = {i for p in found for i in p}
    assert c.share == pytest.approx(len(involved) / n)


def test_crossings_refuse_too_many_tokens():
    with pytest.raises(LFTError, match="pick fewer tokens"):
        crossings(np.zeros((2001, 2)), np.zeros((2001, 2)))


def test_flow_recoupled_hand_case():
    x1 = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x_hat = np.array([
        [1.0, 0.0],   # nearest to its own target
        [1.0, 0.0],   # delivered next to token 0's target
        [0.0, 5.0],   # exactly halfway between its own and token 0's target: a tie is not recoupled
    ])
    assert flow_recoupled(x_hat, x1).tolist() == [False, True, False]
    assert flow_recoupled(x1, x1).tolist() == [False, False, False]


def test_straight_path_endpoints_and_midpoint():
    rng = np.random.default_rng(6)
    x0, x1 = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    start, end = torch.from_numpy(x0).expand(3, 4, 3), torch.from_numpy(x1).expand(3, 4, 3)
    path = straight_path(start, end, t).numpy()  # one time per row of the batch
    assert path.shape == (3, 4, 3)
    np.testing.assert_array_equal(path[0], x0)
    np.testing.assert_array_equal(path[2], x1)
    np.testing.assert_allclose(path[1], 0.75 * x0 + 0.25 * x1)
