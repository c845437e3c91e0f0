"""A saved flow is never destroyed by another command; names are always valid; checkpoints appear whole."""
from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest

from lft_core.run.cli import main
from lft_core.errors import LFTError
from lft_core.flow.store import NAME_RE, delete_flow, flows_dir, list_flows
from lft_core.flow.config import TrainConfig
from lft_core.flow.pairs import load_pairs
from lft_core.flow.training import train_flow


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _tiny(tiny_neox_dir, name: str, **kw) -> TrainConfig:
    settings = dict(model=str(tiny_neox_dir), span=(1, 3), steps=2, batch=2, seq_len=16, windows=4,
                    heldout_windows=1, eval_every=2, checkpoint_every=1, distill_steps=0, name=name)
    return TrainConfig(**{**settings, **kw})


def test_a_taken_name_is_refused_and_the_flow_is_untouched(tiny_neox, tiny_neox_dir, capsys):
    train_flow(_tiny(tiny_neox_dir, "t-taken"), teacher=tiny_neox, verbose=False)
    before = _digests(flows_dir() / "t-taken")
    with pytest.raises(LFTError, match="exists already.*--resume.*flows --delete t-taken"):
        train_flow(_tiny(tiny_neox_dir, "t-taken", method="sfm"), teacher=tiny_neox, verbose=False)
    # the CLI says the same in one line, also for a run that would fail at once (a huge learning rate)
    rc = main(["train", "--model", str(tiny_neox_dir), "--span", "1:3", "--steps", "2", "--batch", "2", "--seq-len",
               "16", "--windows", "4", "--heldout-windows", "1", "--lr", "1e30", "--name", "t-taken"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: a flow named 't-taken' exists already")
    assert _digests(flows_dir() / "t-taken") == before


def test_resume_must_match_the_checkpoint(tiny_neox, tiny_neox_dir):
    train_flow(_tiny(tiny_neox_dir, "t-resume-check", steps=3), teacher=tiny_neox, verbose=False)
    before = _digests(flows_dir() / "t-resume-check")
    for change, match in [({"method": "sfm"}, "method = 'fw', not 'sfm'"), ({"k": 2}, "k = 3, not 2"),
                          ({"lr": 0.5}, "lr = 0.001, not 0.5"), ({"span": (0, 2)}, "another model or span"),
                          ({"steps": 2}, "3 are done already")]:
        with pytest.raises(LFTError, match=match):
            train_flow(_tiny(tiny_neox_dir, "t-resume-check", **{"steps": 3, **change}), teacher=tiny_neox,
                       verbose=False, resume=True)
    assert _digests(flows_dir() / "t-resume-check") == before
    result = train_flow(_tiny(tiny_neox_dir, "t-resume-check", steps=4), teacher=tiny_neox, verbose=False, resume=True)
    assert result.steps == 4


@pytest.mark.parametrize("model", ["/data/my models/Modèle ünïcode", "/tmp/.hidden-model", "/x/" + "m" * 240,
                                   "/x/---", "org/name with spaces", "./", "EleutherAI/pythia-410m"])
def test_derived_names_are_always_valid_listable_and_deletable(model, tmp_path, monkeypatch):
    name = TrainConfig(model=model, span=(6, 12), method="fw", k=3, steps=300, distill_steps=0).default_name()
    assert NAME_RE.match(name), name
    assert name.endswith("-6-12-fw-k3-s300") and len(name) <= 80
    (flows_dir() / name).mkdir()
    (flows_dir() / name / "config.json").write_text('{"span": [6, 12], "method": "fw"}')
    assert name in [f.name for f in list_flows()]
    delete_flow(name)
    assert not (flows_dir() / name).exists()


def test_a_new_flow_appears_whole_or_not_at_all_on_a_full_disk(tiny_neox, tiny_neox_dir, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(LFTError, match="could not save a checkpoint of flow 't-full'.*No space left.*nothing was saved"):
        train_flow(_tiny(tiny_neox_dir, "t-full"), teacher=tiny_neox, verbose=False)
    assert not (flows_dir() / "t-full").exists()
    assert not [p for p in flows_dir().iterdir() if p.name.startswith(".t-full.") and p.suffix != ".lock"]  # no staging
    assert "t-full" not in [f.name for f in list_flows()]

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    train_flow(_tiny(tiny_neox_dir, "t-full"), teacher=tiny_neox, verbose=False)
    before = _digests(flows_dir() / "t-full")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(LFTError, match="could not save a checkpoint.*the last checkpoint is intact"):
        train_flow(_tiny(tiny_neox_dir, "t-full", steps=4), teacher=tiny_neox, verbose=False, resume=True)
    assert _digests(flows_dir() / "t-full") == before


def test_a_cache_entry_deleted_while_training_reads_it_is_computed_again(tiny_neox, tiny_neox_dir, monkeypatch):
    import lft_core.flow.pairs as pairs
    from lft_core.data.activations import delete_entry

    real = pairs.ensure_activations
    deleted: list[str] = []

    def ensure_then_delete(*args, **kwargs):
        entry = real(*args, **kwargs)
        if not deleted:  # another session deletes the entry right after this job cached it
            delete_entry(entry.key)
            deleted.append(entry.key)
        return entry

    monkeypatch.setattr(pairs, "ensure_activations", ensure_then_delete)
    cfg = _tiny(tiny_neox_dir, "t-gone", seq_len=24)
    data = load_pairs(tiny_neox, cfg, progress=False)
    assert deleted and data.x0.shape == (4, 24, tiny_neox.d_model)


@pytest.mark.parametrize("damage", ["json", "tensors"])
def test_a_damaged_training_state_is_one_line_on_resume(tiny_neox, tiny_neox_dir, damage, capsys):
    name = f"t-state-{damage}"
    train_flow(_tiny(tiny_neox_dir, name), teacher=tiny_neox, verbose=False)
    target = flows_dir() / name / ("training_state.json" if damage == "json" else "training_state.safetensors")
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    before = _digests(flows_dir() / name)
    rc = main(["train", "--model", str(tiny_neox_dir), "--span", "1:3", "--steps", "4", "--batch", "2", "--seq-len",
               "16", "--windows", "4", "--heldout-windows", "1", "--eval-every", "2", "--checkpoint-every", "1",
               "--name", name, "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: the training state of flow") and "Traceback" not in "\n".join(err)
    assert _digests(flows_dir() / name) == before


def test_a_flows_corpus_is_read_from_its_config_and_old_flows_were_trained_on_the_python_docs():
    from lft_core.flow.store import trained_on

    assert trained_on({"corpus": "english"}) == "english"
    assert trained_on({"corpus": "/data/mine.txt"}) == "/data/mine.txt"
    assert trained_on({}) == "builtin"  # saved before the corpus was recorded, when the Python docs were the default
