"""Compare evaluations as units of work (lft_core.analysis.compare_eval, `python -m lft_core compare`): the skip-k
grid of every position computed once per text and reused, results saved under a key that changes with the flows'
weights, and the CLI that the Compare page's background job runs."""
from __future__ import annotations

import json

import pytest

from lft_core.analysis import compare_eval as ce

from cli_helpers import run_cli

CORPUS = "builtin"


@pytest.fixture(scope="module")
def tiny_flows(tiny_neox, tiny_neox_dir):
    from lft_core.flow.config import TrainConfig
    from lft_core.flow.store import flows_dir
    from lft_core.flow.training import train_flow

    names = []
    for seed in (0, 1):
        name = f"ce-fw-{seed}"
        if not (flows_dir() / name).is_dir():
            train_flow(TrainConfig(model=str(tiny_neox_dir), corpus=CORPUS, span=(1, 3), steps=2, batch=2, seq_len=16,
                                   windows=4, heldout_windows=1, distill_steps=0, seed=seed, name=name),
                       teacher=tiny_neox, verbose=False)
        names.append(name)
    return names


def test_the_skip_grid_is_computed_once_and_read_back(tiny_neox, monkeypatch):
    from lft_core.analysis import comparison

    path = ce.skip_grid_path(tiny_neox, CORPUS, 2, 16, (1, 2))
    path.unlink(missing_ok=True)
    first = ce.skip_grid_cached(tiny_neox, CORPUS, 2, 16, (1, 2))
    assert path.is_file() and {(r.k, r.start) for r in first} >= {(1, 0), (2, 0), (1, tiny_neox.n_layers - 1)}

    def no_second_time(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(comparison, "skip_kl_grid", no_second_time)
    assert ce.skip_grid_cached(tiny_neox, CORPUS, 2, 16, (1, 2)) == first
    assert ce.skip_grid_path(tiny_neox, CORPUS, 3, 16, (1, 2)) != path  # other windows: another grid


def test_a_result_is_named_by_the_flows_weights():
    req = ce.CompareRequest(("a", "b"), "mix", 4, 128, 3, True, ("affine",))
    key = ce.request_key(req, "m", "h", {"a": "1", "b": "2"})
    assert key == ce.request_key(ce.CompareRequest(("b", "a"), "mix", 4, 128, 3, True, ("affine",)), "m", "h",
                                 {"a": "1", "b": "2"})
    assert key != ce.request_key(req, "m", "h", {"a": "1", "b": "3"})  # a retrained flow: a new result
    assert key != ce.request_key(ce.CompareRequest(("a", "b"), "mix", 8, 128, 3, True, ("affine",)), "m", "h",
                                 {"a": "1", "b": "2"})


def test_the_compare_command_evaluates_saves_and_reuses(tiny_neox_dir, tiny_flows, capsys, tmp_path):
    args = ["compare", "--model", tiny_neox_dir, "--flows", ",".join(tiny_flows), "--corpus", CORPUS, "--windows", "2",
            "--seq-len", "16", "--skip-max", "2", "--baselines", "affine", "--json", tmp_path / "r.json",
            "--progress-file", tmp_path / "p.jsonl"]
    rc, err = run_cli(args, capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["flow"] for r in result["flow_rows"]] == tiny_flows
    assert len(result["baseline_rows"]) == 1 and sorted(result["baseline_rows"][0]["members"]) == sorted(tiny_flows)
    assert {r["k"] for r in result["grid"]} == {1, 2}
    events = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert events[-1]["step"] == events[-1]["steps"] and all("label" in e for e in events)
    saved = ce.saved_comparison(result["key"])
    assert saved is not None and saved["flow_rows"] == result["flow_rows"]
    rc, err = run_cli(args, capsys)  # the same request again: read back
    assert rc == 0 and "done (saved earlier)" in err


def test_the_compare_command_refuses_a_missing_flow_before_loading(tiny_neox_dir, capsys):
    rc, err = run_cli(["compare", "--model", tiny_neox_dir, "--flows", "no-such-flow", "--corpus", CORPUS], capsys)
    assert rc == 2 and "no-such-flow" in err and "Traceback" not in err
    rc, err = run_cli(["compare", "--model", tiny_neox_dir, "--corpus", CORPUS], capsys)
    assert rc == 2 and "--flows is empty" in err
