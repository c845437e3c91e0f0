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
    footer = [link.label for link in at.get("page_link") if link.label.startswith("Next:")]
    assert footer == ["Next: look at the latent trajectories"], footer  # step 4, not step 1


def test_crossings_says_why_its_r_differs_from_the_span_pages(tiny_flow):
    at = open_page("crossings", {"span": TINY_SPAN})
    assert_clean(at)
    assert any("R here is measured on these" in c.value for c in at.caption)


def test_an_affine_fit_that_must_cache_hidden_states_runs_in_the_background(tiny_flow, smol, monkeypatch):
    """The affine toggle on Per-token KL when the fit would first cache hidden states: the page starts one
    background fit (shown with its progress), shows the other models at once, and adds the affine row when the
    kept fit is there."""
    from lft_core.analysis import baselines
    from lft_core.analysis.baselines import FitData, fit_file, fit_key
    from lft_core.run.jobs import list_jobs
    from test_app_pages import wait_for_jobs

    data = FitData.of_flow(tiny_flow)
    key = fit_key("affine", smol, TINY_SPAN, data)
    fit_file(key).unlink(missing_ok=True)  # another test may have kept this fit
    monkeypatch.setattr(baselines.AffineBaseline, "slow_fit", lambda self, teacher, span, data: True)
    at = open_page("kl", {"span": TINY_SPAN}, query={"affine": "true"})
    assert_clean(at)
    assert at.toggle(key="w_kl_affine").value is True
    assert "affine" not in at.session_state["kl_result"].kl  # the page did not wait for the fit
    jobs = [j for j in list_jobs("baselines") if j.label == f"fit {key}"]
    assert len(jobs) == 1 and "--fit-only" in jobs[0].args and "2:4" in jobs[0].args
    bars = [p.proto.text for p in at.get("progress")]
    assert any("Fitting the affine baseline of span 2:4 in the background" in t for t in bars), bars
    wait_for_jobs("baselines", 180)
    assert fit_file(key).is_file()
    at.run()
    assert_clean(at)
    assert "affine" in at.session_state["kl_result"].kl
    assert len([j for j in list_jobs("baselines") if j.label == f"fit {key}"]) == 1  # the kept fit is read


def test_a_failed_background_fit_is_shown_with_its_error_and_a_button_to_try_again(tiny_flow, smol, monkeypatch):
    import shutil

    from lft_core.analysis import baselines
    from lft_core.analysis.baselines import FitData, fit_file, fit_key
    from lft_core.atomic import write_json
    from lft_core.run import jobs

    key = fit_key("affine", smol, TINY_SPAN, FitData.of_flow(tiny_flow))
    fit_file(key).unlink(missing_ok=True)
    monkeypatch.setattr(baselines.AffineBaseline, "slow_fit", lambda self, teacher, span, data: True)
    failed = jobs.jobs_dir() / "29990101-000000-failed"  # the newest job: a fit of this span that failed
    failed.mkdir(parents=True)
    write_json(failed / "job.json", {"id": failed.name, "kind": "baselines", "label": f"fit {key}",
                                     "args": ["baselines", "--fit-only"], "created": "2999-01-01T00:00:00+00:00",
                                     "pid": None})
    (failed / "log.txt").write_text("error: the disk is full\n")
    (failed / "exit_code").write_text("2")
    started = []
    monkeypatch.setattr(jobs, "start_job", lambda kind, args, label="": started.append(label) or jobs.read_job(
        failed.name))
    try:
        at = open_page("kl", {"span": TINY_SPAN}, query={"affine": "true"})
        assert not at.exception
        assert any("Fitting the affine baseline of span 2:4 failed: the disk is full" in e.value for e in at.error)
        assert not started  # a failed fit is not started again on its own, at every rerun
        assert "affine" not in at.session_state["kl_result"].kl  # the rest of the page is there
        next(b for b in at.button if b.label == "Try the affine fit again").click().run()
        assert started == [f"fit {key}"]
    finally:
        shutil.rmtree(failed, ignore_errors=True)
