"""Training methods of a latent flow, one class each, in one registry.

A method owns its name (``--method`` on the CLI, the flow's config, the default flow name), its label (menus,
legends), the settings of ``TrainConfig`` it reads (``k``, ``alpha``), the random times it draws for a batch
and its loss. Everything that offers or checks a method (the CLI's choices, the Train page, the demo, sweeps,
figures) reads ``METHODS``; an unknown name is one ``LFTError`` (``get_method``).

* ``StandardFlowMatching`` ("sfm"): loss mean ‖u(x_t, t) − (x1 − x0)‖², x_t on the straight path, t ~ U(0, 1).
* ``FlowWalking`` ("fw"): k Euler steps from x0 through sorted random times, loss mean ‖x̂_1 − x1‖².
* ``Hybrid`` ("hybrid"): FW + α·SFM on the same batch.

Adding a method is one subclass and one ``register`` call (``tests/test_registries.py`` does it with a toy).
The distillation stage that may follow any method is not a method: see ``training.DistillStage``.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lft_core.flow.losses import Noise, flow_walking_loss, sfm_loss, uniform, walk_times
from lft_core.flow.solvers import Velocity
from lft_core.registry import Registry


class Method:
    """A training objective for pairs (x0, x1), shape (batch, ...), under a velocity u(x, t).

    ``draw`` gives the random times of one (global) batch, drawn from ``generator`` in a fixed order so that a
    seed reproduces a run; ``loss`` is the scalar loss of the batch given those times (``weight`` broadcasts to
    x0, see ``training.loss_weight``)."""

    name: ClassVar[str]
    label: ClassVar[str]
    short: ClassVar[str]
    """A few letters for legends and flow labels ("FW")."""
    settings: ClassVar[tuple[str, ...]] = ()
    """The ``TrainConfig`` fields besides the shared ones that this method reads (the Train page shows them)."""
    symbol: ClassVar[str] = "circle"
    """The plotly marker of this method's points on figures."""

    def draw(self, batch: int, k: int, generator: torch.Generator | None, device: torch.device) -> Noise:
        raise NotImplementedError

    def loss(self, velocity: Velocity, x0: Tensor, x1: Tensor, noise: Noise, k: int = 3, alpha: float = 0.1,
             weight: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class StandardFlowMatching(Method):
    """Standard flow matching: t ~ U(0, 1) per sample, loss mean w·(u(x_t, t) − (x1 − x0))²."""

    name, label, short, symbol = "sfm", "Standard flow matching (SFM)", "SFM", "circle"

    def draw(self, batch, k, generator, device):
        return Noise(t=uniform((batch,), generator, device))

    def loss(self, velocity, x0, x1, noise, k=3, alpha=0.1, weight=None):
        return sfm_loss(velocity, x0, x1, t=noise.t, weight=weight)


class FlowWalking(Method):
    """Flow Walking: per sample sorted times 0 < t_1 < … < t_{k−1} < 1, k Euler steps from x0 (gradients through
    every step), loss mean w·(x̂_1 − x1)²."""

    name, label, short, symbol = "fw", "Flow Walking (FW)", "FW", "diamond"
    settings = ("k",)

    def draw(self, batch, k, generator, device):
        return Noise(walk=walk_times(batch, k, generator, device))

    def loss(self, velocity, x0, x1, noise, k=3, alpha=0.1, weight=None):
        return flow_walking_loss(velocity, x0, x1, k=k, weight=weight, times=noise.walk)


class Hybrid(Method):
    """Flow Walking + α·standard flow matching on the same batch (FW's times drawn first, then SFM's)."""

    name, label, short, symbol = "hybrid", "Hybrid (FW + α·SFM)", "FW+SFM", "square"
    settings = ("k", "alpha")

    def draw(self, batch, k, generator, device):
        return Noise(walk=walk_times(batch, k, generator, device), t=uniform((batch,), generator, device))

    def loss(self, velocity, x0, x1, noise, k=3, alpha=0.1, weight=None):
        return (flow_walking_loss(velocity, x0, x1, k=k, weight=weight, times=noise.walk)
                + alpha * sfm_loss(velocity, x0, x1, t=noise.t, weight=weight))


METHODS: Registry[Method] = Registry("training method")
"""Every training method by name, in menu order."""
register, unregister, get_method = METHODS.register, METHODS.unregister, METHODS.lookup


for _method in (StandardFlowMatching(), FlowWalking(), Hybrid()):
    register(_method)


def draw_noise(method: str, batch: int, k: int = 3, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", path: bool = False) -> Noise:
    """The times ``method`` needs for ``batch`` samples (``Method.draw``), then, with ``path``, the times of the
    teacher-path term, all from ``generator`` in that fixed order."""
    device = torch.device(device)
    noise = get_method(method).draw(batch, k, generator, device)
    return noise if not path else Noise(noise.walk, noise.t, uniform((batch,), generator, device))


def compute_loss(method: str, velocity: Velocity, x0: Tensor, x1: Tensor, k: int = 3, alpha: float = 0.1,
                 generator: torch.Generator | None = None, weight: Tensor | None = None,
                 noise: Noise | None = None) -> Tensor:
    """The loss of the method called ``method`` on one batch (x0, x1 shape (batch, ...)); the random times are
    ``noise`` when given, else drawn from ``generator``."""
    noise = noise or draw_noise(method, x0.shape[0], k, generator, x0.device)
    return get_method(method).loss(velocity, x0, x1, noise, k=k, alpha=alpha, weight=weight)
