"""The stronger objectives of "flows that win": teacher-path (waypoint) supervision and output-level distillation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lft_core.errors import LFTError
from lft_core.flow.losses import path_loss, sfm_loss
from lft_core.analysis.metrics import kl_per_token
from lft_core.flow.solvers import integrate
from lft_core.flow.store import flows_dir, load_flow
from lft_core.model.teacher import Replace
from lft_core.flow.config import TrainConfig
from lft_core.flow.training import lr_at, train_flow


# ---------------------------------------------------------------------------------------------------------
# The teacher-path term


def test_path_loss_is_zero_for_the_path_velocity_and_sfm_for_one_piece():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, generator=g)
    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, -1.0])
    path = torch.stack([x0, x0 + a, x0 + a + b])  # two pieces: waypoint at t = 1/2

    def exact(x, t):  # the piecewise-constant velocity of that path: 2a before t = 1/2, 2b after
        return torch.where((t < 0.5)[:, None], 2 * a, 2 * b).expand_as(x)

    assert path_loss(exact, path, generator=g).item() == pytest.approx(0.0, abs=1e-10)
    # the straight velocity (a + b) is wrong on both pieces by (a - b): loss = mean over elements of (a - b)²
    straight = lambda x, t: (a + b).expand_as(x)  # noqa: E731
    assert path_loss(straight, path, generator=g).item() == pytest.approx((a - b).pow(2).mean().item(), rel=1e-6)
    # one piece is standard flow matching, same times, same loss
    u = lambda x, t: 0.3 * x + t[:, None]  # noqa: E731
    t = torch.rand(64, generator=g)
    assert path_loss(u, path[[0, 2]], t=t).item() == pytest.approx(sfm_loss(u, path[0], path[2], t=t).item())


def _field(seed: int) -> nn.Module:
    torch.manual_seed(seed)

    class Field(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

        def forward(self, x, t):
            return self.net(torch.cat([x, t[:, None]], dim=1))

    return Field()


def test_waypoint_supervision_recovers_a_known_piecewise_linear_path():
    """Points move right by 2, then up by 2 (waypoint at t = 1/2). Trained on the end points alone (SFM), the
    flow goes diagonally and passes (1, 1) from the waypoint at t = 1/2; trained with the waypoint, it passes
    through it."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(512, 2, generator=g) * 0.3
    mid, x1 = x0 + torch.tensor([2.0, 0.0]), x0 + torch.tensor([2.0, 2.0])
    errors = {}
    for name in ("sfm", "path"):
        field = _field(0)
        opt = torch.optim.Adam(field.parameters(), lr=3e-3)
        for _ in range(600):
            idx = torch.randint(0, 512, (128,), generator=g)
            if name == "sfm":
                loss = sfm_loss(field, x0[idx], x1[idx], generator=g)
            else:
                loss = path_loss(field, torch.stack([x0[idx], mid[idx], x1[idx]]), generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            traj = integrate(field, x0, 32, return_path=True)
        errors[name] = float((traj.states[16] - mid).norm(dim=1).mean())  # the state at t = 16/32
    assert errors["path"] < 0.2, errors  # the MLP smooths the turn at t = 1/2 a little
    assert errors["sfm"] > 1.0, errors  # the straight path misses the waypoint by sqrt(2) ≈ 1.41


def test_waypoint_training_reads_the_inner_layers(tiny_neox, tiny_neox_dir):
    cfg = TrainConfig(model=str(tiny_neox_dir), span=(0, 3), steps=3, batch=2, seq_len=16, windows=4,
                      heldout_windows=1, eval_every=3, waypoints=0.5, distill_steps=0, name="obj-waypoints")
    result = train_flow(cfg, teacher=tiny_neox, verbose=False)
    config = json.loads((flows_dir() / "obj-waypoints" / "config.json").read_text())
    assert config["waypoints"] == 0.5 and result.steps == 3 and np.isfinite(result.final_loss)
    from lft_core.data.activations import list_entries

    layers = [e["meta"]["layers"] for e in list_entries() if e["key"] == config["data_key"]][0]
    assert {1, 2} <= set(layers)  # h_1 and h_2, the waypoints of span 0:3, were cached and read


# ---------------------------------------------------------------------------------------------------------
# Output-level distillation


def test_logits_from_a_state_continue_the_teachers_own_forward(tiny_neox):
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    hs = tiny_neox.hidden_states(ids, [2, 4])
    for layer in (2, 4):
        assert torch.allclose(tiny_neox.logits_from_state(ids, hs[layer], layer), tiny_neox.logits(ids), atol=1e-4)
    h = hs[2].clone().requires_grad_(True)
    tiny_neox.logits_from_state(ids, h, 2).logsumexp(-1).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in tiny_neox.model.parameters())  # the teacher itself stays frozen
    with pytest.raises(LFTError, match="blocks 1..4"):
        tiny_neox.logits_from_state(ids, hs[2], 0)


def test_distillation_lowers_the_spliced_models_kl(tiny_neox, tiny_neox_dir):
    base = dict(model=str(tiny_neox_dir), span=(1, 3), steps=2, batch=2, seq_len=16, windows=6, heldout_windows=1,
                eval_every=100, seed=3, corpus="builtin")  # text on which 2 flow steps leave a KL worth cutting
    train_flow(TrainConfig(**base, distill_steps=0, name="obj-before"), teacher=tiny_neox, verbose=False)
    result = train_flow(TrainConfig(**base, distill_steps=12, distill_lr=3e-3, distill_batch=2, name="obj-after"),
                        teacher=tiny_neox, verbose=False)
    assert result.steps == 14
    history = json.loads((flows_dir() / "obj-after" / "config.json").read_text())["history"]
    assert [h.get("stage", "flow") for h in history] == ["flow"] * 2 + ["distill"] * 12
    longer = TrainConfig(**base, distill_steps=100, distill_lr=3e-3)  # the distillation gets its own warm-up
    assert lr_at(2, longer) == pytest.approx(3e-3 / 5)  # 1 of 5 warm-up steps

    from lft_core.data.activations import list_entries

    entry = [e for e in list_entries() if e["key"] == result_key("obj-after")][0]
    ids = torch.from_numpy(np.load(f"{entry['dir']}/tokens.npy").astype(np.int64))
    reference = tiny_neox.logits(ids)
    kl = {name: float(kl_per_token(reference, tiny_neox.logits(ids, Replace(load_flow(flows_dir() / name)[0], 3)))
                      .mean()) for name in ("obj-before", "obj-after")}
    assert kl["obj-after"] < 0.7 * kl["obj-before"], kl


def result_key(name: str) -> str:
    return json.loads((flows_dir() / name / "config.json").read_text())["data_key"]


def test_distillation_settings_are_checked(tiny_neox, tiny_neox_dir):
    base = dict(model=str(tiny_neox_dir), span=(1, 3), steps=2, batch=2, seq_len=16, windows=4)
    # the default recipe distils: its distillation batch (4) fits these 4 windows
    TrainConfig(**base).validate()
    for bad, match in (({"distill_steps": -1}, "distill steps"), ({"distill_lr": 0.0}, "distillation learning rate"),
                       ({"distill_steps": 1, "distill_batch": 5}, "distill batch"),
                       ({"distill_batch": 0}, "distill batch"), ({"waypoints": -1.0}, "waypoint weight")):
        with pytest.raises(LFTError, match=match):
            train_flow(TrainConfig(**base, **bad), teacher=tiny_neox, verbose=False)
    # without a distillation stage its batch is not checked against the windows
    TrainConfig(**base, distill_steps=0, distill_batch=5).validate()


def test_a_finished_flow_can_be_resumed_with_distillation_added(tiny_neox, tiny_neox_dir):
    base = dict(model=str(tiny_neox_dir), span=(1, 3), steps=2, batch=2, seq_len=16, windows=4, heldout_windows=1,
                eval_every=100, name="obj-resume")
    train_flow(TrainConfig(**base, distill_steps=0), teacher=tiny_neox, verbose=False)
    result = train_flow(TrainConfig(**base, distill_steps=3, distill_batch=2), teacher=tiny_neox, resume=True,
                        verbose=False)
    assert result.steps == 5
    from lft_core.flow.store import list_flows

    listed = next(f for f in list_flows() if f.name == "obj-resume")
    assert (listed.steps_done, listed.steps) == (5, 5)  # the listing counts the distillation steps too
    # once distilling, its settings are part of the run, and flow steps can no longer be added
    with pytest.raises(LFTError, match="distill_lr"):
        train_flow(TrainConfig(**base, distill_steps=3, distill_batch=2, distill_lr=1e-3), teacher=tiny_neox,
                   resume=True, verbose=False)
    with pytest.raises(LFTError, match="steps = 2"):
        train_flow(TrainConfig(**{**base, "steps": 4}, distill_steps=3, distill_batch=2), teacher=tiny_neox,
                   resume=True, verbose=False)
    # a distilled flow is trained further with more distillation steps (a shipped flow, copied: zoo.copy_flow)
    result = train_flow(TrainConfig(**base, distill_steps=5, distill_batch=2), teacher=tiny_neox, resume=True,
                        verbose=False)
    assert result.steps == 7


def test_train_says_its_total_steps_and_time_before_it_starts(tiny_neox, tiny_neox_dir, capsys, tmp_path):
    """`train --steps 2` with the default recipe's 200 distillation steps says so (and, once steps of that kind
    were timed here, how long it will take) before any work."""
    from cli_helpers import run_cli
    from lft_core.flow.training import training_estimate
    from lft_core.run import timings

    base = dict(model=str(tiny_neox_dir), span=(1, 3), steps=4, batch=2, seq_len=16, windows=4, heldout_windows=1,
                eval_every=100, distill_steps=4, distill_batch=2, seed=7)
    cfg = TrainConfig(**base, name="obj-estimate")
    for stage in ("flow", "distill"):  # a clean slate for these step kinds
        from lft_core.flow.training import step_timing_op

        op = step_timing_op(cfg, stage, "cpu")
        data = timings._read()
        data.pop(op, None)
        from lft_core.atomic import write_json

        write_json(timings._path(), data)
    assert training_estimate(cfg).seconds is None
    assert "8 steps in all (4 flow steps + 4 distillation steps), no time estimate yet" in training_estimate(cfg).line()
    train_flow(cfg, teacher=tiny_neox, verbose=False)
    est = training_estimate(cfg)
    assert est.flow_step_s > 0 and est.distill_step_s > 0
    assert est.seconds == pytest.approx(4 * est.flow_step_s + 4 * est.distill_step_s)
    stop = tmp_path / "stop"
    stop.write_text("")  # stopped before its first step: only what it says before starting matters here
    rc, err = run_cli(["train", "--model", tiny_neox_dir, "--span", "1:3", "--steps", "2", "--batch", "2",
                       "--seq-len", "16", "--windows", "4", "--heldout-windows", "1", "--distill-batch", "2",
                       "--name", "obj-estimate-cli", "--stop-file", stop], capsys)
    assert rc == 0, err
    first = err.splitlines()[0]
    assert first.startswith("training obj-estimate-cli: 202 steps in all (2 flow steps + 200 distillation steps), "
                            "about "), first
