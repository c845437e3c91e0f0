"""lft_core.analysis.comparison: recipes over seeds, curves against step and time, skip-k rows once, the paper's plot."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from lft_core.analysis import comparison as cmp
from lft_core.analysis import recipes
from lft_core.span import Span
from lft_core.flow.store import SavedFlow
from lft_core.flow.config import TrainConfig


def saved(name: str, nmse: float | None = 0.3, history: list[dict] | None = None, **settings) -> SavedFlow:
    """A SavedFlow record as list_flows() makes it from a config.json written by training."""
    cfg = TrainConfig(span=settings.pop("span", (2, 4)), steps=4, windows=8, heldout_windows=2, seq_len=32, batch=2,
                      distill_steps=0, name=name, **settings)
    config = {**{k: v for k, v in asdict(cfg).items() if k != "name"}, "span": list(cfg.span), "name": name,
              "model": "m", "weights_hash": "w", "status": "complete", "steps_done": 4}
    if history is None:
        history = [{"step": s, "loss": 1.0 / s, "tokens_per_s": 640.0} for s in range(1, 5)]
        history[1]["heldout_nmse"] = 2 * nmse if nmse is not None else None
        history[-1]["heldout_nmse"] = nmse
    config["history"] = history
    return SavedFlow.from_config(name, Path("/nowhere") / name, config)


# -- recipes ------------------------------------------------------------------------------------------------


def test_two_seeds_of_one_recipe_form_one_group_with_mean_and_std():
    flows = [saved("a-s0", 0.2, seed=0), saved("a-s1", 0.4, seed=1)]
    groups = recipes.group_flows(flows)
    assert len(groups) == 1
    g = groups[0]
    assert g.names == ["a-s0", "a-s1"] and g.seeds == [0, 1]
    s = g.summary()
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.3) and s["std"] == pytest.approx(math.sqrt(0.02))
    assert g.span == Span(2, 4) and g.method == "fw" and g.k == 3


def test_a_different_k_or_lr_splits_the_group_and_is_named_in_the_label():
    flows = [saved("a-s0", 0.2, seed=0), saved("a-s1", 0.4, seed=1), saved("b-s0", 0.5, seed=0, k=2),
             saved("c-s0", 0.6, seed=0, lr=3e-4), saved("c-s1", 0.8, seed=1, lr=3e-4)]
    groups = recipes.group_flows(flows)
    assert [g.names for g in groups] == [["a-s0", "a-s1"], ["b-s0"], ["c-s0", "c-s1"]]
    labels = [g.label for g in groups]
    assert len(set(labels)) == 3
    assert "k=2" in labels[1] and "lr=0.0003" in labels[2]
    one = groups[1].summary()
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.5) and math.isnan(one["std"])


def test_name_sweep_and_bookkeeping_do_not_split_a_recipe_but_the_corpus_and_span_do():
    flows = [saved("x", 0.1, seed=0, sweep="sw", eval_every=1), saved("y", 0.3, seed=5, sweep="sw", checkpoint_every=2),
             saved("z", 0.3, seed=0, corpus="builtin"), saved("w", 0.3, seed=0, span=(4, 8))]
    groups = recipes.group_flows(flows)
    assert [g.names for g in groups] == [["x", "y"], ["z"], ["w"]]
    assert groups[0].label.startswith("sw: ") and groups[0].sweep == "sw"
    table = recipes.groups_table(groups)
    assert list(table["n"]) == [2, 1, 1] and table["held-out NMSE"].iloc[0] == "0.2000 ± 0.1414"


def test_unreadable_records_are_left_out():
    bad = SavedFlow("broken", Path("/nowhere"), error="unreadable config")
    assert [g.names for g in recipes.group_flows([bad, saved("a")])] == [["a"]]


# -- curves -------------------------------------------------------------------------------------------------


def test_time_is_the_recorded_elapsed_field_or_the_sum_of_step_durations():
    f = saved("a")  # 2 windows x 32 tokens per step at 640 tokens/s: 0.1 s a step
    seconds, how = recipes.history_seconds(f)
    assert how == "summed step times" and np.allclose(seconds, [0.1, 0.2, 0.3, 0.4])
    timed = saved("b", history=[{"step": s, "loss": 1.0, "elapsed_s": 2.0 * s} for s in (1, 2)])
    seconds, how = recipes.history_seconds(timed)
    assert how == "recorded" and list(seconds) == [2.0, 4.0]
    assert recipes.history_seconds(saved("c", history=[{"step": 1, "loss": 1.0}])) is None
    curve = recipes.history_curve(f, "heldout_nmse", "seconds")
    assert np.allclose(curve["x"], [0.2, 0.4]) and np.allclose(curve["y"], [0.6, 0.3])


def test_group_curves_average_seeds_on_steps_and_on_time():
    fast = saved("a-s0", 0.2, seed=0)
    slow_history = [{"step": s, "loss": 3.0 / s, "tokens_per_s": 320.0} for s in range(1, 5)]
    slow_history[-1]["heldout_nmse"] = 0.4
    slow = saved("a-s1", seed=1, history=slow_history)
    g, = recipes.group_flows([fast, slow])
    by_step = recipes.group_curves(g, "loss", "step")
    assert list(by_step["x"]) == [1, 2, 3, 4] and (by_step["n"] == 2).all()
    assert by_step["mean"].iloc[0] == pytest.approx(2.0) and by_step["std"].iloc[0] == pytest.approx(math.sqrt(2))
    by_time = recipes.group_curves(g, "loss", "seconds")
    # the common range is where both ran: 0.2 s (the slow seed's first step) to 0.4 s (the fast seed's last)
    assert by_time["x"].min() == pytest.approx(0.2) and by_time["x"].max() == pytest.approx(0.4)
    frame = recipes.curves_frame([g], "step")
    assert set(frame["metric"]) == {"loss", "heldout_nmse"} and set(frame["recipe"]) == {g.label}


# -- skip-k rows and the paper's plot --------------------------------------------------------------------------


def grid(n_layers: int = 8, ks=(1, 2, 3)) -> list[cmp.SkipKL]:
    """KL grows with k and is lowest at start 5 (a made-up but plausible grid)."""
    return [cmp.SkipKL(k, s, kl=0.1 * k + 0.01 * abs(s - 5), ppl=10.0 + k) for k in ks
            for s in cmp.skip_starts(n_layers, k)]


def test_skip_rows_once_per_span_and_k_however_many_flows_share_the_span():
    spans = [Span(2, 4), Span(2, 4), Span(2, 4), Span(1, 7)]
    rows = cmp.skip_in_span(grid(), spans, max_k=3)
    keys = [(r["span"], r["k"]) for r in rows]
    assert sorted(keys) == [("1:7", 1), ("1:7", 2), ("1:7", 3), ("2:4", 1), ("2:4", 2)]  # k <= n - m
    assert all(r["start"] == int(r["span"].split(":")[0]) for r in rows)
    best = cmp.best_skips(grid())
    assert {k: r.start for k, r in best.items()} == {1: 5, 2: 5, 3: 5}
    flow_rows = [{"flow": name, "span": "2:4", "k": 3, "KL": 0.05 * (i + 1), "PPL": 12.0, "NMSE": 0.1}
                 for i, name in enumerate(["a", "b", "c"])]
    affine = [{"baseline": "affine", "name": "affine 2:4", "span": "2:4", "KL": 0.3, "PPL": 13.0, "NMSE": 0.2}]
    table = cmp.evaluation_table(flow_rows, affine, rows, best)
    skip_in = table[table["row"] == "skip-k in span"]
    assert not skip_in.duplicated(["span", "k"]).any() and len(skip_in) == 5
    assert list(table[table["row"] == "flow"]["name"]) == ["a", "b", "c"]
    assert len(table[table["row"] == "skip-k best position"]) == 3
    per_flow = cmp.per_flow_table(flow_rows, {}, rows, 11.0)
    assert set(per_flow[per_flow["flow"] == "a"]["model"]) == {"LFT k=3", "skip 1", "skip 2"}


def test_kl_vs_blocks_has_flows_as_mean_and_std_baselines_and_the_papers_points():
    flows = [saved("a-s0", seed=0), saved("a-s1", seed=1), saved("b", span=(1, 7))]
    groups = recipes.group_flows(flows)
    flow_rows = [{"flow": "a-s0", "span": "2:4", "k": 3, "KL": 0.2, "PPL": 12.0, "NMSE": 0.1},
                 {"flow": "a-s1", "span": "2:4", "k": 3, "KL": 0.4, "PPL": 12.0, "NMSE": 0.1},
                 {"flow": "b", "span": "1:7", "k": 3, "KL": 0.5, "PPL": 14.0, "NMSE": 0.3}]
    skips = cmp.skip_in_span(grid(), [Span(2, 4), Span(1, 7)], max_k=3)
    points = cmp.kl_vs_blocks(flow_rows, groups, skips, cmp.best_skips(grid()),
                              [{"baseline": "affine", "name": "affine 2:4", "span": "2:4", "KL": 0.7, "PPL": 20.0}])
    flows_pts = points[points["kind"] == "flow"].set_index("x")
    assert flows_pts.loc[2, "KL"] == pytest.approx(0.3) and flows_pts.loc[2, "err"] == pytest.approx(math.sqrt(0.02))
    assert flows_pts.loc[2, "n"] == 2 and flows_pts.loc[6, "n"] == 1
    assert len(points[points["kind"] == "skip in span"]) == 5 and len(points[points["kind"] == "skip best"]) == 3
    paper = points[points["reference"]]
    assert {(x, kl) for x, kl in zip(paper["x"], paper["KL"])} == {(6, 0.407), (2, 0.529), (12, 0.736), (3, 0.932)}
    assert paper["series"].str.contains("paper, Pythia-410M").all()
    assert not points[~points["reference"]]["series"].str.contains("paper").any()
    by_recipe = cmp.group_evaluation(flow_rows, groups)
    assert list(by_recipe["n"]) == [2, 1] and by_recipe["KL"].iloc[0] == "0.3000 ± 0.1414"

    from app.figures.compare import kl_vs_blocks_figure

    fig = kl_vs_blocks_figure(points)
    names = {t.name for t in fig.data}
    assert {"paper, Pythia-410M: skip-k", "paper, Pythia-410M: trained flows", "skip-k in span",
            "skip-k at its best position", "trained flows (FW)", "affine replacement"} <= names
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_skip_grid_on_a_model_matches_the_evaluation_of_skip_rows(tiny_neox):
    """Skipping by running h_s on from block s + k gives exactly evaluation's skip-k (the model with blocks removed),
    at every start, however the windows are batched."""
    import torch

    from lft_core.analysis.evaluation import skip_rows

    ids = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    got = cmp.skip_kl_grid(tiny_neox, ids, (1, 2), batch=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 8) for i in range(1, 9)]  # 2 batches x 4 starts
    assert {(r.start, r.k) for r in got} == {(s, k) for k in (1, 2) for s in range(0, 4 - k + 1)}
    assert all(r.kl > 0 and r.ppl > 0 for r in got)
    for start in range(4):
        fits = [k for k in (1, 2) if start + k <= 4]
        ref = {r.k: (r.kl, r.ppl) for r in skip_rows(tiny_neox, (start, 4), ids, skips=fits, best_skip=False)}
        at = {r.k: (r.kl, r.ppl) for r in got if r.start == start}
        assert at.keys() == ref.keys()
        for k in at:
            assert at[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6)
    only = cmp.skip_kl_grid(tiny_neox, ids, (1, 2), starts=cmp.grid_starts(4, (1, 2), [Span(1, 3)]))
    assert {(r.start, r.k) for r in only} == {(1, 1), (1, 2)}
