"""The Teaching lab page under streamlit.testing (AppTest), through the real navigation frame: training both
methods, the per-dataset presets and their lessons, inputs kept across page switches, k in the page link.

Plotly charts have no typed accessor in AppTest, so the tests read what the page stored in session_state, its
metrics and its messages (the figure itself is tested in test_toy.py).
"""
from __future__ import annotations

from streamlit.testing.v1 import AppTest

from app_fixtures import APP, SMALL
from lft_core.flow.toy import LAB_DEFAULTS

TIMEOUT = 240


def open_toy(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for key, value in SMALL.items():
        at.session_state[key] = value
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()  # the frame's default page first: AppTest resolves st.navigation pages only after a run
    return at.switch_page("views/toy.py").run()


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def train(at: AppTest) -> AppTest:
    return at.button(key="toy_train").click().run()


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_training_both_methods_shows_their_metrics():
    at = open_toy()
    assert_clean(at)
    at.selectbox(key="w_toy_dataset").select("rotation").run()
    at.slider(key="w_toy_points").set_value(64)
    at.slider(key="w_toy_steps").set_value(200)
    at = train(at)
    assert_clean(at)
    runs = at.session_state["toy_runs"]
    assert set(runs) == {"SFM", "FW"}
    assert {m["n_points"] for m in runs.values()} == {64} and {m["steps"] for m in runs.values()} == {200}
    labels = [m.label for m in at.metric]
    # the data's recoupling ratio once, then endpoint MSE and misrouted share for each method
    assert labels.count("Recoupling ratio of the data") == 1
    assert labels.count("Endpoint MSE") == 2 and labels.count("Misrouted by the flow") == 2
    assert not any(label == "Recoupled" for label in labels)  # the old wording: recoupling is the data's property
    misrouted = [m.value for m in at.metric if m.label == "Misrouted by the flow"]
    assert misrouted == [f"{runs[name]['flow_recoupled_fraction']:.0%}" for name in ("SFM", "FW")]
    assert "SFM: standard flow matching, k = 3" in texts(at.markdown)
    assert "FW: Flow Walking, k = 3" in texts(at.markdown)
    assert at.subheader[0].value == "Training loss"


def test_dataset_presets_set_k_and_steps_and_explain_the_lesson():
    at = open_toy()
    assert_clean(at)
    # a fresh session opens on mirror with its preset
    assert at.selectbox(key="w_toy_dataset").value == "mirror"
    assert at.slider(key="w_toy_k").value == LAB_DEFAULTS["mirror"].k
    assert at.slider(key="w_toy_steps").value == LAB_DEFAULTS["mirror"].steps
    assert at.slider(key="w_toy_points").value == 256
    at.selectbox(key="w_toy_dataset").select("swap").run()
    assert_clean(at)
    assert (at.slider(key="w_toy_k").value, at.slider(key="w_toy_steps").value) == (2, 1500) == (
        LAB_DEFAULTS["swap"].k, LAB_DEFAULTS["swap"].steps)
    assert "stall in the middle" in texts(at.info)
    # the user may still change the settings after choosing the dataset
    at.slider(key="w_toy_k").set_value(4).run()
    assert at.slider(key="w_toy_k").value == 4 and at.selectbox(key="w_toy_dataset").value == "swap"
    at.selectbox(key="w_toy_dataset").select("identity").run()
    assert at.slider(key="w_toy_k").value == LAB_DEFAULTS["identity"].k
    assert "nothing for Flow Walking to fix" in texts(at.info)
    # identity with its preset (measured: neither flow misroutes a point): the page says why, not who won
    at = train(at)
    assert_clean(at)
    runs = at.session_state["toy_runs"]
    assert max(m["flow_recoupled_fraction"] for m in runs.values()) < 0.01, runs
    assert "there is nothing for Flow Walking to fix" in texts(at.info)
    assert not at.warning and not at.success, texts(at.warning) + texts(at.success)
    # a CSV has no preset: k and steps stay as they are
    at.slider(key="w_toy_steps").set_value(300).run()
    at.selectbox(key="w_toy_dataset").select("upload a CSV").run()
    assert (at.slider(key="w_toy_k").value, at.slider(key="w_toy_steps").value) == (3, 300)
    assert any("Upload a CSV" in i.value for i in at.info)


def test_inputs_survive_a_page_switch():
    at = open_toy()
    at.selectbox(key="w_toy_dataset").select("swap").run()
    assert_clean(at)
    at.slider(key="w_toy_k").set_value(5)
    at.slider(key="w_toy_points").set_value(96)
    at.slider(key="w_toy_steps").set_value(700)
    at.run()
    assert_clean(at)
    at.switch_page("views/compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page("views/toy.py").run()
    assert_clean(at)
    assert at.selectbox(key="w_toy_dataset").value == "swap"
    assert at.slider(key="w_toy_k").value == 5
    assert at.slider(key="w_toy_points").value == 96
    assert at.slider(key="w_toy_steps").value == 700
    assert "k" not in at.query_params  # the lab's k is its own, not a real flow's (?k= belongs to those pages)


def test_page_ends_with_a_pointer_to_the_real_model():
    at = open_toy()
    links = at.get("page_link")
    assert [p.value for p in links] == ["Now on a real model: its latent trajectories"], [p.value for p in links]
    assert links[0].proto.page == "trajectories"
    # the lab is the last step of the path: no "Next:" link (test_app_lecture checks the same for the frame)
    assert "Next:" not in " ".join(p.value for p in at.get("page_link"))
