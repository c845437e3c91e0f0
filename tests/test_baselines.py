"""Closed-form baselines: the affine replacement of a span (known answers), its splice, the grid, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lft_core.analysis.affine import AffineReplacement, affine_grid, fit_affine, fit_affine_for_span
from lft_core.analysis.baselines import Prepared, get_baseline
from lft_core.run.cli import main
from lft_core.errors import LFTError
from lft_core.analysis.evaluation import eval_windows, evaluate
from lft_core.model.loading import load_teacher
from lft_core.model.teacher import Replace


def _source(*arrays, batch: int = 50):
    """A re-iterable batch source (x0, x1, w) over token rows, as fit_affine reads the cache."""
    x0, x1, w = arrays

    def batches():
        for s in range(0, len(x0), batch):
            yield x0[s : s + batch], x1[s : s + batch], w[s : s + batch]

    return batches


def test_an_exactly_affine_span_is_recovered():
    rng = np.random.default_rng(0)
    d = 12
    A, c = rng.standard_normal((d, d)) * 0.3, rng.standard_normal(d)
    inputs = lambda n: rng.standard_normal((n, d)) * rng.uniform(0.5, 20, d) + rng.standard_normal(d)  # noqa: E731
    x0, held0 = inputs(400), inputs(100)  # unequal scales per dimension
    x1, held1 = x0 + x0 @ A + c, held0 + held0 @ A + c
    w = 1.0 / np.einsum("nd,nd->n", x1, x1)
    fit = fit_affine((0, 1), _source(x0, x1, w), _source(held0, held1, np.ones(len(held0))), d,
                     ridge_grid=(0.0, 1e-3, 1e-1))
    assert fit.ridge == 0.0  # no ridge is best on noiseless data
    assert fit.heldout_nmse < 1e-18
    pred = fit(torch.from_numpy(held0)[None].double()).numpy()[0]
    np.testing.assert_allclose(pred, held1, rtol=1e-4, atol=1e-4)  # the map is stored in float32
    assert fit.span == (0, 1) and fit.weight.shape == (d, d)


def test_ridge_on_rank_deficient_data_stays_finite():
    rng = np.random.default_rng(1)
    d = 16
    base = rng.standard_normal((10, 4))
    x0 = base @ rng.standard_normal((4, d))  # rank 4, and fewer tokens (10) than dimensions
    x0[:, 3] = 7.0  # a constant dimension (sigma 0)
    x1 = np.tanh(x0) + 1.0
    fit = fit_affine((2, 5), _source(x0, x1, np.ones(10)), _source(x0[:4], x1[:4], np.ones(4)), d)
    for t in (fit.weight, fit.bias, fit.mu, fit.sigma):
        assert torch.isfinite(t).all()
    assert np.isfinite(fit.heldout_nmse) and fit.ridge > 0
    out = fit(torch.from_numpy(x0).float()[None])
    assert torch.isfinite(out).all()


def test_affine_refuses_without_data():
    d = 3
    empty = np.zeros((0, d))
    with pytest.raises(LFTError, match="at least 2 tokens"):
        fit_affine((0, 1), _source(empty, empty, np.zeros(0)), _source(empty, empty, np.zeros(0)), d)


def _stack(rng, L: int, W: int, T: int, d: int, nonlinear: bool):
    """Hidden states of a synthetic 'model': h_{i+1} = h_i + h_i A_i + c_i (or tanh of it), float16 like the cache."""
    h = [rng.standard_normal((W, T, d))]
    for _ in range(L):
        A, c = rng.standard_normal((d, d)) * 0.2, rng.standard_normal(d) * 0.1
        nxt = h[-1] + h[-1] @ A + c
        h.append(np.tanh(nxt) * 3 if nonlinear else nxt)
    return [x.astype(np.float16) for x in h]


def test_affine_grid_is_near_zero_on_an_affine_model_and_not_on_a_nonlinear_one():
    L, d = 4, 8
    for nonlinear in (False, True):
        hs = _stack(np.random.default_rng(3), L, 36, 9, d, nonlinear)
        train, held = [h[:30] for h in hs], [h[30:] for h in hs]  # the same maps, other windows
        seen = []
        grid = affine_grid(lambda i: train[i], lambda i: held[i], L, progress=lambda a, b: seen.append((a, b)))
        upper = np.triu(np.ones((L + 1, L + 1), bool), 1)
        assert np.isfinite(grid.matrix[upper]).all() and np.isnan(grid.matrix[~upper]).all()
        assert seen[-1] == (10, 10) and grid.tokens == 30 * 8 and grid.heldout_tokens == 6 * 8
        if nonlinear:
            assert grid.matrix[0, L] > 1e-3
        else:  # a composition of affine maps is affine: only float16 rounding is left
            assert grid.matrix[upper].max() < 1e-4, grid.matrix


def test_grid_matches_the_single_span_fit_when_weights_agree():
    """The grid's shared-Gram path and fit_affine (w = 1, position 0 dropped) give the same held-out NMSE."""
    L, d = 3, 6
    hs = _stack(np.random.default_rng(5), L, 40, 7, d, nonlinear=True)
    train, held = [h[:30] for h in hs], [h[30:] for h in hs]
    rows = lambda hs_, i: np.asarray(hs_[i][:, 1:], np.float64).reshape(-1, d)  # noqa: E731
    x0, x1, h0, h1 = rows(train, 1), rows(train, 3), rows(held, 1), rows(held, 3)
    # fit_affine's λ is relative to the mean Gram eigenvalue of its (uncentred) inputs, the grid's to the centred
    # ones: compare both at λ = 0, where the two are the same least-squares fit
    grid = affine_grid(lambda i: train[i], lambda i: held[i], L, spans=[(1, 3)], ridge_grid=(0.0,))
    fit = fit_affine((1, 3), _source(x0, x1, np.ones(len(x0))), _source(h0, h1, np.ones(len(h0))), d,
                     ridge_grid=(0.0,))
    assert abs(grid.matrix[1, 3] - fit.heldout_nmse) < 1e-4 * max(fit.heldout_nmse, 1e-3)
    assert np.isnan(grid.matrix[0, 2])  # only the asked span is computed


# ---------------------------------------------------------------------------------------------------------
# Splicing into a teacher


@pytest.fixture(scope="module")
def identity_span_teacher(tiny_neox_dir, tmp_path_factory):
    """The tiny GPT-NeoX with blocks 1 and 2 turned into identities (their output projections zeroed), saved as
    a folder of its own (so its weights hash, and its activation cache, differ from the original's)."""
    import shutil

    folder = tmp_path_factory.mktemp("identity-neox")
    teacher = load_teacher(str(tiny_neox_dir))
    with torch.no_grad():
        for i in (1, 2):
            block = teacher._blocks[i]
            for layer in (block.attention.dense, block.mlp.dense_4h_to_h):
                layer.weight.zero_()
                layer.bias.zero_()
    teacher.model.save_pretrained(folder)
    for f in tiny_neox_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return load_teacher(str(folder))


def test_affine_kl_is_zero_when_the_span_is_the_identity(identity_span_teacher):
    teacher = identity_span_teacher
    affine = fit_affine_for_span(teacher, (1, 3), seq_len=32, windows=8, heldout_windows=2, progress=False)
    assert float(affine.weight.abs().max()) == 0.0 and float(affine.bias.abs().max()) == 0.0
    assert affine.heldout_nmse == 0.0
    ids = eval_windows(teacher, "builtin", None, 2, 32)
    result = evaluate(teacher, None, None, ids, ks=[], skips=[1], best_skip=False,
                      baselines=[Prepared(get_baseline("affine"), affine)])
    row = next(r for r in result.rows if r.model == "affine")
    assert row.kl < 1e-9 and row.nmse < 1e-12 and row.k == 1
    skip = next(r for r in result.rows if r.model == "skip")
    assert skip.kl < 1e-9  # skipping an identity block changes nothing either


def test_affine_splices_like_a_flow(tiny_neox):
    affine = fit_affine_for_span(tiny_neox, (1, 3), seq_len=32, windows=8, heldout_windows=2, progress=False)
    assert isinstance(affine, AffineReplacement) and affine.span == (1, 3)
    ids = eval_windows(tiny_neox, "builtin", None, 2, 32)
    spliced = tiny_neox.logits(ids, Replace(affine))
    x = tiny_neox.hidden_states(ids, [1, 3])
    by_hand = affine(x[1])
    assert spliced.shape == tiny_neox.logits(ids).shape and torch.isfinite(spliced).all()
    assert float((by_hand - x[3]).pow(2).sum() / x[3].pow(2).sum()) < float((x[1] - x[3]).pow(2).sum() / x[3].pow(2).sum())
    with pytest.raises(LFTError, match="the affine map replaces 1:3, not 0:2"):
        evaluate(tiny_neox, None, (0, 2), ids, ks=[], skips=[], baselines=[Prepared(get_baseline("affine"), affine)])


def test_affine_end_point_in_the_trajectory_table(tiny_neox):
    from lft_core.analysis.trajectories import trajectory_table

    affine = fit_affine_for_span(tiny_neox, (1, 3), seq_len=32, windows=8, heldout_windows=2, progress=False)
    ids = tiny_neox.encode("One two three four five six seven.")
    df = trajectory_table(tiny_neox, ids, (1, 3), [1, 4], endpoints={"affine": affine})
    rows = df[df.kind == "affine"].sort_values(["position", "t"])
    assert len(rows) == 4 and list(rows["t"]) == [0.0, 1.0, 0.0, 1.0]
    h = tiny_neox.hidden_states(ids, [1])[1][0]
    expected = affine(h[None])[0]
    np.testing.assert_allclose(rows.iloc[1]["state"], expected[1].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows.iloc[0]["state"], h[1].numpy())  # starts at h_m
    with pytest.raises(LFTError, match="replaces 1:3, not 0:2"):
        trajectory_table(tiny_neox, ids, (0, 2), [1], endpoints={"affine": affine})


# ---------------------------------------------------------------------------------------------------------
# CLI


def test_cli_baselines_of_one_span(tiny_neox_dir, tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["baselines", "--model", str(tiny_neox_dir), "--span", "1:3", "--skip", "1,2", "--windows", "2",
               "--seq-len", "32", "--fit-windows", "8", "--heldout-windows", "2", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    models = [(r["model"], r.get("where"), r["k"]) for r in data["rows"]]
    assert ("affine", None, 1) in models
    assert {("skip", "span", 1), ("skip", "best", 1), ("skip", "span", 2), ("skip", "best", 2)} <= set(models)
    affine = next(r for r in data["rows"] if r["model"] == "affine")
    assert set(affine) >= {"kl", "nmse", "ppl", "k"} and affine["kl"] >= 0
    assert data["span"] == [1, 3] and data["fit"]["windows"] == 8
    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat and looked out of the window at the rain. " * 3)
    rc = main(["baselines", "--model", str(tiny_neox_dir), "--span", "1:3", "--skip", "1", "--text", str(text),
               "--seq-len", "32", "--fit-windows", "8", "--heldout-windows", "2", "--json", str(out)])
    assert rc == 0
    assert json.loads(out.read_text())["tokens"] < 64


def test_cli_affine_grid(tiny_neox_dir, tmp_path, capsys):
    out = tmp_path / "g.json"
    # a window size no other test caches (a cache hit elsewhere would change what those tests see)
    rc = main(["baselines", "--model", str(tiny_neox_dir), "--spans", "all", "--seq-len", "20",
               "--grid-windows", "6", "--grid-heldout-windows", "2", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["metric"] == "nmse" and data["layers"] == 4 and data["seconds"] >= 0
    matrix = data["matrix"]
    assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
    assert all((matrix[m][n] is None) == (m >= n) for m in range(5) for n in range(5))
    assert all(matrix[m][n] >= 0 for m in range(5) for n in range(m + 1, 5))


def test_cli_eval_with_the_affine_baseline(tiny_neox, tiny_neox_dir, tmp_path, capsys):
    from lft_core.flow.config import TrainConfig
    from lft_core.flow.training import train_flow

    train_flow(TrainConfig(model=str(tiny_neox_dir), span=(1, 3), steps=2, batch=2, seq_len=32, windows=8,
                           heldout_windows=2, name="t-aff", distill_steps=0), teacher=tiny_neox, verbose=False)
    out = tmp_path / "e.json"
    rc = main(["eval", "--flow", "t-aff", "--k", "1", "--skip", "1", "--windows", "2", "--baselines", "affine",
               "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows].count("affine") == 1 and [r["model"] for r in rows].count("lft") == 1
    affine = next(r for r in rows if r["model"] == "affine")
    assert affine["k"] == 1 and affine["kl"] >= 0 and affine["nmse"] > 0
    assert "affine" in capsys.readouterr().out  # the printed table has the row


@pytest.mark.parametrize("argv, match", [
    (["baselines", "--span", "1:3", "--spans", "all"], "either --span"),
    (["baselines"], "either --span"),
    (["baselines", "--spans", "all", "--text", "x.txt"], "--text goes with --span"),
    (["baselines", "--span", "1:3", "--skip", "0"], "at least 1"),
    (["eval", "--flow", "x", "--baselines", "mlp"], "unknown baseline"),
])
def test_cli_baselines_bad_input(argv, match, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and match in err.strip().splitlines()[-1] and "Traceback" not in err


def test_affine_grid_drops_massive_activations():
    """An exactly affine stack where one token of every other window becomes a massive activation from layer 2
    on (as SmolLM2's do from block 11): dropped, the grid still sees an affine model; kept, they would decide it."""
    L, d = 4, 8
    hs = [h.astype(np.float64) for h in _stack(np.random.default_rng(6), L, 36, 9, d, nonlinear=False)]
    for i in range(2, L + 1):
        hs[i][::2, 3] = 3e3 * np.sign(hs[i][::2, 3] + 1e-9)  # not affine in h_0, and huge
    hs = [h.astype(np.float16) for h in hs]
    train, held = [h[:30] for h in hs], [h[30:] for h in hs]
    grid = affine_grid(lambda i: train[i], lambda i: held[i], L)
    assert grid.massive_dropped == 15 + 3 and grid.tokens == 30 * 8 - 15
    assert grid.matrix[0, L] < 1e-3, grid.matrix


# ---------------------------------------------------------------------------------------------------------
# Fits kept on disk


def test_a_fit_is_kept_read_back_and_refitted_when_damaged(tiny_neox):
    from lft_core.analysis.baselines import FitData, fit_file, fit_key, prepare, slow_fit, stored_fit

    data = FitData("english", 24, 5, 2)  # windows no other test caches
    span = (1, 3)
    assert stored_fit("affine", tiny_neox, span, data) is None
    assert slow_fit("affine", tiny_neox, span, data)  # the hidden states are not cached: a job on a real model
    first = prepare("affine", tiny_neox, span, data, progress=False)
    path = fit_file(fit_key("affine", tiny_neox, span, data))
    assert path.is_file() and not slow_fit("affine", tiny_neox, span, data)
    again = stored_fit("affine", tiny_neox, span, data)
    for name in ("weight", "bias", "mu", "sigma"):
        assert torch.equal(again.replacement.get_buffer(name), first.replacement.get_buffer(name))
    assert again.replacement.ridge == first.replacement.ridge
    assert again.replacement.heldout_nmse == first.replacement.heldout_nmse
    path.write_bytes(path.read_bytes()[:100])  # a torn file reads as no fit, and the next use fits again
    assert stored_fit("affine", tiny_neox, span, data) is None
    refit = prepare("affine", tiny_neox, span, data, progress=False)
    assert torch.equal(refit.replacement.weight, first.replacement.weight)
    assert stored_fit("affine", tiny_neox, span, data) is not None


def test_the_fit_key_names_everything_the_fit_depends_on(tiny_neox):
    from lft_core.analysis.baselines import FitData, fit_key

    data = FitData("english", 24, 5, 2)
    keys = {fit_key("affine", tiny_neox, (1, 3), data), fit_key("affine", tiny_neox, (0, 3), data),
            fit_key("affine", tiny_neox, (1, 3), FitData("english", 24, 6, 2)),
            fit_key("affine", tiny_neox, (1, 3), FitData("english", 16, 5, 2)),
            fit_key("affine", tiny_neox, (1, 3), FitData("english", 24, 5, 2, sink_weight=1.0)),
            fit_key("affine", tiny_neox, (1, 3), FitData("builtin", 24, 5, 2))}
    assert len(keys) == 6 and fit_key("affine", tiny_neox, (1, 3), data).startswith("affine-1-3-")


def test_cli_fit_only_keeps_the_fit_and_evaluates_nothing(tiny_neox, tiny_neox_dir, tmp_path, capsys):
    from lft_core.analysis.baselines import FitData, stored_fit

    out = tmp_path / "f.json"
    rc = main(["baselines", "--model", str(tiny_neox_dir), "--span", "0:2", "--baselines", "affine", "--fit-only",
               "--corpus", "english", "--seq-len", "24", "--fit-windows", "4", "--heldout-windows", "2",
               "--sink-weight", "3", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["span"] == [0, 2] and "rows" not in data
    fit = data["fits"]["affine"]
    assert fit["key"].startswith("affine-0-2-") and fit["heldout_nmse"] > 0
    kept = stored_fit("affine", tiny_neox, (0, 2), FitData("english", 24, 4, 2, 3.0))
    assert kept is not None and kept.replacement.ridge == fit["ridge"]
    assert stored_fit("affine", tiny_neox, (0, 2), FitData("english", 24, 4, 2)) is None  # another sink weight


@pytest.mark.parametrize("argv, match", [
    (["baselines", "--spans", "all", "--fit-only"], "--fit-only goes with --span"),
    (["baselines", "--span", "1:3", "--fit-only", "--baselines", "skip"], "none of skip is fitted"),
])
def test_cli_fit_only_bad_input(argv, match, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and match in err.strip().splitlines()[-1] and "Traceback" not in err
