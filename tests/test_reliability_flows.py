"""Flows prove what they are (issue 24): a saved flow's weights carry the record they were saved with, config.json
carries the sha256 of the weights, and loading checks both (and the teacher); records are read by one bounded,
schema-checked reader; a bare ``--flow NAME`` is always the saved flow, and ``eval`` says which flow it used.

Every test here fails on the code before this change (docs/reliability_new_flows.md lists the cases). Tiny random
GPT-NeoX only; the whole file runs in well under 20 s on 2 cores.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from lft_core.atomic import DamagedRecord, read_record
from lft_core.errors import LFTError
from lft_core.flow.config import TrainConfig
from lft_core.flow.store import (FlowCheckpointError, flows_dir, list_flows, load_flow, open_flow, read_flow_config,
                                 resolve_flow, save_flow)
from lft_core.flow.training import train_flow
from lft_core.run.cli import main

NAME = "rf-a"  # span 1:3 of the tiny GPT-NeoX, seed 0
TWIN = "rf-b"  # the same settings, seed 1: same span, same shapes, other weights


def _train(teacher, model_dir, name: str, seed: int) -> Path:
    if not (flows_dir() / name).is_dir():
        train_flow(TrainConfig(model=str(model_dir), span=(1, 3), method="sfm", k=1, steps=1, batch=2, seq_len=16,
                               windows=4, heldout_windows=1, eval_every=1, checkpoint_every=1, name=name, seed=seed,
                               distill_steps=0), teacher=teacher, verbose=False)
    return flows_dir() / name


@pytest.fixture(scope="module")
def flows(tiny_neox, tiny_neox_dir) -> dict[str, Path]:
    return {"a": _train(tiny_neox, tiny_neox_dir, NAME, 0), "b": _train(tiny_neox, tiny_neox_dir, TWIN, 1)}


@pytest.fixture
def copy(flows):
    """copy(name) -> a fresh copy of flow rf-a saved as ``name`` (removed after the test)."""
    made: list[Path] = []

    def make(name: str) -> Path:
        target = flows_dir() / name
        shutil.copytree(flows["a"], target)
        made.append(target)
        return target

    yield make
    for target in made:
        shutil.rmtree(target, ignore_errors=True)


def _edit(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line(rc: int, err: str, match: str) -> None:
    import re

    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert rc == 2 and last.startswith("error: ") and re.search(match, last), (rc, last)


EVAL = ["--windows", "1", "--k", "1", "--skip", "1", "--seq-len", "16"]


# ---------------------------------------------------------------------------------------------------------
# The record must be the one the weights were saved with


@pytest.mark.parametrize("field, value, match", [
    ("span", [0, 2], r"\(span 0:2, width 64\) does not fit its weights, which were trained for span 1:3"),
    ("span", [2, 4], r"span 2:4.*trained for span 1:3"),
    ("k", 8, r"config\.json says k = 8, but its weights were saved with k = 1"),
    ("method", "fw", r"method = 'fw', but its weights were saved with method = 'sfm'"),
    ("corpus", "builtin", r"corpus = 'builtin'.*corpus = 'mix'"),
    ("weights_hash", "0" * 64, r"weights_hash = '0000"),
    ("model", "EleutherAI/pythia-70m", r"model = 'EleutherAI/pythia-70m', but its weights were saved with model"),
    ("field_spec.act", "silu", r"config\.json says field_spec = .*edited"),
    ("name", "someone-else", r"name = 'someone-else'"),
])
def test_an_edited_record_is_refused_naming_the_field(copy, field, value, match, capsys):
    folder = copy("rf-edit")
    if field == "field_spec.act":
        spec = json.loads((folder / "config.json").read_text())["field_spec"]
        _edit(folder, field_spec={**spec, "act": value})
    else:
        _edit(folder, **{field: value})
    with pytest.raises(FlowCheckpointError, match=match):
        load_flow(folder)
    rc, _, err = _cli(["eval", "--flow", "rf-edit", *EVAL], capsys)
    _one_line(rc, err, match if field != "weights_hash" else r"weights_hash = '0000|trained for model")


def test_the_status_may_change_without_a_new_proof(copy):
    folder = copy("rf-status")
    _edit(folder, status="running")  # what a killed trainer leaves
    flow, config = load_flow(folder)
    assert flow.proof.verified and config["status"] == "running"


# ---------------------------------------------------------------------------------------------------------
# The weights must be the ones the record was saved with


def test_swapped_or_rewritten_weights_are_refused(flows, copy, capsys):
    from safetensors.torch import load_file, save_file

    swapped = copy("rf-swapped")
    shutil.copy(flows["b"] / "model.safetensors", swapped / "model.safetensors")  # same span and shapes
    with pytest.raises(FlowCheckpointError, match=r"do not match its config: their sha256 is .*swapped"):
        load_flow(swapped)
    rc, _, err = _cli(["eval", "--flow", "rf-swapped", *EVAL], capsys)
    _one_line(rc, err, "do not match its config")

    rewritten = copy("rf-rewritten")  # the same tensors, nudged, saved without the record
    state = load_file(str(rewritten / "model.safetensors"))
    state["mu"] = state["mu"] + 1.0
    save_file(state, str(rewritten / "model.safetensors"))
    with pytest.raises(FlowCheckpointError, match="carry no record"):
        load_flow(rewritten)

    stripped = copy("rf-stripped")  # a record from which the proof was removed, beside weights that carry one
    _edit(stripped, flow_format=..., weights_sha256=...)
    with pytest.raises(FlowCheckpointError, match="'weights_sha256' is missing, but the weights carry a record"):
        load_flow(stripped)


def test_a_checkpoint_cut_between_weights_and_record_still_loads(flows, tmp_path, monkeypatch):
    """save_flow over an existing folder: config.json records the new hash (and the previous one) before the
    weights are renamed, so a kill at either moment leaves a pair that proves itself."""
    import lft_core.atomic as atomic

    folder = tmp_path / "cut"
    shutil.copytree(flows["a"], folder)
    flow, config = load_flow(folder)
    with torch.no_grad():
        flow.mu += 1.0
    real_replace = os.replace

    def fail_on_weights(src, dst):
        if str(dst).endswith("model.safetensors"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fail_on_weights)
    with pytest.raises(OSError):
        save_flow(flow, folder, {**config, "steps_done": 99})
    monkeypatch.undo()
    old, record = load_flow(folder)  # the previous weights, with the record they carry
    assert old.proof.verified and record["steps_done"] == config["steps_done"]
    assert json.loads((folder / "config.json").read_text())["steps_done"] == 99  # the config is ahead of them
    save_flow(flow, folder, {**config, "steps_done": 99})
    new, record = load_flow(folder)
    assert new.proof.verified and record["steps_done"] == 99 and "weights_sha256_previous" not in record
    assert torch.equal(new.mu, flow.mu)


# ---------------------------------------------------------------------------------------------------------
# The teacher must be the one the flow was trained for


def test_another_teacher_weights_or_field_shape_is_one_line(flows, tiny_neox, monkeypatch):
    monkeypatch.setattr(tiny_neox, "weights_hash", "f" * 64)
    with pytest.raises(LFTError, match=r"with weights .*but this .* has weights ffffffffffff… \(the model changed"):
        open_flow(NAME, tiny_neox)
    monkeypatch.undo()
    real = tiny_neox.field_spec

    def other_shape(t_dim: int = 128):
        spec = real(t_dim)
        spec.n_kv_heads = 2
        return spec

    monkeypatch.setattr(tiny_neox, "field_spec", other_shape)
    with pytest.raises(FlowCheckpointError, match=r"another shape than .* \(n_kv_heads 4, the model's 2\)"):
        open_flow(NAME, tiny_neox)


# ---------------------------------------------------------------------------------------------------------
# One reader: bounded, regular files only, a schema


@pytest.mark.parametrize("edit, match", [
    ({"bogus": 1}, r"field 'bogus' is not a field of this record"),
    ({"k": "3"}, r"field 'k' is a str, not a int"),
    ({"steps": True}, r"field 'steps' is a bool, not a int"),
    ({"history": {}}, r"field 'history' is a dict, not a list"),
    ({"lr": None}, r"field 'lr' is a null, not a int/float"),
    ({"field_spec": ...}, r"field 'field_spec' is missing"),
    ({"weights_sha256": 7}, r"field 'weights_sha256' is a int, not a str"),
    ({"flow_format": 3}, r"'flow_format' is 3, not 2"),
])
def test_record_schema_missing_extra_and_wrong_typed_fields(copy, edit, match, capsys):
    folder = copy("rf-schema")
    _edit(folder, **edit)
    with pytest.raises(FlowCheckpointError, match=match):
        load_flow(folder)
    with pytest.raises(LFTError, match=match):
        read_flow_config("rf-schema")
    listed = next(f for f in list_flows() if f.name == "rf-schema")
    assert listed.error and "unreadable config" in listed.error
    rc, _, err = _cli(["eval", "--flow", "rf-schema", *EVAL], capsys)
    _one_line(rc, err, match)


def _make_legacy(folder: Path, **changes) -> None:
    """Turn a copy into a flow as saved before flows carried a proof: weights without a record, no hash."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})  # as the old save_flow did
    _edit(folder, flow_format=..., weights_sha256=..., **changes)


def test_a_record_without_a_model_is_one_line(copy, capsys):
    folder = copy("rf-nomodel")
    _edit(folder, model=...)
    rc, _, err = _cli(["eval", "--flow", "rf-nomodel", *EVAL], capsys)  # was: KeyError 'model', a traceback
    _one_line(rc, err, r"config\.json says model = nothing, but its weights were saved with model = ")
    _make_legacy(copy("rf-nomodel-old"), model=...)
    rc, _, err = _cli(["eval", "--flow", "rf-nomodel-old", *EVAL], capsys)
    _one_line(rc, err, r"does not say which model.*pass --model")


def test_records_that_are_fifos_devices_or_huge_are_refused_at_once(copy, tmp_path, capsys):
    fifo = copy("rf-fifo")
    (fifo / "config.json").unlink()
    os.mkfifo(fifo / "config.json")
    done: list = []
    reader = threading.Thread(target=lambda: done.append(_try(lambda: read_flow_config("rf-fifo"))), daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # the old reader blocks in open() until a writer comes: be that writer, then fail
        os.close(os.open(fifo / "config.json", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO config.json blocked")
    assert "is a FIFO, not a regular file" in done[0]

    zero = copy("rf-zero")
    (zero / "config.json").unlink()
    (zero / "config.json").symlink_to("/dev/zero")
    t0 = time.perf_counter()
    with pytest.raises(FlowCheckpointError, match="is a device, not a regular file"):
        load_flow(zero)
    rc, _, err = _cli(["eval", "--flow", "rf-zero", *EVAL], capsys)
    _one_line(rc, err, "is a device, not a regular file")

    huge = copy("rf-huge")
    with open(huge / "config.json", "r+b") as f:  # a valid start, then 50 MB of padding (sparse)
        f.seek(50 * 2**20)
        f.write(b"}")
    with pytest.raises(FlowCheckpointError, match="larger than 16 MiB"):
        load_flow(huge)
    assert time.perf_counter() - t0 < 3
    listed = {f.name: f for f in list_flows()}
    assert all(listed[n].error for n in ("rf-fifo", "rf-zero", "rf-huge"))

    (tmp_path / "folder.json").mkdir()
    with pytest.raises(DamagedRecord, match="is a folder"):
        read_record(tmp_path / "folder.json")


def _try(call) -> str:
    try:
        call()
    except LFTError as e:
        return str(e)
    return "read"


def test_training_state_json_has_an_exact_schema(copy, tiny_neox, tiny_neox_dir):
    folder = copy("rf-state")
    state = json.loads((folder / "training_state.json").read_text())
    (folder / "training_state.json").write_text(json.dumps({**state, "extra": 1}))
    with pytest.raises(LFTError, match="training state .* is damaged .*'extra' is not a field"):
        train_flow(TrainConfig(model=str(tiny_neox_dir), span=(1, 3), method="sfm", k=1, steps=2, batch=2,
                               seq_len=16, windows=4, heldout_windows=1, eval_every=1, checkpoint_every=1,
                               name="rf-state", distill_steps=0), teacher=tiny_neox, resume=True, verbose=False)


def test_save_refuses_a_record_with_an_unknown_field(tmp_path):
    from lft_core.flow.field import FieldSpec
    from lft_core.flow.latent import LatentFlow

    flow = LatentFlow(FieldSpec(d_model=8, n_heads=2, n_kv_heads=2, head_dim=4, d_ff=16), span=(0, 1))
    with pytest.raises(LFTError, match="field 'typo_setting' is not a field of this record"):
        save_flow(flow, tmp_path / "f", {"typo_setting": 1})
    assert not (tmp_path / "f").exists()


# ---------------------------------------------------------------------------------------------------------
# Flows saved before this change


def test_a_flow_saved_before_proofs_loads_unverified_and_gets_its_proof_on_resume(copy, tiny_neox, tiny_neox_dir,
                                                                                  tmp_path, capsys):
    folder = copy("rf-legacy")
    _make_legacy(folder, legacy_setting="kept")  # with a field of an older version
    flow, config = open_flow("rf-legacy", tiny_neox)
    assert not flow.proof.verified and "unverified" in flow.proof.note
    out = tmp_path / "legacy.json"
    rc, _, err = _cli(["eval", "--flow", "rf-legacy", *EVAL, "--json", out], capsys)
    assert rc == 0, err
    assert "note: flow 'rf-legacy' was saved before flows recorded a hash of their weights" in err
    assert json.loads(out.read_text())["flow_source"]["verified"] is False
    _edit(folder, legacy_setting=...)
    train_flow(TrainConfig(model=str(tiny_neox_dir), span=(1, 3), method="sfm", k=1, steps=2, batch=2, seq_len=16,
                           windows=4, heldout_windows=1, eval_every=1, checkpoint_every=1, name="rf-legacy",
                           distill_steps=0), teacher=tiny_neox, resume=True, verbose=False)
    flow, config = open_flow("rf-legacy", tiny_neox)
    assert flow.proof.verified and config["flow_format"] == 2 and config["steps_done"] == 2


# ---------------------------------------------------------------------------------------------------------
# Saved flows are named as such; paths are paths; the result says which was used


def test_a_bare_name_is_the_saved_flow_and_a_path_is_a_path(flows, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(flows["b"], tmp_path / NAME)  # a folder in the current directory with the saved flow's name
    saved_json, path_json = tmp_path / "saved.json", tmp_path / "path.json"
    rc, _, err = _cli(["eval", "--flow", NAME, *EVAL, "--json", saved_json], capsys)
    assert rc == 0, err
    rc, _, err = _cli(["eval", "--flow", f"./{NAME}", *EVAL, "--json", path_json], capsys)
    assert rc == 0, err
    saved, path = json.loads(saved_json.read_text()), json.loads(path_json.read_text())
    assert saved["flow_source"]["kind"] == "saved" and saved["flow_source"]["path"] == str(flows_dir() / NAME)
    assert path["flow_source"]["kind"] == "path" and path["flow_source"]["path"] == str(tmp_path / NAME)
    assert saved["flow_source"]["verified"] and path["flow_source"]["verified"]
    sha = {p: json.loads((p / "config.json").read_text())["weights_sha256"] for p in (flows["a"], flows["b"])}
    assert saved["flow_source"]["weights_sha256"] == sha[flows["a"]]
    assert path["flow_source"]["weights_sha256"] == sha[flows["b"]]
    assert saved["rows"] != path["rows"]  # two different flows were evaluated
    assert resolve_flow(NAME).kind == "saved" and resolve_flow(NAME).path == flows_dir() / NAME
    assert resolve_flow(f"./{NAME}").kind == "path" and resolve_flow(f"./{NAME}").path == tmp_path / NAME


@pytest.mark.parametrize("spec, match", [
    ("./rf-a-not-here", r"bad flow name .*as a path .* is not a folder"),
    (f"./{NAME}", rf"is not a folder; a saved flow '{NAME}' exists: name it without a path"),
    ("~/no-such-flow-folder", r"as a path"),
    ("rf a", r"bad flow name 'rf a'"),
    ("no-such-saved-flow", r"no flow named 'no-such-saved-flow'.*given as a path, e\.g\. \./no-such-saved-flow"),
])
def test_names_and_paths_that_name_nothing_are_one_line(flows, spec, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _cli(["eval", "--flow", spec, *EVAL], capsys)
    _one_line(rc, err, match)
    with pytest.raises(LFTError, match=match):
        resolve_flow(spec)


# ---------------------------------------------------------------------------------------------------------
# The pages


def test_the_kl_page_shows_an_error_for_an_edited_flow(copy, tiny_neox_dir):
    from streamlit.testing.v1 import AppTest

    from app_fixtures import APP

    folder = copy("rf-page")
    _edit(folder, span=[0, 2])
    at = AppTest.from_file(str(APP), default_timeout=120)
    for key, value in {"model_spec": str(tiny_neox_dir), "seq_len": 16, "n_windows": 4, "span": (0, 2)}.items():
        at.session_state[key] = value
    at.query_params["flows"] = "rf-page"
    at.run()
    at.switch_page("views/kl.py").run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert any("rf-page" in e and "does not fit its weights" in e for e in errors), errors

    _edit(folder, span=[1, 3])
    _make_legacy(folder)  # a flow saved before proofs: computed, and said to be unverified
    at = AppTest.from_file(str(APP), default_timeout=120)
    for key, value in {"model_spec": str(tiny_neox_dir), "seq_len": 16, "n_windows": 4, "span": (1, 3)}.items():
        at.session_state[key] = value
    at.query_params["flows"] = "rf-page"
    at.run()
    at.switch_page("views/kl.py").run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    assert any("rf-page was saved before flows recorded a hash" in c.value for c in at.caption)
    assert "kl_result" in at.session_state
