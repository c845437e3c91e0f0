"""The Compare page under AppTest, through the real navigation frame: recipes over seeds, skip-k rows once per
(span, k), the KL-against-blocks plot with the paper's points, inputs kept across a page switch."""
from __future__ import annotations

import json
import math

import pytest
from streamlit.testing.v1 import AppTest

from app_fixtures import APP, SMALL, TINY_SPAN

TIMEOUT = 240
SEEDS = {"cmp-s1": 1, "cmp-s2": 2}


@pytest.fixture(scope="module")
def two_seeds(smol):
    """Two tiny Flow Walking flows of span 2:4 that differ only in seed (and name)."""
    from lft_core.flow.store import flows_dir
    from lft_core.flow.config import TrainConfig
    from lft_core.flow.training import train_flow

    import shutil

    for name, seed in SEEDS.items():
        if not (flows_dir() / name).is_dir():
            train_flow(TrainConfig(span=TINY_SPAN, steps=3, windows=8, heldout_windows=2, seq_len=32, batch=2,
                                   eval_every=2, distill_steps=0, seed=seed, name=name), teacher=smol, verbose=False)
    yield list(SEEDS)
    for name in SEEDS:  # other modules' pages choose flows of span 2:4 by default: leave them as they were
        shutil.rmtree(flows_dir() / name, ignore_errors=True)


def open_compare(state: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for key, value in {**SMALL, "span": TINY_SPAN, **(state or {})}.items():
        at.session_state[key] = value
    at.run()  # the frame's default page first: AppTest resolves st.navigation pages only after a run
    at.switch_page("views/compare.py").run()
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def evaluate(at: AppTest) -> AppTest:
    """Press Evaluate: a background job evaluates and saves; the page then reads the saved result."""
    from test_app_pages import wait_for_jobs

    buttons = [b for b in at.button if b.label.startswith("Evaluate")]
    if buttons:  # else: saved already (the same flows and settings were evaluated before)
        at = buttons[0].click().run()
        assert_clean(at)
        wait_for_jobs("compare")
        at.run()
    assert_clean(at)
    return at


def chart_specs(at: AppTest) -> list[str]:
    return [el.proto.spec for el in at.get("plotly_chart")]


def test_compare_groups_two_seeds_into_one_recipe(two_seeds):
    at = open_compare()
    assert_clean(at)
    table = at.session_state["compare_table"]
    assert set(two_seeds) <= set(table["name"])
    assert dict(zip(table["name"], table["seed"]))["cmp-s2"] == 2
    recipes = at.session_state["compare_groups"]
    row = recipes[recipes["flows"].str.contains("cmp-s1")].iloc[0]
    assert "cmp-s2" in row["flows"] and row["n"] >= 2  # (tiny-fw joins them when it exists: same recipe, seed 0)
    assert "±" in row["held-out NMSE"] and row["NMSE mean"] > 0 and row["NMSE std"] >= 0
    assert row["span"] == "2:4" and row["blocks"] == 2
    # the recipe's curves are one mean (and band) over the seeds
    curves = at.session_state["compare_curve_table"]
    assert set(curves["metric"]) == {"loss", "heldout_nmse"}
    assert (curves[curves["recipe"] == row["recipe"]]["n"] >= 2).all()


def test_compare_evaluation_shows_each_baseline_once_and_the_papers_plot(two_seeds):
    at = open_compare()
    at.multiselect(key="w_cmp_flows").set_value(two_seeds)
    at.number_input(key="w_cmp_windows").set_value(2)
    at.number_input(key="w_cmp_seq").set_value(32).run()
    assert_clean(at)
    at = evaluate(at)
    shown = at.session_state["compare_eval_table"]
    in_span = shown[shown["row"] == "skip-k in span"]
    assert sorted(zip(in_span["span"], in_span["k"])) == [("2:4", 1), ("2:4", 2)]  # once, not once per flow
    assert sorted(shown[shown["row"] == "flow"]["name"]) == sorted(two_seeds)
    assert len(shown[shown["row"] == "affine"]) == 1  # both seeds share their training data, hence one affine fit
    best = shown[shown["row"] == "skip-k best position"]
    assert list(best["k"]) == [1, 2, 3] and (best["KL"] >= 0).all()
    # the best position is no worse than skipping inside the span
    for k in (1, 2):
        assert best[best["k"] == k]["KL"].iloc[0] <= in_span[in_span["k"] == k]["KL"].iloc[0] + 1e-9
    per_flow = at.session_state["compare_eval"]
    assert set(per_flow[per_flow["flow"] == "cmp-s1"]["model"]) == {"LFT k=3", "skip 1", "skip 2", "affine"}
    recipes = at.session_state["compare_eval_groups"]
    assert list(recipes["n"]) == [2] and "±" in recipes["KL"].iloc[0]
    points = at.session_state["compare_kl_points"]
    flow = points[points["kind"] == "flow"].iloc[0]
    assert flow["x"] == 2 and flow["n"] == 2 and math.isfinite(flow["err"])
    assert flow["KL"] == pytest.approx(shown[shown["row"] == "flow"]["KL"].mean())
    paper = points[points["reference"]]
    assert {(x, kl) for x, kl in zip(paper["x"], paper["KL"])} == {(6, 0.407), (2, 0.529), (12, 0.736), (3, 0.932)}
    specs = [json.loads(s) for s in chart_specs(at)]
    kl_fig = [s for s in specs if any("paper, Pythia-410M" in (t.get("name") or "") for t in s["data"])
              and not any((t.get("name") or "").startswith("shipped flows") for t in s["data"])]  # not the zoo's
    assert len(kl_fig) == 1
    layout = kl_fig[0]["layout"]
    assert "blocks" in layout["xaxis"]["title"]["text"] and "KL" in layout["yaxis"]["title"]["text"]
    assert any("skip-k at its best position" == t.get("name") for t in kl_fig[0]["data"])
    links = [el.proto.label for el in at.get("page_link")]
    assert links.count("Next: replay the lesson in 2-D (teaching lab)") == 1
    # saved: a new session asking the same opens on the result, with nothing to press and nothing recomputed
    again = open_compare()
    again.multiselect(key="w_cmp_flows").set_value(two_seeds)
    again.number_input(key="w_cmp_windows").set_value(2)
    again.number_input(key="w_cmp_seq").set_value(32).run()
    assert_clean(again)
    assert not [b for b in again.button if b.label.startswith("Evaluate")]
    assert again.session_state["compare_eval_table"].equals(shown)


def test_compare_inputs_survive_a_page_switch(two_seeds):
    at = open_compare()
    at.multiselect(key="w_cmp_flows").set_value(["cmp-s2"])
    at.number_input(key="w_cmp_windows").set_value(3)
    at.number_input(key="w_cmp_skip_max").set_value(2)
    at.toggle(key="w_cmp_best").set_value(False)
    at.toggle(key="w_cmp_affine").set_value(False)
    at.radio(key="w_cmp_x").set_value("wall time (s)").run()
    assert_clean(at)
    from lft_core.analysis import recipes
    from lft_core.flow.store import list_flows

    seconds, _ = recipes.history_seconds(next(f for f in list_flows() if f.name == "cmp-s2"))
    curves = at.session_state["compare_curve_table"]
    loss = curves[curves["metric"] == "loss"]
    assert loss["x"].tolist() == pytest.approx(seconds.tolist())  # seconds, not steps
    at.switch_page("views/setup.py").run()
    at.switch_page("views/compare.py").run()
    assert_clean(at)
    assert at.multiselect(key="w_cmp_flows").value == ["cmp-s2"]
    assert at.number_input(key="w_cmp_windows").value == 3
    assert at.number_input(key="w_cmp_skip_max").value == 2
    assert at.toggle(key="w_cmp_best").value is False and at.toggle(key="w_cmp_affine").value is False
    assert at.radio(key="w_cmp_x").value == "wall time (s)"


def test_compare_drops_a_deleted_flow_from_the_kept_choice(two_seeds):
    import shutil

    from lft_core.flow.store import flows_dir

    shutil.copytree(flows_dir() / "cmp-s1", flows_dir() / "cmp-doomed")
    at = open_compare()
    at.multiselect(key="w_cmp_flows").set_value(["cmp-doomed", "cmp-s1"]).run()
    shutil.rmtree(flows_dir() / "cmp-doomed")
    at.run()
    assert_clean(at)
    assert at.multiselect(key="w_cmp_flows").value == ["cmp-s1"]


def shipped_curve(weights_hash: str) -> dict:
    return {"corpus": "mix", "split_rule": "test", "windows": 2, "seq_len": 16, "tokens": 32, "teacher": "smollm2-135m",
            "teacher_weights_hash": weights_hash, "teacher_ppl": 20.0,
            "flows": [{"flow": "zoo-fw-1-7", "span": [1, 7], "blocks": 6, "method": "fw", "k": 3, "kl": 0.4,
                       "nmse": 0.1, "ppl": 22.0}],
            "affine": [{"span": [1, 7], "blocks": 6, "kl": 0.7, "nmse": 0.2, "ppl": 25.0, "fit": "test"}],
            "skip_best": [{"k": k, "start": 16, "kl": 0.1 * k, "ppl": 21.0} for k in range(1, 7)]}


def test_compare_draws_the_shipped_curve_at_once(two_seeds, smol, tmp_path, monkeypatch):
    monkeypatch.setenv("LFT_ZOO_DIR", str(tmp_path))
    (tmp_path / "curve.json").write_text(json.dumps(shipped_curve(smol.weights_hash)))
    at = open_compare()
    assert_clean(at)
    points = at.session_state["compare_zoo_points"]
    shipped = points[points["kind"] == "flow"]
    assert list(shipped["x"]) == [6] and list(shipped["KL"]) == [0.4]
    assert sorted(points[points["kind"] == "skip best"]["x"]) == [1, 2, 3, 4, 5, 6]
    assert list(points[points["kind"] == "affine"]["KL"]) == [0.7]
    assert any("shipped flows (FW)" in spec for spec in chart_specs(at))
    assert "compare_eval" not in at.session_state  # drawn without evaluating anything
    # a curve measured for other weights is not shown
    (tmp_path / "curve.json").write_text(json.dumps(shipped_curve("0" * 16)))
    at = open_compare()
    assert_clean(at)
    assert "compare_zoo_points" not in at.session_state
