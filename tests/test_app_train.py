"""The Train page as a lab (AppTest through the real frame): queue a sweep, see every job's command, resume a
stopped flow, and inputs that survive a trip to another page."""
from __future__ import annotations

import shlex
import time

import pytest

from app_fixtures import TINY_SPAN, tiny_flow  # noqa: F401 (fixtures)
from test_app_pages import assert_clean, click, errors, open_page

MINE = ("apptest-sw-", "apptest-stop", "apptest-copy")  # the flows this module trains (sweeps, the stopped flow)


@pytest.fixture(scope="module", autouse=True)
def _remove_this_modules_flows():
    """Other modules' pages choose flows of span 2:4 by default: leave the flows as this module found them."""
    import shutil

    from lft_core.flow.store import flows_dir

    yield
    for folder in flows_dir().iterdir():
        if folder.name.startswith(MINE):
            shutil.rmtree(folder, ignore_errors=True)


TINY_SWEEP = {"w_sweep_steps": 3, "w_sweep_distill_steps": 0, "w_sweep_batch": 2, "w_sweep_windows": 8,
              "w_sweep_heldout_windows": 2}


def _wait(job_id: str, seconds: float = 240):
    from lft_core.run.jobs import read_job

    deadline = time.time() + seconds
    while read_job(job_id).status in ("running", "stopping") and time.time() < deadline:
        time.sleep(1)
    return read_job(job_id)


def _sweep_form(at, spans="2:4", methods=("fw",), ks="2", seeds="0, 1", prefix="", **numbers):
    at.text_input(key="w_sweep_spans").input(spans)
    at.multiselect(key="w_sweep_methods").set_value(list(methods))
    at.text_input(key="w_sweep_ks").input(ks)
    at.text_input(key="w_sweep_seeds").input(seeds)
    at.text_input(key="w_sweep_prefix").input(prefix)
    for key, value in {**TINY_SWEEP, **numbers}.items():
        at.number_input(key=key).set_value(value)
    return click(at, "Queue sweep")


def test_sweep_form_refuses_bad_input(tiny_flow):
    from lft_core.run.jobs import list_jobs

    at = open_page("train", {"span": TINY_SPAN})
    assert_clean(at)
    assert at.text_input(key="w_sweep_spans").value == "2:4"  # the current span
    assert at.multiselect(key="w_sweep_methods").value == ["fw", "sfm"]
    before = len(list_jobs("sweep"))
    for kw, message in [({"spans": "2-4"}, "span must look like M:N"),
                        ({"spans": "2:4, 2:99"}, "span 2:99 is not valid"),
                        ({"methods": ()}, "give at least one method"),
                        ({"ks": "1, x"}, "k must be a comma list of integers"),
                        ({"seeds": ""}, "give at least one seeds"),
                        ({"spans": "2:4, 4:6", "methods": ("fw", "sfm"), "seeds": ",".join(map(str, range(17)))},
                         "68 runs (2 × 2 × 1 × 17) are too many"),
                        ({"prefix": "bad name!"}, "sweep name 'bad name!'"),
                        ({"w_sweep_batch": 9}, "batch (9) cannot exceed")]:
        at = _sweep_form(at, **kw)
        assert not at.exception, [e.value for e in at.exception]
        assert any(message in e for e in errors(at)), (message, errors(at))
    assert len(list_jobs("sweep")) == before  # nothing was started


def test_a_sweep_job_from_the_page_shows_its_command_and_results(tiny_flow):
    from lft_core.run.jobs import read_job

    at = open_page("train", {"span": TINY_SPAN})
    at = _sweep_form(at, prefix="apptest-sw")
    assert_clean(at)
    job_id = at.session_state["sweep_job"]
    job = read_job(job_id)
    assert job.kind == "sweep" and job.label == "sweep apptest-sw"
    assert job.command in [code.value for code in at.code]  # shown while it runs
    assert shlex.split(job.command)[3:7] == ["sweep", "--spans", "2:4", "--methods"]
    job = _wait(job_id)
    assert job.status == "complete", job.log_tail()
    at.run()
    assert_clean(at)
    table = at.session_state["flows_table"]
    mine = table[table["sweep"] == "apptest-sw"]
    assert sorted(mine["name"]) == ["apptest-sw-2-4-fw-k2-s0", "apptest-sw-2-4-fw-k2-s1"]
    assert set(mine["status"]) == {"complete"} and "–" not in set(mine["held-out NMSE"])
    result = at.session_state["sweep_results"][job_id]
    assert len(result["runs"]) == 2 and list(result["summary"]["seeds"]) == [2]
    assert "±" in result["summary"]["held-out NMSE"].iloc[0]
    assert job.command in [code.value for code in at.code]  # and after it ended
    # the same sweep again: nothing to train, no job
    at = _sweep_form(at, prefix="apptest-sw")
    assert_clean(at)
    assert at.session_state["sweep_job"] == job_id
    assert any("complete already" in i.value for i in at.info)


def test_a_sweep_job_stops_when_asked(tiny_flow):
    from lft_core.run.jobs import read_job

    at = open_page("train", {"span": TINY_SPAN})
    at = _sweep_form(at, seeds="0", prefix="apptest-stop", w_sweep_steps=100_000)
    assert_clean(at)
    job_id = at.session_state["sweep_job"]
    deadline = time.time() + 120
    while not any(e.get("event") == "step" for e in read_job(job_id).events) and time.time() < deadline:
        time.sleep(0.5)
    at.run()
    assert_clean(at)
    bars = [p.proto.text for p in at.get("progress")]
    assert any(t.startswith("run 1 of 1: apptest-stop-2-4-fw-k2-s0, step ") and "/ 100000 · ETA" in t
               for t in bars), bars
    stop = [b for b in at.button if b.label == "Stop" and b.key == f"stop-{job_id}"]
    assert stop, [b.key for b in at.button]
    stop[0].click().run()
    assert_clean(at)
    job = _wait(job_id)
    assert job.status == "stopped", job.log_tail()
    assert [r["status"] for r in job.result["runs"]] in (["stopped"], ["pending"])


@pytest.fixture
def stopped_flow(smol, tiny_flow):
    """A 3-step flow stopped after its first step."""
    from lft_core.flow.config import TrainConfig
    from lft_core.flow.training import train_flow

    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    cfg = TrainConfig(span=TINY_SPAN, steps=3, windows=8, heldout_windows=2, seq_len=32, batch=2, eval_every=2,
                      distill_steps=0, name="apptest-stopped")
    train_flow(cfg, teacher=smol, should_stop=stop, verbose=False)
    return cfg.name


def test_resume_a_stopped_flow(stopped_flow):
    from filelock import FileLock

    from lft_core.flow.store import flows_dir, read_flow_config

    at = open_page("train", {"span": TINY_SPAN})
    assert_clean(at)
    table = at.session_state["flows_table"]
    row = table[table["name"] == stopped_flow].iloc[0]
    assert row["status"] == "stopped" and row["steps"] == "1 / 3"
    assert row["held-out NMSE"] not in ("–", "None", None)  # the NMSE at the stop
    options = at.selectbox(key="w_resume_flow").options
    assert f"{stopped_flow} (stopped at step 1 of 3)" in options
    assert not any(o.startswith("tiny-fw") for o in options)  # complete flows are not offered
    at.selectbox(key="w_resume_flow").set_value(stopped_flow)
    with FileLock(str(flows_dir() / f".{stopped_flow}.lock"), timeout=0):  # another process trains it
        at = click(at, "Resume training")
    assert any("being trained by a job already" in e for e in errors(at)), errors(at)
    assert "train_job" not in at.session_state
    at = click(at, "Resume training")
    assert_clean(at)
    job = _wait(at.session_state["train_job"])
    assert job.status == "complete", job.log_tail()
    assert job.label == stopped_flow and job.args[-1] != "--resume" and "--resume" in job.command
    config = read_flow_config(stopped_flow)
    assert config["status"] == "complete" and config["steps_done"] == 3
    assert [h["step"] for h in config["history"]] == [1, 2, 3]


def test_inputs_survive_a_trip_to_another_page(tiny_flow):
    """Form inputs are committed when their form is submitted (here refused: nothing starts), then kept."""
    at = open_page("train", {"span": TINY_SPAN})
    at.selectbox(key="w_method").set_value("sfm")
    at.number_input(key="w_steps").set_value(7)
    at.number_input(key="w_train_windows").set_value(9)
    at.number_input(key="w_lr").set_value(0.002)
    at.checkbox(key="w_init").check()
    at.text_input(key="w_name").input("tiny-fw")  # taken: the start is refused
    at = click(at, "Start training")
    assert any("exists" in e for e in errors(at)), errors(at)
    at = _sweep_form(at, spans="2:4, 4:6", methods=("hybrid",), seeds="4, 5", prefix="bad name!",
                     w_sweep_distill_steps=11)
    assert any("sweep name" in e for e in errors(at)), errors(at)
    at.switch_page("views/setup.py").run()
    assert_clean(at)
    at.switch_page("views/train.py").run()
    assert_clean(at)
    assert at.selectbox(key="w_method").value == "sfm"
    assert at.number_input(key="w_steps").value == 7
    assert at.number_input(key="w_train_windows").value == 9
    assert at.number_input(key="w_lr").value == pytest.approx(0.002)
    assert at.checkbox(key="w_init").value is True
    assert at.text_input(key="w_name").value == "tiny-fw"
    assert at.text_input(key="w_sweep_spans").value == "2:4, 4:6"
    assert at.multiselect(key="w_sweep_methods").value == ["hybrid"]
    assert at.text_input(key="w_sweep_seeds").value == "4, 5"
    assert at.text_input(key="w_sweep_prefix").value == "bad name!"
    assert at.number_input(key="w_sweep_distill_steps").value == 11


def test_copy_a_flow_and_resume_it_with_more_steps(tiny_flow):
    from lft_core.flow.store import read_flow_config

    at = open_page("train", {"span": TINY_SPAN})
    assert_clean(at)
    table = at.session_state["flows_table"]
    assert table[table["name"] == "tiny-fw"].iloc[0]["origin"].startswith("trained here: 3+0 steps")
    at.selectbox(key="w_copy_flow").set_value("tiny-fw")
    at.text_input(key="w_copy_name").input("tiny-fw")  # taken: refused, nothing replaced
    at = click(at, "Copy")
    assert any("exists already" in e for e in errors(at)), errors(at)
    at.text_input(key="w_copy_name").input("apptest-copy")
    at = click(at, "Copy")
    assert_clean(at)
    assert read_flow_config("apptest-copy")["status"] == "stopped"
    at = open_page("train", {"span": TINY_SPAN})
    at.selectbox(key="w_resume_flow").set_value("apptest-copy")
    at.number_input(key="w_resume_more").set_value(2)
    at = click(at, "Resume training")
    assert_clean(at)
    job = _wait(at.session_state["train_job"])
    assert job.status == "complete", job.log_tail()
    config = read_flow_config("apptest-copy")
    assert config["steps_done"] == 5 and config["steps"] == 5 and read_flow_config("tiny-fw")["steps_done"] == 3
