"""Every page of the Streamlit app under streamlit.testing (AppTest), through the real navigation frame.

Each test starts the frame (app/streamlit_app.py) with shared choices in session_state, runs it once (the
default page), switches to the page under test and runs it in-process, so the conftest's LFT_CACHE_DIR and
offline settings apply. Plotly charts have no typed accessor, so the tests assert on what the page computed
and stored in session_state, on tables, metrics and messages. Bad input must give an st.error, never an
exception.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from app_fixtures import APP, SMALL, TINY_SPAN, small_cache, tiny_flow  # noqa: F401 (fixtures)

TIMEOUT = 240


def open_page(page: str, state: dict | None = None, query: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for key, value in {**SMALL, **(state or {})}.items():
        at.session_state[key] = value
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()  # the frame's default page first: AppTest resolves st.navigation pages only after a run
    if page != "home":
        at.switch_page(f"views/{page}.py").run()
    return at


def wait_for_jobs(kind: str, seconds: float = 300) -> None:
    """Wait until no job of ``kind`` runs (a page's button started one in the background)."""
    from lft_core.run.jobs import list_jobs

    deadline = time.time() + seconds
    while any(j.status in ("running", "stopping") for j in list_jobs(kind)) and time.time() < deadline:
        time.sleep(0.5)
    failed = [j for j in list_jobs(kind)[:1] if j.status == "failed"]
    assert not failed, failed[0].log_tail(10)


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not errors(at), errors(at)


def click(at: AppTest, label: str) -> AppTest:
    buttons = [b for b in at.button if b.label.startswith(label)]
    assert buttons, f"no button {label!r}: {[b.label for b in at.button]}"
    return buttons[0].click().run()


# -- setup --------------------------------------------------------------------------------------------------


def test_setup_page_shows_model_and_cache(small_cache):
    at = open_page("setup")
    assert_clean(at)
    assert at.title[0].value == "Setup & cache"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Blocks (L)"] == "30" and metrics["Hidden size d"] == "576"
    assert any("All layers of 8 × 32 tokens are cached" in s.value for s in at.success)
    table = next(d.value for d in at.dataframe if "key" in d.value.columns)  # the cache listing
    row = table[table["key"] == small_cache.key].iloc[0]
    assert row["layers"] == "all 31" and row["windows"] == 8
    # the default corpus is the mixture, and the page says what is inside it and where it came from
    assert at.radio(key="w_corpus_source").value.startswith("Built-in broad mixture")
    parts, sources = (d.value for d in at.dataframe if "part" in d.value.columns)
    assert {"fiction", "speeches", "code", "english"} <= set(parts["part"]) and "licence" in sources.columns
    assert any("Inside: human-written text" in c.value for c in at.caption)


def test_setup_unknown_model_offline_is_an_error():
    at = open_page("setup", {"model_spec": "no-such-org/no-such-model"})
    assert not at.exception
    assert any("not available on this machine" in e for e in errors(at)), errors(at)


def test_setup_missing_corpus_path_is_an_error(tmp_path):
    missing = str(tmp_path / "does-not-exist.txt")
    at = open_page("setup", {"corpus_spec": missing})
    assert not at.exception
    assert any("not found" in e for e in errors(at)), errors(at)
    assert at.radio(key="w_corpus_source").value == "Path on this machine"


def test_setup_upload_sets_the_corpus_and_refuses_binary():
    from lft_core.paths import cache_dir

    at = open_page("setup")
    at.radio(key="w_corpus_source").set_value("Upload a file").run()
    text = ("A small corpus about lighthouses and the sea. " * 400).encode()
    at.file_uploader(key="w_upload").set_value(("my notes (v2).txt", text, "text/plain")).run()
    assert_clean(at)
    spec = at.session_state["corpus_spec"]
    assert spec.startswith(str(cache_dir("uploads"))) and spec.endswith("-my_notes_v2.txt")
    assert any("my_notes_v2.txt" in cap.value for cap in at.caption)
    at.file_uploader(key="w_upload").set_value(("evil.txt", b"\x00\x01binary" * 50, "text/plain")).run()
    assert not at.exception
    assert any("binary" in e for e in errors(at)), errors(at)
    assert at.session_state["corpus_spec"] == spec  # the bad file did not replace the good one


def test_setup_cache_job_runs_in_the_background():
    from lft_core.run.jobs import read_job

    at = open_page("setup", {"seq_len": 16, "n_windows": 2})
    at = click(at, "Cache all layers")
    assert_clean(at)
    job_id = at.session_state["cache_job"]
    deadline = time.time() + 180
    while read_job(job_id).status == "running" and time.time() < deadline:
        time.sleep(1)
    assert read_job(job_id).status == "complete", read_job(job_id).log_tail()
    at.run()
    assert_clean(at)
    assert any("All layers of 2 × 16 tokens are cached" in s.value for s in at.success)


def test_upload_is_sanitised_and_size_checked(tmp_path):
    from app.uploads import save_upload
    from lft_core.errors import LFTError
    from lft_core.paths import cache_dir

    saved = save_upload("../../etc/my corpus?.txt", b"Hello world. " * 50)
    assert saved.parent == cache_dir("uploads") and saved.name.endswith("-my_corpus.txt")
    for name, data, message in (("x.bin", b"abc", "only"), ("x.txt", b"\x00\x01" * 10, "binary"),
                                ("x.txt", b"\xff\xfe abc", "UTF-8"), ("x.txt", b" " * 10, "empty")):
        with pytest.raises(LFTError, match=message):
            save_upload(name, data)
    with pytest.raises(LFTError, match="limited"):
        save_upload("big.txt", b"a" * (21 * 2**20))


# -- choose a span ------------------------------------------------------------------------------------------


def test_span_page_heatmap_and_url(small_cache):
    at = open_page("span", {"span": TINY_SPAN})
    assert_clean(at)
    matrix = at.session_state["recoupling_matrix"]
    assert matrix.shape == (31, 31)
    assert np.isfinite(matrix[2, 4]) and np.isnan(matrix[4, 2])
    assert at.query_params["span"] == "2:4"
    assert at.slider(key="w_span_slider").value == TINY_SPAN
    # the slider moves the span and the link follows
    at.slider(key="w_span_slider").set_range(3, 9).run()
    assert at.session_state["span"] == (3, 9) and at.query_params["span"] == "3:9"
    # skip-k KL behind a button: a background job computes every position once; the page reads it back
    at = click(at, "Compute skip-k KL")
    assert_clean(at)
    wait_for_jobs("compare")
    at.run()
    assert_clean(at)
    skip = at.session_state["skip_table"]
    assert list(skip["k"]) == [1, 2, 3] and (skip["kl"] > 0).all()
    assert not [b for b in at.button if b.label.startswith("Compute skip-k KL")]  # saved: no second computation
    at.slider(key="w_span_slider").set_range(5, 8).run()  # another span reads the same grid at once
    assert list(at.session_state["skip_table"]["skipped blocks"]) == ["5..5", "5..6", "5..7"]


def test_span_page_affine_heatmap(small_cache, smol):
    from lft_core.data.activations import ensure_activations
    from lft_core.analysis.affine import affine_grid
    from lft_core.data.corpus import load_corpus

    at = open_page("span", {"span": TINY_SPAN})
    assert_clean(at)
    affine = at.session_state["affine_matrix"]
    assert affine.shape == (31, 31) and np.isnan(affine[4, 2])
    upper = np.triu(np.ones((31, 31), bool), 1)
    assert np.isfinite(affine[upper]).all() and (affine[upper] >= 0).all()
    # the page shows the engine's numbers: the same grid computed directly from the same caches
    held = ensure_activations(smol, load_corpus(), SMALL["seq_len"], 4, range(31), "heldout", progress=False)
    direct = affine_grid(small_cache.layer, held.layer, 30, spans=[TINY_SPAN, (6, 12)])
    assert direct.matrix[2, 4] == pytest.approx(affine[2, 4]) and direct.matrix[6, 12] == pytest.approx(affine[6, 12])
    labels = {m.label: m.value for m in at.metric}
    assert labels["Affine NMSE at span 2:4"] == f"{affine[2, 4]:.3f}"
    table = [df.value for df in at.dataframe if "affine NMSE" in df.value.columns]
    assert table and len(table[0]) == 465


def test_span_from_link_outside_the_model_is_an_error():
    at = open_page("span", query={"span": "40:50"})
    assert not at.exception
    assert any("40:50" in e and "not valid" in e for e in errors(at)), errors(at)
    assert at.session_state["span"] == (6, 12)


def test_span_page_without_cache_offers_a_cache_job():
    at = open_page("span", {"seq_len": 24, "n_windows": 3})
    assert_clean(at)
    assert any("Cache them once" in i.value for i in at.info)
    assert any(b.label == "Cache all layers" for b in at.button)


# -- train --------------------------------------------------------------------------------------------------


def test_train_page_lists_flows_and_runs_a_job(tiny_flow):
    from lft_core.run.jobs import read_job

    at = open_page("train", {"span": TINY_SPAN})
    assert_clean(at)
    assert "tiny-fw" in list(at.session_state["flows_table"]["name"])
    at.number_input(key="w_steps").set_value(1)
    at.number_input(key="w_batch").set_value(2)
    at.number_input(key="w_train_windows").set_value(8)
    at.number_input(key="w_heldout_windows").set_value(2)
    at.number_input(key="w_distill_steps").set_value(1)
    at.number_input(key="w_distill_batch").set_value(2)
    at.text_input(key="w_name").input("apptest-job")
    at = click(at, "Start training")
    assert_clean(at)
    job_id = at.session_state["train_job"]
    # right after Start the sidebar names the job, and the page says how many steps it runs
    sidebar = [c.value for c in at.sidebar.caption]
    assert any("apptest-job" in c for c in sidebar) or any("ended" in c or "complete" in c for c in sidebar), sidebar
    assert not any("No background job is running" in c for c in sidebar) or read_job(job_id).status != "running"
    assert any("2 steps in all (1 flow step + 1 distillation step)" in c.value for c in at.caption)
    deadline = time.time() + 180
    while read_job(job_id).status in ("running", "stopping") and time.time() < deadline:
        time.sleep(1)
    job = read_job(job_id)
    assert job.status == "complete", job.log_tail()
    assert job.events and job.events[-1]["step"] == 2  # 1 flow step, then 1 distillation step
    at.run()  # a reload reads the job and the new flow from disk
    assert_clean(at)
    assert "apptest-job" in list(at.session_state["flows_table"]["name"])
    assert any("Saved flow" in s.value for s in at.success)


def test_train_page_rejects_a_taken_name(tiny_flow):
    at = open_page("train", {"span": TINY_SPAN})
    at.text_input(key="w_name").input("tiny-fw")
    at = click(at, "Start training")
    assert any("exists" in e for e in errors(at)), errors(at)


def test_train_page_deletes_a_flow_after_confirmation(tiny_flow):
    import shutil

    from lft_core.flow.store import flows_dir

    shutil.copytree(flows_dir() / tiny_flow["name"], flows_dir() / "apptest-doomed")
    at = open_page("train", {"span": TINY_SPAN})
    assert "apptest-doomed" in list(at.session_state["flows_table"]["name"])
    at.selectbox(key="w_delete_flow").set_value("apptest-doomed")
    at = click(at, "Delete flow")  # not confirmed: nothing happens
    assert any("Tick the box" in w.value for w in at.warning)
    assert (flows_dir() / "apptest-doomed").is_dir()
    at.selectbox(key="w_delete_flow").set_value("apptest-doomed")
    at.checkbox(key="w_delete_sure").check()
    at = click(at, "Delete flow")
    assert_clean(at)
    assert any("Deleted flow" in s.value for s in at.success)
    assert not (flows_dir() / "apptest-doomed").exists()
    assert "apptest-doomed" not in list(at.session_state["flows_table"]["name"])
    assert "tiny-fw" in list(at.session_state["flows_table"]["name"])


def test_train_page_deletes_exactly_the_flow_the_user_saw_selected(tiny_flow):
    """Pick a flow that is not the first, press Delete without confirming, then confirm without touching the
    selection: the flow that stayed selected is deleted, no other."""
    import shutil

    from lft_core.flow.store import flows_dir

    for name in ("apptest-a-keep", "apptest-b-victim"):
        shutil.copytree(flows_dir() / tiny_flow["name"], flows_dir() / name)
    at = open_page("train", {"span": TINY_SPAN})
    options = at.selectbox(key="w_delete_flow").options
    assert options.index("apptest-b-victim") > 0
    at.selectbox(key="w_delete_flow").set_value("apptest-b-victim")
    at = click(at, "Delete flow")
    assert any("Tick the box" in w.value for w in at.warning)
    assert at.selectbox(key="w_delete_flow").value == "apptest-b-victim"  # the selection stays as the user left it
    at.checkbox(key="w_delete_sure").check()
    at = click(at, "Delete flow")
    assert_clean(at)
    assert not (flows_dir() / "apptest-b-victim").exists()
    assert (flows_dir() / "apptest-a-keep").is_dir() and (flows_dir() / tiny_flow["name"]).is_dir()
    assert at.checkbox(key="w_delete_sure").value is False  # the confirmation does not carry over
    shutil.rmtree(flows_dir() / "apptest-a-keep")


# -- trajectories -------------------------------------------------------------------------------------------


def test_trajectories_with_a_flow(tiny_flow):
    at = open_page("trajectories", {"span": TINY_SPAN}, query={"flows": "tiny-fw"})
    assert_clean(at)
    df = at.session_state["trajectory_table"]
    assert {"teacher", "straight", "FW tiny-fw", "FW tiny-fw (fine)"} <= set(df["kind"])
    assert {"x", "y", "token", "position", "t"} <= set(df.columns)
    assert df["position"].nunique() == 3
    at.radio(key="proj").set_value("UMAP").run()  # UMAP of the pooled path points (slower, cached)
    assert_clean(at)
    umap = at.session_state["trajectory_table"]
    assert len(umap) == len(df) and np.isfinite(umap[["x", "y"]].to_numpy()).all()
    at.checkbox(key="w_traj_affine").check().run()  # the affine baseline's end point joins the picture
    assert_clean(at)
    affine = at.session_state["trajectory_table"].query("kind == 'affine'")
    assert len(affine) == 2 * 3 and sorted(set(affine["t"])) == [0.0, 1.0]


def test_trajectories_without_flows_show_teacher_and_straight(tmp_path):
    from conftest import make_tiny_model

    fresh = make_tiny_model(tmp_path / "fresh-neox", "gpt_neox")  # a model no other test trained a flow for
    at = open_page("trajectories", {"model_spec": str(fresh), "span": (1, 3)})
    assert_clean(at)
    assert any("No flow is trained" in i.value for i in at.info)
    assert set(at.session_state["trajectory_table"]["kind"]) == {"teacher", "straight"}


# -- crossings ----------------------------------------------------------------------------------------------


def test_crossings_page_with_flow(tiny_flow, small_cache):
    at = open_page("crossings", {"span": TINY_SPAN})
    assert_clean(at)
    result = at.session_state["crossings_result"]  # a flow of the span is preselected
    assert len(result.tokens) == 64 and result.recoupled.shape == (64,)
    assert 0.0 <= result.ratio <= 1.0 and result.cost.shape == (64, 64) and result.p_hat.shape == (64, 2)
    at.selectbox(key="w_cross_flow").select("tiny-fw").run()
    assert_clean(at)
    assert at.session_state["crossings_result"].recoupled is not None
    at.selectbox(key="w_cross_flow").select("(none)").run()
    assert_clean(at)
    assert at.session_state["crossings_result"].recoupled is None
    assert any("t*" in df.value.columns for df in at.dataframe)  # the table of crossing pairs
    at.radio(key="w_cross_source").set_value("My text").run()
    assert_clean(at)
    assert len(at.session_state["crossings_result"].tokens) > 10


# -- per-token KL -------------------------------------------------------------------------------------------


def test_kl_page_colours_tokens(tiny_flow):
    at = open_page("kl", {"span": TINY_SPAN})
    assert_clean(at)
    result = at.session_state["kl_result"]
    assert set(result.kl) == {"teacher", "LFT, k = 3", "skip 1 block from 2"}  # span 2:4: a quarter of 2 blocks
    assert np.allclose(result.kl["teacher"], 0.0, atol=1e-5)
    html = next(md.value for md in at.markdown if "lft-token" in md.value)
    assert html.count('class="lft-token"') == len(result.tokens)
    assert "top 5" in html
    at.toggle(key="w_kl_affine").set_value(True)
    at = click(at, "Compute KL")
    assert_clean(at)
    result = at.session_state["kl_result"]
    assert set(result.kl) == {"teacher", "LFT, k = 3", "skip 1 block from 2", "affine"}
    assert (result.kl["affine"] >= 0).all() and len(result.kl["affine"]) == len(result.tokens)


def test_kl_page_empty_text_is_an_error(tiny_flow):
    at = open_page("kl", {"span": TINY_SPAN})
    at.text_area(key="w_text").input("   ")
    at = click(at, "Compute KL")
    assert not at.exception
    assert any("empty" in e for e in errors(at)), errors(at)


# -- compare ------------------------------------------------------------------------------------------------


def test_compare_page_table_and_evaluation(tiny_flow):
    at = open_page("compare", {"span": TINY_SPAN})
    assert_clean(at)
    table = at.session_state["compare_table"]
    row = table[table["name"] == "tiny-fw"].iloc[0]
    assert row["span"] == "2:4" and row["blocks"] == 2 and row["heldout_nmse"] > 0
    at.multiselect(key="w_cmp_flows").set_value(["tiny-fw"])
    at.number_input(key="w_cmp_windows").set_value(2)
    at.number_input(key="w_cmp_seq").set_value(32).run()

    def evaluated(at):  # the Evaluate button starts a background job; the page then reads its saved result
        if [b for b in at.button if b.label.startswith("Evaluate")]:
            at = click(at, "Evaluate")
            assert_clean(at)
            wait_for_jobs("compare")
            at.run()
        assert_clean(at)
        return at

    at = evaluated(at)
    ev = at.session_state["compare_eval"]
    tiny = ev[ev["flow"] == "tiny-fw"]
    assert set(tiny["model"]) == {"LFT k=3", "skip 1", "skip 2", "affine"}  # the affine baseline is on by default
    assert (tiny["KL"] >= 0).all() and tiny[tiny["model"] == "affine"]["NMSE"].iloc[0] > 0
    at.toggle(key="w_cmp_affine").set_value(False).run()
    at = evaluated(at)
    ev = at.session_state["compare_eval"]
    assert set(ev[ev["flow"] == "tiny-fw"]["model"]) == {"LFT k=3", "skip 1", "skip 2"}


# -- teaching lab -------------------------------------------------------------------------------------------


def test_toy_page_trains_sfm_and_fw():
    at = open_page("toy")
    assert_clean(at)
    at.slider(key="w_toy_points").set_value(64)
    at.slider(key="w_toy_steps").set_value(100)
    at.selectbox(key="w_toy_dataset").select("swap")
    at = click(at, "Train SFM and FW")
    assert_clean(at)
    runs = at.session_state["toy_runs"]
    assert set(runs) == {"SFM", "FW"}
    for metrics in runs.values():
        assert metrics["dataset"] == "swap" and metrics["n_points"] == 64
        assert 0 <= metrics["flow_recoupled_fraction"] <= 1 and metrics["endpoint_mse"] >= 0


def test_toy_page_csv_upload():
    rows = ["x0,y0,x1,y1"] + [f"{i / 10},{-i / 10},{-i / 10},{i / 10}" for i in range(24)]
    at = open_page("toy")
    at.selectbox(key="w_toy_dataset").select("upload a CSV").run()
    assert any("Upload a CSV" in i.value for i in at.info)
    at.file_uploader(key="w_toy_csv").set_value(("pairs.csv", "\n".join(rows).encode(), "text/csv"))
    at.slider(key="w_toy_steps").set_value(100).run()
    at = click(at, "Train SFM and FW")
    assert_clean(at)
    assert {m["n_points"] for m in at.session_state["toy_runs"].values()} == {24}
    at.file_uploader(key="w_toy_csv").set_value(("bad.csv", b"a,b\n1,2\n", "text/csv")).run()
    at = click(at, "Train SFM and FW")
    assert not at.exception
    assert any("header" in e for e in errors(at)), errors(at)


# -- figures (no Streamlit) ---------------------------------------------------------------------------------


def test_figures_module_is_plotly_only():
    import ast
    from pathlib import Path

    from app import figures
    from app.figures.kl import token_kl_html
    from app.figures.span import recoupling_heatmap

    for module in Path(figures.__file__).parent.glob("*.py"):  # every module of the package
        tree = ast.parse(module.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "streamlit" not in imported, module.name
    html = token_kl_html(["<b>", " x"], np.array([0.0, 3.0]), {"teacher": [[("a", 0.5)]] * 2}, 1.0, "LFT")
    assert "&lt;b&gt;" in html and html.count('class="lft-token"') == 2
    fig = recoupling_heatmap(np.triu(np.full((5, 5), 0.5), 1) + np.tril(np.full((5, 5), np.nan)), (1, 3))
    assert fig.data[0].type == "heatmap" and len(fig.data[1].x) == 10


# -- two sessions at once -------------------------------------------------------------------------------------


def test_two_sessions_at_once_get_the_numbers_each_gets_alone(tiny_flow, monkeypatch):
    """Two AppTest sessions share the cached Teacher (st.cache_resource) and run at the same time: the per-token
    KL page (teacher, LFT and skip-k surgery) and the trajectories page (hidden states) each show exactly what
    they show when run alone.

    AppTest stands in a mock for the server's one Runtime and sets it back to None after each run; two AppTests
    in threads then race on that global (one session's run ends and the other's script finds no Runtime: a
    harness artefact, a real server has one Runtime for all sessions). So while they run together, a session
    that finds none uses the last mock."""
    import threading

    import streamlit as st
    from streamlit.runtime import Runtime

    last: dict = {}
    real_instance = Runtime.instance.__func__

    def instance(cls):
        if cls._instance is not None:
            last["runtime"] = cls._instance
            return cls._instance
        return last["runtime"] if "runtime" in last else real_instance(cls)

    monkeypatch.setattr(Runtime, "instance", classmethod(instance))

    def kl_run():
        at = open_page("kl", {"span": TINY_SPAN})
        assert_clean(at)
        return {label: values.copy() for label, values in at.session_state["kl_result"].kl.items()}

    def trajectories_run():
        at = open_page("trajectories", {"span": TINY_SPAN})
        assert_clean(at)
        df = at.session_state["trajectory_table"]
        return df[["kind", "position", "step", "x", "y"]].to_numpy()

    alone = {"kl": kl_run(), "traj": trajectories_run()}
    together: dict[str, list] = {"kl": [], "traj": []}
    failures: list[BaseException] = []

    def worker(name, fn):
        try:
            for _ in range(2):
                st.cache_data.clear()  # recompute (the Teacher itself stays shared in st.cache_resource)
                together[name].append(fn())
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=worker, args=("kl", kl_run)),
               threading.Thread(target=worker, args=("traj", trajectories_run))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * TIMEOUT)
    assert not failures, failures
    for result in together["kl"]:
        assert result.keys() == alone["kl"].keys()
        assert all(np.array_equal(result[k], alone["kl"][k]) for k in result)
    for result in together["traj"]:
        assert np.array_equal(result, alone["traj"])


def test_pages_go_on_past_damaged_records(tiny_flow):
    """A flow config that is a JSON list and a job record that is a list: every page still loads, the flow is
    listed as unreadable on the Train page."""
    import shutil

    from lft_core.run.jobs import jobs_dir
    from lft_core.flow.store import flows_dir

    shutil.copytree(flows_dir() / tiny_flow["name"], flows_dir() / "apptest-damaged")
    (flows_dir() / "apptest-damaged" / "config.json").write_text("[1, 2, 3]")
    job = jobs_dir() / "99999999-apptest-damaged"
    job.mkdir()
    (job / "job.json").write_text('["not", "a", "job"]')
    try:
        for page in ("setup", "train", "compare", "kl", "trajectories", "crossings"):
            at = open_page(page, {"span": TINY_SPAN})
            assert_clean(at)
            if page == "train":
                assert any("cannot be read" in e.label for e in at.expander)
                assert "tiny-fw" in list(at.session_state["flows_table"]["name"])
    finally:
        shutil.rmtree(flows_dir() / "apptest-damaged")
        shutil.rmtree(job)


def test_setup_starts_on_the_mixture_and_offers_english_and_python_docs():
    at = open_page("setup")
    assert_clean(at)
    assert at.radio(key="w_corpus_source").value == "Built-in broad mixture (human-written)"
    assert any("Corpus **mix**" in cap.value for cap in at.caption)
    at.radio(key="w_corpus_source").set_value("Built-in Python docs").run()
    assert_clean(at)
    assert at.session_state["corpus_spec"] == "builtin"
    assert any("builtin" in cap.value for cap in at.caption) and any("CPython 3.11.7" in c.value for c in at.caption)
    at.radio(key="w_corpus_source").set_value("Built-in everyday English (model-written)").run()
    assert at.session_state["corpus_spec"] == "english"
