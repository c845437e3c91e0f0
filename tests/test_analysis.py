"""Coupling analysis from the cache and trajectory tables (known answers where they exist)."""
from __future__ import annotations

import numpy as np
import pytest

from lft_core.analysis.recoupling import all_layer_cache, recoupling_for_model
from lft_core.analysis.crossings import span_coupling
from lft_core.span import parse_spans
from lft_core.errors import LFTError
from lft_core.analysis.trajectories import project_table, trajectory_table
from lft_core.flow.store import open_flow
from lft_core.flow.config import TrainConfig
from lft_core.flow.training import train_flow


def test_parse_spans():
    assert parse_spans("all", 4) is None
    assert parse_spans("0:2,1:4", 4) == [(0, 2), (1, 4)]
    for bad in ["2:2", "0:5", "x"]:
        with pytest.raises(LFTError):
            parse_spans(bad, 4)


def test_recoupling_grid_of_a_model(tiny_neox):
    grid = recoupling_for_model(tiny_neox, pairs=40, seq_len=16, windows=4)
    L = tiny_neox.n_layers
    assert grid.matrix.shape == (L + 1, L + 1)
    upper = np.triu(np.ones((L + 1, L + 1), bool), 1)
    assert np.isfinite(grid.matrix[upper]).all() and np.isnan(grid.matrix[~upper]).all()
    assert ((grid.matrix[upper] >= 0) & (grid.matrix[upper] <= 1)).all()


def test_span_coupling_with_flow(tiny_neox, tiny_neox_dir):
    cache = all_layer_cache(tiny_neox, seq_len=16, windows=4, progress=False)
    res = span_coupling(tiny_neox, cache, (1, 3), n_tokens=30)
    assert res.x0.shape == (30, 64) and (res.token_index[:, 1] >= 1).all()
    assert np.array_equal(res.x0, np.asarray(cache.layer(1)[res.token_index[:, 0], res.token_index[:, 1]], float))
    assert 0 <= res.crossings.share <= 1 and res.flow_recoupled is None
    train_flow(TrainConfig(model=str(tiny_neox_dir), span=(1, 3), steps=2, batch=2, seq_len=16, windows=4,
                           heldout_windows=1, name="t-cpl", distill_steps=0), teacher=tiny_neox, verbose=False)
    flow, _ = open_flow("t-cpl", tiny_neox)
    res = span_coupling(tiny_neox, cache, (1, 3), n_tokens=30, flow=flow, k=2)
    assert res.flow_recoupled.shape == (30,) and res.x_hat.shape == (30, 64)
    with pytest.raises(LFTError, match="replaces"):
        span_coupling(tiny_neox, cache, (0, 2), n_tokens=30, flow=flow)


def test_trajectory_table(tiny_neox, tiny_neox_dir):
    train_flow(TrainConfig(model=str(tiny_neox_dir), span=(1, 3), steps=2, batch=2, seq_len=16, windows=4,
                           heldout_windows=1, name="t-traj", distill_steps=0), teacher=tiny_neox, verbose=False)
    flow, _ = open_flow("t-traj", tiny_neox)
    ids = tiny_neox.encode("One two three four five six seven.")
    df = trajectory_table(tiny_neox, ids, (1, 3), [1, 2], {"FW": flow}, k=2, fine_steps=5)
    counts = df.groupby("kind").size().to_dict()
    assert counts == {"teacher": 6, "straight": 6, "FW": 6, "FW (fine)": 12}
    teacher = df[df.kind == "teacher"]
    straight = df[df.kind == "straight"]
    # the straight path starts and ends where the teacher path does
    for pos in (1, 2):
        t_rows = teacher[teacher.position == pos].sort_values("t")
        s_rows = straight[straight.position == pos].sort_values("t")
        np.testing.assert_allclose(s_rows.state.iloc[0], t_rows.state.iloc[0])
        np.testing.assert_allclose(s_rows.state.iloc[-1], t_rows.state.iloc[-1], rtol=1e-6)
    fw = df[df.kind == "FW"]
    np.testing.assert_allclose(fw[fw.step == 0].state.iloc[0], teacher[teacher.step == 0].state.iloc[0], rtol=1e-5,
                               atol=1e-5)
    projected = project_table(df, "pca")
    assert {"x", "y"} <= set(projected.columns) and np.isfinite(projected[["x", "y"]].to_numpy()).all()
    with pytest.raises(LFTError, match="positions"):
        trajectory_table(tiny_neox, ids, (1, 3), [99])


def test_text_coupling_matches_hidden_states(tiny_neox):
    from lft_core.analysis.crossings import text_coupling

    ids = tiny_neox.encode("Alpha beta gamma delta epsilon zeta eta theta.")
    res = text_coupling(tiny_neox, ids, (1, 3))
    hs = tiny_neox.hidden_states(ids, [1, 3])
    np.testing.assert_allclose(res.x0, hs[1][0, 1:].double().numpy())
    assert list(res.token_index[:, 1]) == list(range(1, ids.shape[1]))
    assert res.recoupling.n == ids.shape[1] - 1
