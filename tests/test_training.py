"""Training: SFM / FW / hybrid runs, checkpoints, resume, stop flag, one trainer per flow name."""
from __future__ import annotations

import pytest
import torch

from lft_core.errors import LFTError
from lft_core.flow.store import open_flow
from lft_core.model.teacher import Replace
from lft_core.flow.config import TrainConfig
from lft_core.flow.training import lr_at, train_flow


def _cfg(model_dir, **kw):
    base = dict(model=str(model_dir), span=(1, 3), steps=6, batch=2, seq_len=16, windows=8, heldout_windows=2,
                eval_every=3, checkpoint_every=3, lr=3e-3, distill_steps=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["sfm", "fw", "hybrid"])
def test_methods_train_and_checkpoint(tiny_neox, tiny_neox_dir, method):
    events = []
    cfg = _cfg(tiny_neox_dir, method=method, name=f"t-{method}")
    result = train_flow(cfg, teacher=tiny_neox, progress=events.append, verbose=False)
    assert result.steps == 6 and not result.stopped and result.device == "cpu"
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert "heldout_nmse" in events[2] and "heldout_nmse" in events[5]
    assert torch.isfinite(torch.tensor(result.final_loss)) and result.heldout_nmse > 0
    assert result.teacher_span_params == tiny_neox.span_params(1, 3)
    flow, config = open_flow(f"t-{method}", tiny_neox)
    assert config["status"] == "complete" and config["method"] == method and config["span"] == [1, 3]
    assert len(config["history"]) == 6
    ids = tiny_neox.encode("A short test sentence for the spliced model.")
    logits = tiny_neox.logits(ids, Replace(flow, 2))
    assert logits.shape == tiny_neox.logits(ids).shape and torch.isfinite(logits).all()


def test_stop_flag_and_resume(tiny_neox, tiny_neox_dir):
    calls = {"n": 0}

    def stop_after_four():
        calls["n"] += 1
        return calls["n"] > 4

    cfg = _cfg(tiny_neox_dir, steps=8, name="t-resume")
    first = train_flow(cfg, teacher=tiny_neox, should_stop=stop_after_four, verbose=False)
    assert first.stopped and first.steps == 4
    _, config = open_flow("t-resume")
    assert config["status"] == "stopped" and config["steps_done"] == 4
    second = train_flow(cfg, teacher=tiny_neox, resume=True, verbose=False)
    assert second.steps == 8 and not second.stopped and len(second.history) == 8
    assert [h["step"] for h in second.history] == list(range(1, 9))


def test_resume_equals_uninterrupted(tiny_neox, tiny_neox_dir):
    """Optimizer moments and the data RNG are restored: 4 + 4 steps give the same weights as 8 steps."""
    straight = train_flow(_cfg(tiny_neox_dir, steps=8, name="t-straight", method="sfm"), teacher=tiny_neox,
                          verbose=False)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 4

    cfg = _cfg(tiny_neox_dir, steps=8, name="t-split", method="sfm")
    train_flow(cfg, teacher=tiny_neox, should_stop=stop, verbose=False)
    train_flow(cfg, teacher=tiny_neox, resume=True, verbose=False)
    a, _ = open_flow("t-straight")
    b, _ = open_flow("t-split")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=na)
    assert straight.steps == 8


def test_bad_configs(tiny_neox, tiny_neox_dir):
    for kw, msg in [({"span": (3, 3)}, "span"), ({"span": (2, 9)}, "span"), ({"k": 0}, "k must"),
                    ({"method": "xx"}, "method"), ({"windows": 0}, "windows"), ({"name": "../evil"}, "name"),
                    ({"batch": 50}, "batch")]:
        with pytest.raises(LFTError, match=msg):
            train_flow(_cfg(tiny_neox_dir, **kw), teacher=tiny_neox, verbose=False)


def test_flow_for_another_model_is_refused(tiny_neox, smol, tiny_neox_dir):
    train_flow(_cfg(tiny_neox_dir, steps=1, name="t-other"), teacher=tiny_neox, verbose=False)
    with pytest.raises(LFTError, match="trained for model"):
        open_flow("t-other", smol)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=0.1, distill_steps=0)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=0.01)
    assert lr_at(55, cfg) < lr_at(20, cfg)


def test_nmse_loss_weight_equals_the_metric():
    """With the 'nmse' weighting, the weighted squared error in normalised space IS the per-token NMSE in
    original units (the held-out metric); the sink weight multiplies position 0 only."""
    from types import SimpleNamespace

    from lft_core.analysis.metrics import nmse
    from lft_core.flow.training import loss_weight

    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(8, generator=g), torch.rand(8, generator=g) * 50 + 0.1
    flow = SimpleNamespace(sigma=sigma)
    x1 = torch.randn(2, 5, 8, generator=g) * sigma
    x_hat = x1 + torch.randn(2, 5, 8, generator=g) * 3
    norm = lambda x: (x - mu) / sigma  # noqa: E731
    w = loss_weight(flow, x1, "nmse")
    weighted = (w * (norm(x_hat) - norm(x1)) ** 2).mean()
    assert float(weighted) == pytest.approx(nmse(x_hat, x1), rel=1e-5)
    w_sink = loss_weight(flow, x1, "nmse", sink_weight=4.0)
    torch.testing.assert_close(w_sink[:, 0], 4 * w[:, 0])
    torch.testing.assert_close(w_sink[:, 1:], w[:, 1:])
    assert loss_weight(flow, x1, "uniform") is None
    assert TrainConfig(seq_len=128).resolved_sink_weight() == 64.0
    assert TrainConfig(seq_len=32, sink_weight=2.0).resolved_sink_weight() == 2.0


def test_delete_flow_and_the_flows_command(tiny_neox, tiny_neox_dir, capsys):
    from filelock import FileLock

    from lft_core.run.cli import main
    from lft_core.flow.store import delete_flow, flows_dir, list_flows

    train_flow(_cfg(tiny_neox_dir, steps=2, name="t-doomed"), teacher=tiny_neox, verbose=False)
    assert main(["flows"]) == 0
    assert "t-doomed: " in capsys.readouterr().out
    # while a trainer holds the flow's lock, deletion is refused and nothing is touched
    lock = FileLock(str(flows_dir() / ".t-doomed.lock"), timeout=0)
    with lock:
        with pytest.raises(LFTError, match="being trained"):
            delete_flow("t-doomed")
    assert open_flow("t-doomed", tiny_neox)[1]["steps_done"] == 2
    for bad in ("../t-doomed", "", ".t-doomed.lock", "no-such-flow"):
        with pytest.raises(LFTError, match="bad flow name|no flow named"):
            delete_flow(bad)
    assert main(["flows", "--delete", "t-doomed"]) == 0
    assert not (flows_dir() / "t-doomed").exists()
    assert "t-doomed" not in [f.name for f in list_flows()]
    assert not list(flows_dir().glob(".deleted-*"))  # the renamed folder is removed too
    assert main(["flows", "--delete", "t-doomed"]) == 2
    assert "no flow named 't-doomed'" in capsys.readouterr().err
