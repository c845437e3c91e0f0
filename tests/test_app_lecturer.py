"""A lecturer's hour (issue #23), AppTest through the real frame: a link naming a missing flow or an impossible
span says so (and the sidebar shows the span actually used), a span without flows says what to do, the start
page marks the demo's steps done, and Crossings explains why its R differs from the span page's."""
from __future__ import annotations

from types import SimpleNamespace

from app_fixtures import TINY_SPAN, tiny_flow  # noqa: F401 (fixtures)
from test_app_pages import assert_clean, open_page


def test_a_link_naming_a_missing_flow_says_so(tiny_flow):
    at = open_page("kl", {"span": TINY_SPAN}, query={"flows": "no-such-flow"})
    assert not at.exception
    assert any("'no-such-flow'" in w.value and "not trained" in w.value for w in at.warning), \
        [w.value for w in at.warning]
    assert at.selectbox(key="w_kl_flow").value == "tiny-fw"  # the page's default instead


def test_an_impossible_span_in_a_link_is_reported_and_the_sidebar_shows_the_span_used(tiny_flow):
    at = open_page("trajectories", query={"span": "40:45"})
    assert not at.exception
    assert any("40:45" in e.value or "45" in e.value for e in at.error), [e.value for e in at.error]
    used = str(at.session_state["span"])
    assert used != "40:45"
    sidebar = " ".join(c.value for c in at.sidebar.caption)
    assert f"**Span** {used}" in sidebar and "40:45" not in sidebar, sidebar


def test_a_span_without_flows_says_what_to_do(tiny_flow):
    for page in ("trajectories", "crossings"):
        at = open_page(page, {"span": (20, 24)})
        assert not at.exception
        lines = [i.value for i in at.info]
        assert any("No flow is trained for span 20:24" in i and "spans with flows: 2:4" in i for i in lines), lines


def test_the_start_page_marks_the_demos_steps_done(tiny_flow, monkeypatch):
    from app import state

    ready = SimpleNamespace(ready=True, damaged=None, running=False, spans=[(1, 7), (2, 8)], flows=["tiny-fw"],
                            line="demo ready", steps=[], done=7, total=7)
    monkeypatch.setattr(state, "demo_status", lambda *a, **k: ready)
    at = open_page("home")
    assert not at.exception
    marks = [m.value for m in at.markdown if m.value.endswith("] done") or "**next**" in m.value
             or m.value == ":material/radio_button_unchecked:"]
    assert sum("done" in m for m in marks[:3]) == 3 and not any("next" in m for m in marks[:3]), marks
    assert any("Steps 1–3 were done for you by the demo" in c.value for c in at.caption)


def test_crossings_says_why_its_r_differs_from_the_span_pages(tiny_flow):
    at = open_page("crossings", {"span": TINY_SPAN})
    assert_clean(at)
    assert any("R here is measured on these" in c.value for c in at.caption)
