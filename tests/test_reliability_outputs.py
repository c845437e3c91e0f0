"""Issue 24, classes 1 and 2: output paths never clobber what is not the user's plain file, and settings are
checked as a whole (resume refuses any setting that changes what earlier steps meant).

1. ``lft_core.outputs``: one gate for every ``--json`` and script ``--out``: FIFOs, devices, sockets, links and
   the cache's own files are refused before any work and left as they are; the write is bound to the folder
   that was checked, so a link or FIFO swapped in during the work is not replaced or written through.
2. ``TrainConfig.validate``: every float finite and in range, settings meaningful together, before any model
   loads; ``--resume`` names the first setting that differs from the checkpoint's.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from lft_core.errors import LFTError
from lft_core.flow.config import TrainConfig
from lft_core.flow.store import flows_dir
from lft_core.flow.training import train_flow
from lft_core.paths import REPO_ROOT
from cli_helpers import run_cli as _cli


def _one_line(rc: int, err: str, *match: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and lines, (rc, err)
    assert "error: " in lines[-1], lines[-1]
    for m in match:
        assert m in lines[-1], lines[-1]
    return lines[-1]


def _state(path: Path) -> tuple:
    """What a path is: its kind, link target, and content hash (regular files), without following a link."""
    st = os.lstat(path)
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    data = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
    return stat.S_IFMT(st.st_mode), link, data, st.st_ino


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the refusal must come before it."""
    import lft_core.model.loading as loading

    monkeypatch.setattr(loading, "load_teacher", lambda *a, **k: pytest.fail("a model was loaded before the refusal"))


# ---------------------------------------------------------------------------------------------------------
# 1. Output paths


def _make(kind: str, where: Path) -> tuple[Path, Path | None]:
    """An output path of ``kind`` in ``where`` and the file a link points to (or None)."""
    target = where / "precious.json"
    target.write_text('{"mine": true}')
    path = where / f"out-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(target)
    elif kind == "dangling-symlink":
        path.symlink_to(where / "nowhere.json")
    elif kind == "dir-symlink":
        (where / "dir").mkdir()
        path.symlink_to(where / "dir", target_is_directory=True)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "char-device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private copy of /dev/null's device
        except PermissionError:
            pytest.skip("mknod needs root")
    elif kind == "read-only":
        path.write_text("keep me")
        path.chmod(0o444)
    elif kind == "folder":
        path.mkdir()
    return path, target


@pytest.mark.parametrize("kind, words", [
    ("fifo", "FIFO"), ("symlink", "symbolic link"), ("dangling-symlink", "which does not exist"),
    ("dir-symlink", "symbolic link"), ("socket", "socket"), ("char-device", "character device"),
    ("read-only", "read-only"), ("folder", "is a folder"),
])
def test_json_onto_what_is_not_a_plain_file_is_refused_and_left_alone(kind, words, tmp_path, capsys):
    path, target = _make(kind, tmp_path)
    before, target_before = _state(path), _state(target)
    rc, err = _cli(["flows", "--json", path], capsys)
    _one_line(rc, err, "--json", words)
    assert _state(path) == before and _state(target) == target_before


def test_json_inside_the_cache_is_refused_before_any_work(tmp_path, capsys, no_model, monkeypatch):
    root = Path(os.environ["LFT_CACHE_DIR"])
    flow = flows_dir() / "t-out-flow"
    flow.mkdir(exist_ok=True)
    (flow / "config.json").write_text('{"span": [1, 3]}')
    before = _state(flow / "config.json")
    (tmp_path / "into-flows").symlink_to(flows_dir(), target_is_directory=True)
    inside = [flow / "config.json", flow / "new.json", root, root / "grids" / "x.json", root / "timings.json",
              root / "demo", root / ".hidden.json", root / "flows" / ".." / "jobs" / "r.json",
              tmp_path / "into-flows" / "t-out-flow" / "config.json", REPO_ROOT / "cache" / "flows" / "x.json"]
    for path in inside:
        for argv in (["flows"], ["train", "--span", "1:3"], ["recoupling"]):
            rc, err = _cli(argv + ["--json", path], capsys)
            _one_line(rc, err, "cache folder")
    monkeypatch.chdir(flow)  # a relative name inside a flow's folder
    rc, err = _cli(["flows", "--json", "config.json"], capsys)
    _one_line(rc, err, "cache folder")
    monkeypatch.chdir(tmp_path)
    rc, err = _cli(["flows", "--json", os.path.relpath(flow / "config.json")], capsys)  # ../../.. style
    _one_line(rc, err, "cache folder")
    assert _state(flow / "config.json") == before
    assert not (flow / "new.json").exists() and not (root / "grids" / "x.json").exists()
    # a file of the user's own beside the cache's folders is still theirs
    rc, _ = _cli(["flows", "--json", root / "listing.json"], capsys)
    assert rc == 0 and json.loads((root / "listing.json").read_text())["flows"] is not None
    (root / "listing.json").unlink()


@pytest.mark.parametrize("given, words", [("", "needs a file name"), ("   ", "needs a file name"),
                                          ("new-folder/", "ends with '/'"), (".", "is a folder")])
def test_json_names_that_are_not_file_names(given, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = _cli(["flows", "--json", given], capsys)
    _one_line(rc, err, words)
    assert list(tmp_path.iterdir()) == []


def test_a_jobs_own_result_file_is_the_one_cache_file_a_command_writes(capsys):
    from lft_core.run.jobs import jobs_dir

    job = jobs_dir() / "20990101-000000-abcdef"
    job.mkdir()
    result = job / "result.json"
    (job / "job.json").write_text(json.dumps({"kind": "toy", "args": ["flows", "--json", str(result)],
                                              "created": "now"}))
    rc, err = _cli(["flows", "--json", result], capsys)
    assert rc == 0, err
    assert "flows" in json.loads(result.read_text())
    before = _state(result)
    rc, err = _cli(["flows", "--json", result], capsys)  # written once: a second command cannot overwrite it
    _one_line(rc, err, "cache folder")
    other = jobs_dir() / "20990101-000000-fedcba"
    other.mkdir()
    (other / "job.json").write_text(json.dumps({"kind": "toy", "args": ["flows"], "created": "now"}))
    rc, err = _cli(["flows", "--json", other / "result.json"], capsys)  # not named by its job
    _one_line(rc, err, "cache folder")
    assert _state(result) == before and not (other / "result.json").exists()


@pytest.mark.parametrize("swap", ["symlink", "fifo", "dir-symlink-into-cache"])
def test_something_swapped_in_during_the_work_is_not_replaced_or_followed(swap, tmp_path, capsys, monkeypatch):
    """The output is checked before the work and again, inside the checked folder, at the write: a link or FIFO
    put at the path while the command ran is left as it is (the old atomic rename replaced it)."""
    from lft_core.run import commands

    target = tmp_path / "precious.json"
    target.write_text('{"mine": true}')
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / "result.json"

    def work(a):
        if swap == "symlink":
            path.symlink_to(target)
        elif swap == "fifo":
            os.mkfifo(path)
        else:  # the checked folder's path now leads into the cache's flows
            folder.rename(tmp_path / "moved")
            folder.symlink_to(flows_dir(), target_is_directory=True)
        return {"done": True}

    monkeypatch.setitem(commands.COMMANDS, "flows", work)
    target_before = _state(target)
    rc, err = _cli(["flows", "--json", path], capsys)
    _one_line(rc, err, "--json")
    assert _state(target) == target_before
    if swap == "dir-symlink-into-cache":
        assert not (flows_dir() / "result.json").exists()
    else:
        assert stat.S_ISLNK(os.lstat(path).st_mode) if swap == "symlink" else stat.S_ISFIFO(os.lstat(path).st_mode)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_regular_file_is_replaced_atomically_and_a_new_name_created(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text("{}")
    for path in (old, tmp_path / "new.json"):
        rc, err = _cli(["flows", "--json", path], capsys)
        assert rc == 0, err
        assert "flows" in json.loads(path.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "old.json"]  # no temporaries left


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_outputs_go_through_the_same_gate(tmp_path):
    from lft_core.outputs import open_output_append

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"matrix": [[None, 0.5], [None, None]], "pairs": 8, "model": "m"}))
    precious = tmp_path / "precious.png"
    precious.write_bytes(b"mine")
    link = tmp_path / "link.png"
    link.symlink_to(precious)
    plot = _script("plot_grid")
    with pytest.raises(LFTError, match="symbolic link"):
        plot.main(str(grid), str(link))
    with pytest.raises(LFTError, match="cache folder"):
        plot.main(str(grid), str(Path(os.environ["LFT_CACHE_DIR"]) / "grids" / "g.png"))
    assert precious.read_bytes() == b"mine" and link.is_symlink()
    plot.main(str(grid), str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    # recipe_grid's --out grows line by line: the same gate, and a FIFO is refused without blocking
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    for bad, words in ((fifo, "FIFO"), (link, "symbolic link"), (flows_dir() / "rows.jsonl", "cache folder")):
        with pytest.raises(LFTError, match=words):
            open_output_append(bad, "--out")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"row": 1}\n')
    with open_output_append(rows, "--out") as f:
        f.write('{"row": 2}\n')
    assert rows.read_text().splitlines() == ['{"row": 1}', '{"row": 2}']
    source = (REPO_ROOT / "scripts" / "recipe_grid.py").read_text()
    assert "open_output_append(a.out" in source and 'open(a.out, "a")' not in source


# ---------------------------------------------------------------------------------------------------------
# 2. Settings as a whole, before any model loads


BAD_SETTINGS = [
    (["--grad-clip", "-1"], "grad_clip"), (["--grad-clip", "0"], "grad_clip"), (["--grad-clip", "-0"], "grad_clip"),
    (["--warmup", "nan"], "--warmup"), (["--warmup", "1"], "warmup"), (["--warmup", "-0.1"], "warmup"),
    (["--weight-decay", "NaN"], "--weight-decay"), (["--weight-decay", "-0.5"], "weight_decay"),
    (["--weight-decay", "inf"], "--weight-decay"), (["--alpha", "inf"], "--alpha"), (["--alpha", "-1"], "alpha"),
    (["--lr", "0"], "lr"), (["--lr=-1e-3"], "lr"), (["--lr", "1e999"], "--lr"),
    (["--distill-lr=-1e-4"], "distill_lr"), (["--sink-weight", "nan"], "--sink-weight"),
    (["--sink-weight", "-1"], "sink_weight"), (["--waypoints", "1e300"], "waypoints"),
    (["--lr", "0.5", "--weight-decay", "2"], "weight_decay"), (["--distill-lr", "10", "--weight-decay", "0.1"],
                                                                  "weight_decay"),
]


@pytest.mark.parametrize("flags, names", BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_meaningless_settings_are_refused_before_the_model_loads(flags, names, capsys, no_model):
    for command in (["train", "--span", "1:3"], ["sweep", "--spans", "1:3"]):
        rc, err = _cli(command + flags, capsys)
        _one_line(rc, err, names)


@pytest.mark.parametrize("change, names", [
    ({"grad_clip": -1.0}, "grad_clip"), ({"warmup": float("nan")}, "warmup"), ({"weight_decay": float("inf")},
                                                                               "weight_decay"),
    ({"alpha": float("nan")}, "alpha"), ({"lr": float("inf")}, "lr"), ({"distill_lr": 0.0}, "distill_lr"),
    ({"eval_every": 0}, "eval_every"), ({"checkpoint_every": -1}, "checkpoint_every"), ({"seed": True}, "seed"),
    ({"steps": 3.0}, "steps"), ({"normalise": "yes"}, "normalise"), ({"model": ""}, "model"),
    ({"lr": 0.2, "weight_decay": 5.0}, "weight_decay"),
])
def test_the_library_validates_every_setting_before_loading(change, names, no_model):
    with pytest.raises(LFTError, match=names):
        train_flow(TrainConfig(span=(1, 3), **change), verbose=False)


def test_minus_zero_is_zero_and_good_edge_values_pass():
    cfg = TrainConfig(weight_decay=-0.0, warmup=-0.0, alpha=-0.0)
    cfg.validate()
    assert str(cfg.weight_decay) == "0.0" and str(cfg.warmup) == "0.0"
    TrainConfig(warmup=0.999, grad_clip=1e-12, lr=1e-12, sink_weight=0.0).validate()


def test_empty_lists_where_a_value_is_needed(capsys, no_model):
    rc, err = _cli(["eval", "--flow", "anything", "--k", ""], capsys)
    _one_line(rc, err, "--k", "at least one integer")
    rc, err = _cli(["eval", "--flow", "anything", "--k", " , "], capsys)
    _one_line(rc, err, "at least one integer")
    rc, err = _cli(["baselines", "--span", "1:3", "--skip", ""], capsys)
    _one_line(rc, err, "--skip", "nothing to evaluate")
    rc, err = _cli(["baselines", "--span", "1:3", "--skip", "", "--baselines", "skip"], capsys)
    _one_line(rc, err, "nothing to evaluate")
    for flag in ("--spans", "--k", "--seeds", "--methods"):
        rc, err = _cli(["sweep", "--spans", "1:3", flag, ""], capsys)
        _one_line(rc, err, "at least one")
    from lft_core.run.cli import build_parser

    args = build_parser().parse_args(["eval", "--flow", "x", "--skip", ""])
    assert args.skip == [] and args.k == [1, 2, 3]  # no skip rows, the flow is still evaluated


def _tiny(tiny_neox_dir, name: str, **kw) -> TrainConfig:
    settings = dict(model=str(tiny_neox_dir), span=(1, 3), steps=2, batch=2, seq_len=16, windows=4,
                    heldout_windows=1, eval_every=1, checkpoint_every=1, distill_steps=0, name=name)
    return TrainConfig(**{**settings, **kw})


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


RESUME_CHANGES = [({"seed": 1}, "seed = 0"), ({"weight_decay": 0.1}, "weight_decay = 0.01"),
                  ({"grad_clip": 0.5}, "grad_clip = 1.0"), ({"warmup": 0.2}, "warmup = 0.05"),
                  ({"heldout_windows": 2}, "heldout_windows = 1"), ({"init_from_teacher": True}, "init_from_teacher"),
                  ({"normalise": False}, "normalise = True"), ({"sink_weight": 3.0}, "sink_weight = 8.0")]


def test_resume_refuses_every_setting_that_changes_what_earlier_steps_meant(tiny_neox, tiny_neox_dir, capsys,
                                                                           monkeypatch):
    name = "t-resume-meaning"
    train_flow(_tiny(tiny_neox_dir, name), teacher=tiny_neox, verbose=False)
    before = _digests(flows_dir() / name)
    for change, words in RESUME_CHANGES:
        with pytest.raises(LFTError, match=f"cannot resume {name}: it was trained with {words}"):
            train_flow(_tiny(tiny_neox_dir, name, steps=3, **change), teacher=tiny_neox, verbose=False, resume=True)
    assert _digests(flows_dir() / name) == before
    # the CLI says it in one line before it loads the model
    import lft_core.model.loading as loading

    real = loading.load_teacher
    monkeypatch.setattr(loading, "load_teacher", lambda *a, **k: pytest.fail("loaded before the refusal"))
    base = ["train", "--model", tiny_neox_dir, "--span", "1:3", "--steps", "3", "--batch", "2", "--seq-len", "16",
            "--windows", "4", "--heldout-windows", "1", "--distill-steps", "0", "--name", name, "--resume"]
    for flags, words in ((["--seed", "7"], "seed = 0, not 7"), (["--grad-clip", "2"], "grad_clip"),
                         (["--no-normalise"], "normalise"), (["--sink-weight", "1"], "sink_weight")):
        rc, err = _cli(base + flags, capsys)
        _one_line(rc, err, f"cannot resume {name}", words)
    assert _digests(flows_dir() / name) == before
    monkeypatch.setattr(loading, "load_teacher", real)
    # free to change: when to evaluate and checkpoint (the weights do not depend on them), and the sink weight
    # spelt out as its default (seq_len / 2 = 8)
    result = train_flow(_tiny(tiny_neox_dir, name, steps=3, eval_every=5, checkpoint_every=2, sink_weight=8.0),
                        teacher=tiny_neox, verbose=False, resume=True)
    assert result.steps == 3
    saved = json.loads((flows_dir() / name / "config.json").read_text())
    assert (saved["seed"], saved["grad_clip"], saved["normalise"]) == (0, 1.0, True)


def test_a_run_that_diverges_ends_with_its_error_line(tiny_neox_dir, capsys):
    """A finite but far too large learning rate (allowed: only lr x weight_decay >= 1 is refused up front)
    diverges: exit 2 and the error line is the last line on stderr (the progress bar is closed before it)."""
    rc, err = _cli(["train", "--model", tiny_neox_dir, "--span", "1:3", "--steps", "3", "--batch", "2", "--seq-len",
                    "16", "--windows", "4", "--heldout-windows", "1", "--distill-steps", "0", "--lr", "1e3",
                    "--weight-decay", "0", "--name", "t-diverges"], capsys)
    _one_line(rc, err, "training diverged")
