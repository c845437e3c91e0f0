"""The flow zoo (lft_core.zoo): shipped flows with provenance, installed by the demo instead of training.

A tiny zoo is built in a test folder from the tiny demo's own flows (tests/test_demo.py's settings: 2-block spans,
16-token windows), exported as the zoo script exports them; the demo of the same spans with the default recipe
must then install them without training a step."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from lft_core.atomic import file_sha256
from lft_core.errors import LFTError
from lft_core.flow.store import flows_dir, list_flows, load_flow
from lft_core.run.demo import demo_status, prepare_demo, read_manifest

from test_demo import TINY, ensure_tiny

REPO = Path(__file__).resolve().parents[1]
ZOO_SETTINGS = replace(TINY, train={})  # the tiny demo's cache and spans, the default recipe: shipped flows apply


def provenance(smol) -> dict:
    return {"recipe": {"steps": 2}, "corpus": TINY.corpus, "corpus_manifest_sha256": None, "seed": 0, "steps": 2,
            "distill_steps": 0, "tokens_seen": 64, "device": "cpu (test)", "wall_seconds": 1.0,
            "teacher": smol.model_id, "teacher_weights_hash": smol.weights_hash, "commit": "test", "heldout": {},
            "budget_note": "a test zoo", "trained": "2026-12-05"}


@pytest.fixture()
def tiny_zoo(smol, tmp_path, monkeypatch):
    """A zoo of the tiny demo's four flows (exported in 16-bit), $LFT_ZOO_DIR pointing at it, and the store
    without any zoo-* flow."""
    from lft_core.zoo import export_flow, zoo_name

    result = ensure_tiny(smol)
    assert result.ready
    root = tmp_path / "zoo"
    monkeypatch.setenv("LFT_ZOO_DIR", str(root))
    for info in demo_status(TINY).flow_info:
        export_flow(flows_dir() / info["name"], zoo_name(info["method"], tuple(info["span"])), provenance(smol))
    for f in list_flows():
        if f.name.startswith("zoo-"):
            from lft_core.flow.store import delete_flow

            delete_flow(f.name)
    return root


def test_export_writes_16_bit_weights_with_their_proof_and_provenance(tiny_zoo, smol):
    from lft_core.zoo import shipped_flows

    shipped = shipped_flows()
    assert len(shipped) == 4 and all(f.name.startswith("zoo-") for f in shipped)
    for f in shipped:
        flow, config = load_flow(f.dir)  # proved: weights hash to the record, record carried by the weights
        assert flow.proof.verified and config["name"] == f.name
        assert f.provenance["weights_sha256"] == file_sha256(f.dir / "model.safetensors") == f.weights_sha256
        assert f.provenance["weights_dtype"] == "float16" and f.provenance["teacher_weights_hash"] == smol.weights_hash
        from safetensors import safe_open

        with safe_open(str(f.dir / "model.safetensors"), "pt") as st:
            dtypes = {st.get_tensor(k).dtype for k in st.keys()}
        import torch

        assert torch.float16 in dtypes  # parameters in 16-bit (normalisation buffers stay float32)


def test_the_demo_installs_shipped_flows_without_training(tiny_zoo, smol):
    events: list[dict] = []
    result = prepare_demo(ZOO_SETTINGS, teacher=smol, progress=events.append)
    assert result.ready
    assert not [e for e in events if "flow_step" in e]  # not one training step
    manifest = read_manifest()
    from lft_core.zoo import get_shipped, provenance_of

    assert result.flows == [f["name"] for f in manifest["flows"]] and all(n.startswith("zoo-") for n in result.flows)
    for name in result.flows:
        shipped = get_shipped(name)
        assert file_sha256(flows_dir() / name / "model.safetensors") == shipped.weights_sha256
        assert provenance_of(flows_dir() / name) == shipped.provenance
        load_flow(flows_dir() / name)  # the installed copy proves itself
    labels = [s["label"] for s in result.steps]
    assert sum(label.startswith("Install the shipped") for label in labels) == 4
    # idempotent: a second run does nothing, and installing again is a no-op
    again = prepare_demo(ZOO_SETTINGS, teacher=smol)
    assert again.ready and again.did_nothing
    from lft_core.zoo import install

    assert install(result.flows[0], smol) == "present"


def test_a_user_flow_of_the_same_name_is_never_replaced(tiny_zoo, smol):
    from lft_core.zoo import install, shipped_flows

    name = shipped_flows()[0].name
    other = next(f for f in list_flows() if f.name.startswith("demo-"))
    import shutil

    shutil.copytree(other.dir, flows_dir() / name)  # a flow of that name with other weights
    before = file_sha256(flows_dir() / name / "model.safetensors")
    with pytest.raises(LFTError, match="never replaced"):
        install(name, smol)
    with pytest.raises(LFTError, match="never replaced"):
        prepare_demo(ZOO_SETTINGS, teacher=smol)
    assert file_sha256(flows_dir() / name / "model.safetensors") == before


def test_a_shipped_flow_of_another_teacher_is_refused(tiny_zoo, smol):
    from lft_core.zoo import find_shipped, install, shipped_flows

    f = shipped_flows()[0]
    assert find_shipped(smol.model_id, smol.weights_hash, f.span, f.method, TINY.corpus, TINY.seq_len) == f
    assert find_shipped(smol.model_id, "0" * 16, f.span, f.method, TINY.corpus, TINY.seq_len) is None
    assert find_shipped(smol.model_id, smol.weights_hash, f.span, f.method, TINY.corpus, TINY.seq_len + 1) is None
    other = SimpleNamespace(model_id=smol.model_id, weights_hash="0" * 16)
    with pytest.raises(LFTError, match="not this teacher"):
        install(f.name, other)
    assert not (flows_dir() / f.name).exists()


def test_a_damaged_shipped_flow_is_not_offered(tiny_zoo):
    from lft_core.zoo import shipped_flows

    f = shipped_flows()[0]
    data = json.loads((f.dir / "provenance.json").read_text())
    data["weights_sha256"] = "0" * 64  # provenance of other weights
    (f.dir / "provenance.json").write_text(json.dumps(data))
    assert f.name not in {g.name for g in shipped_flows()}


def test_a_shipped_flow_copied_under_a_new_name_trains_further(tiny_zoo, smol, tmp_path):
    from lft_core.flow.config import TrainConfig
    from lft_core.flow.training import train_flow
    from lft_core.zoo import copy_flow, install, shipped_flows

    f = next(g for g in shipped_flows() if g.method == "fw")
    install(f.name, smol)
    target = copy_flow(f.name, "my-copy")
    assert target == flows_dir() / "my-copy"
    with pytest.raises(LFTError, match="exists already"):
        copy_flow(f.name, "my-copy")
    config = json.loads((target / "config.json").read_text())
    assert config["name"] == "my-copy" and config["status"] == "stopped"
    from lft_core.zoo import provenance_of

    assert provenance_of(target) is None  # a copy is a flow trained here
    keep = {k: config[k] for k in ("method", "k", "seq_len", "windows", "heldout_windows", "batch", "corpus",
                                   "distill_steps", "seed", "lr")}
    cfg = TrainConfig(model=smol.spec if hasattr(smol, "spec") else config["model"], span=tuple(config["span"]),
                      name="my-copy", **{**keep, "steps": config["steps"] + 2})
    result = train_flow(cfg, teacher=smol, resume=True, verbose=False)
    assert not result.stopped
    after = json.loads((target / "config.json").read_text())
    assert after["steps_done"] == config["steps_done"] + 2 and after["status"] == "complete"


def test_flows_cli_lists_shipped_and_copies(tiny_zoo, smol, tmp_path):
    from lft_core.zoo import install, shipped_flows

    f = shipped_flows()[0]
    install(f.name, smol)
    out = tmp_path / "flows.json"
    env = {**__import__("os").environ}
    run = subprocess.run([sys.executable, "-m", "lft_core", "flows", "--json", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"{f.name}:" in run.stdout and "shipped:" in run.stdout
    listed = {x["name"]: x for x in json.loads(out.read_text())["flows"]}
    assert listed[f.name]["origin"] == "shipped" and listed[f.name]["provenance"]["commit"] == "test"
    assert all(x["origin"] == "trained here" for n, x in listed.items() if n.startswith("demo-"))
    run = subprocess.run([sys.executable, "-m", "lft_core", "flows", "--copy", f.name, "--to", "copied-1"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (flows_dir() / "copied-1" / "training_state.json").is_file()
    run = subprocess.run([sys.executable, "-m", "lft_core", "flows", "--copy", f.name, "--to", "copied-1"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "exists already" in run.stderr and "Traceback" not in run.stderr


def test_the_zoo_curve_is_measured_and_drawn_from_its_file(tiny_zoo, smol):
    from lft_core.analysis.comparison import skip_kl_grid, zoo_curve_points
    from lft_core.analysis.evaluation import eval_windows
    from lft_core.atomic import write_json
    from lft_core.zoo import curve_path, measure_curve, read_curve, shipped_flows

    flows = shipped_flows()
    curve = measure_curve(smol, flows, TINY.corpus, windows=2, seq_len=16, progress=False)
    assert [r["flow"] for r in curve["flows"]] == [f.name for f in flows]
    assert {tuple(a["span"]) for a in curve["affine"]} == {f.span for f in flows}
    grid = skip_kl_grid(smol, eval_windows(smol, TINY.corpus, None, 2, 16), (1, 2))
    for r in curve["skip_best"]:  # the best position is the lowest KL of every start
        assert r["kl"] == min(g.kl for g in grid if g.k == r["k"])
    assert read_curve() is None  # nothing written yet
    write_json(curve_path(), curve)
    points = zoo_curve_points(read_curve())
    shipped = points[points["kind"] == "flow"]
    assert len(shipped) == 4 and set(shipped["x"]) == {2}
    assert set(points[points["kind"] == "skip best"]["x"]) == {1, 2}
    assert len(points[points["kind"] == "affine"]) == 2 and points["reference"].any()


def test_ship_fits_writes_each_span_once_and_runs_again_on_a_cache_without_them(tiny_zoo, smol, tmp_path,
                                                                             monkeypatch):
    """``zoo.ship_fits``: one affine fit per shipped span (two flows share each span); a second run, with the cache's
    own copies gone, finds them shipped and rewrites nothing; a damaged shipped fit is made again."""
    import shutil

    from lft_core.analysis import baselines
    from lft_core.analysis.baselines import FitData, fit_key, get_baseline, read_fit
    from lft_core.paths import cache_dir
    from lft_core.zoo import ship_fits, shipped_flows

    monkeypatch.setattr(baselines, "SHIPPED_FITS", tmp_path / "fits")
    files = ship_fits(smol)
    spans = {f.span for f in shipped_flows()}
    assert len(files) == len(spans) == 2
    assert {p.stem for p in files} == {fit_key("affine", smol, f.span, FitData.of_flow(f.config))
                                       for f in shipped_flows()}
    stamps = {p: p.stat().st_mtime_ns for p in files}
    shutil.rmtree(cache_dir("baselines"))
    assert ship_fits(smol) == files and {p: p.stat().st_mtime_ns for p in files} == stamps
    files[0].write_bytes(b"not a fit")
    assert ship_fits(smol) == files
    span = next(f.span for f in shipped_flows() if files[0].stem.startswith(f"affine-{f.span[0]}-{f.span[1]}-"))
    assert read_fit(get_baseline("affine"), span, files[0]) is not None


def test_more_steps_adds_flow_steps_before_distillation_and_distillation_steps_after():
    from lft_core.flow.training import more_steps

    assert more_steps({"steps": 4, "distill_steps": 2, "steps_done": 6}, 3)["distill_steps"] == 5
    assert more_steps({"steps": 4, "distill_steps": 2, "steps_done": 4}, 3)["steps"] == 7
    assert more_steps({"steps": 4, "distill_steps": 0, "steps_done": 4}, 0) == {"steps": 4, "distill_steps": 0,
                                                                                  "steps_done": 4}


# ---------------------------------------------------------------------------------------------------------
# The zoo that ships with the project


def test_the_shipped_zoo_is_whole_and_for_the_embedded_teacher(smol, monkeypatch):
    from lft_core.zoo import ZOO_DIR, read_curve, shipped_flows

    monkeypatch.delenv("LFT_ZOO_DIR", raising=False)
    folders = [p for p in ZOO_DIR.iterdir() if p.is_dir()] if ZOO_DIR.is_dir() else []
    shipped = shipped_flows()
    assert {f.name for f in shipped} == {p.name for p in folders}  # no folder is left out as damaged
    for f in shipped:
        flow, config = load_flow(f.dir)
        assert flow.proof.verified and config["status"] == "complete"
        assert config["weights_hash"] == f.provenance["teacher_weights_hash"] == smol.weights_hash
        assert (f.dir / "model.safetensors").stat().st_size < 16 * 2**20
        p = f.provenance
        assert p["steps"] == config["steps"] and p["distill_steps"] == config["distill_steps"]
        assert p["heldout"]["kl"] > 0 and p["commit"] and p["device"] and p["wall_seconds"] > 0
    curve = read_curve()
    if shipped:
        assert curve is not None and {r["flow"] for r in curve["flows"]} == {f.name for f in shipped}


@pytest.mark.slow
def test_each_shipped_flow_reproduces_its_recorded_heldout_kl(smol, monkeypatch):
    from lft_core.zoo import heldout_metrics, shipped_flows

    monkeypatch.delenv("LFT_ZOO_DIR", raising=False)
    for f in shipped_flows():
        h = f.provenance["heldout"]
        again = heldout_metrics(smol, f.dir, h["corpus"], h["seq_len"], h["windows"])
        assert round(again["kl"], 3) == round(h["kl"], 3), (f.name, again["kl"], h["kl"])
        assert abs(again["nmse"] - h["nmse"]) < 5e-4


def test_the_zoo_ships_the_affine_fit_of_each_flow_span(smol, monkeypatch):
    """A page that puts the affine baseline beside a shipped flow reads the zoo's fit: nothing is fitted or cached
    first (the fit on the flow's 1,024 training windows would cache them first)."""
    from lft_core.analysis.baselines import SHIPPED_FITS, FitData, fit_key, slow_fit, stored_fit
    from lft_core.zoo import shipped_flows

    monkeypatch.delenv("LFT_ZOO_DIR", raising=False)
    keys = set()
    for f in shipped_flows():
        data = FitData.of_flow(f.config)
        key = fit_key("affine", smol, f.span, data)
        assert (SHIPPED_FITS / f"{key}.safetensors").is_file(), f.name
        got = stored_fit("affine", smol, f.span, data)
        assert got is not None and tuple(got.replacement.span) == f.span and 0 < got.replacement.heldout_nmse < 1
        assert not slow_fit("affine", smol, f.span, data)
        keys.add(key)
    assert {p.stem for p in SHIPPED_FITS.glob("*.safetensors")} == keys  # no stale fit ships


@pytest.mark.slow
def test_each_shipped_affine_fit_is_what_a_fit_here_gives(smol, monkeypatch):
    import torch

    from lft_core.analysis.baselines import FitData, get_baseline, stored_fit
    from lft_core.zoo import shipped_flows

    monkeypatch.delenv("LFT_ZOO_DIR", raising=False)
    for f in shipped_flows():
        data = FitData.of_flow(f.config)
        here = get_baseline("affine").fit(smol, f.span, data, progress=False)
        shipped = stored_fit("affine", smol, f.span, data).replacement
        assert torch.allclose(here.weight, shipped.weight, atol=1e-5) and here.ridge == shipped.ridge
