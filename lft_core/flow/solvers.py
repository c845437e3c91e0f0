"""Solvers: how a velocity field u(x, t) is integrated from t = 0 to t = 1.

A *velocity* is any callable ``velocity(x, t) -> v`` with x of shape (batch, ...), t of shape (batch,) and v of
the same shape as x. The same solvers serve the 2-D toy (x shape (batch, 2)) and the transformer flow
(x shape (batch, seq, d)); gradients flow through every step, which is what Flow Walking needs.

* Euler:    x_{i+1} = x_i + Δt_i · u(x_i, t_i)                                   (1 evaluation per step)
* Midpoint: x_{i+1} = x_i + Δt_i · u(x_i + Δt_i/2 · u(x_i, t_i), t_i + Δt_i/2)   (2 evaluations per step)

with Δt_i = t_{i+1} − t_i on a time grid 0 = t_0 < t_1 < … < t_k = 1 (uniform unless given).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lft_core.errors import LFTError

Velocity = Callable[[Tensor, Tensor], Tensor]
"""u(x, t): x shape (batch, ...), t shape (batch,) -> velocity, shape like x."""

SOLVERS: tuple[str, ...] = ("euler", "midpoint")
EVALUATIONS_PER_STEP = {"euler": 1, "midpoint": 2}


@dataclass
class Trajectory:
    """The states an integration visits.

    states: shape (k+1, batch, ...): states[0] = x0, states[-1] = x̂_1.
    times:  shape (k+1,) (one grid for all samples) or (k+1, batch) (a grid per sample).
    """

    states: Tensor
    times: Tensor

    @property
    def end(self) -> Tensor:
        """x̂_1, shape (batch, ...)."""
        return self.states[-1]

    @property
    def k(self) -> int:
        """Number of steps."""
        return self.states.shape[0] - 1


def uniform_times(k: int, device: torch.device | str | None = None) -> Tensor:
    """The uniform grid 0, 1/k, …, 1, shape (k+1,), float32."""
    return torch.linspace(0.0, 1.0, k + 1, device=device, dtype=torch.float32)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LFTError(f"the number of integration steps k must be an integer >= 1, got {k!r}")
    return k


def _broadcast(t: Tensor, x: Tensor) -> Tensor:
    """Time of shape (batch,) reshaped to (batch, 1, …, 1) so it multiplies x of shape (batch, ...)."""
    return t.view(t.shape[0], *([1] * (x.dim() - 1)))


def integrate(
    velocity: Velocity,
    x0: Tensor,
    k: int,
    method: str = "euler",
    times: Tensor | None = None,
    return_path: bool = False,
) -> Tensor | Trajectory:
    """Integrate dx/dt = u(x, t) from x0 at t = 0 to t = 1 in k steps.

    velocity: u(x, t), x shape (batch, ...), t shape (batch,).
    x0: start states, shape (batch, ...).
    k: number of steps (>= 1); Euler costs k evaluations of u, midpoint 2k.
    method: "euler" or "midpoint".
    times: optional grid, shape (k+1,) or per sample (k+1, batch), non-decreasing; default uniform 0..1.
    return_path: return a ``Trajectory`` of all k+1 states instead of only the end point x̂_1.

    Gradients flow through every step (nothing is detached).
    """
    k = _check_k(k)
    if method not in SOLVERS:
        raise LFTError(f"unknown solver {method!r}; choose one of {', '.join(SOLVERS)}")
    assert x0.dim() >= 1, f"x0 must have a batch dimension, got shape {tuple(x0.shape)}"
    batch = x0.shape[0]
    if times is None:
        times = uniform_times(k, device=x0.device)
    else:
        times = times.to(device=x0.device, dtype=torch.float32)
        if times.dim() not in (1, 2) or times.shape[0] != k + 1 or (times.dim() == 2 and times.shape[1] != batch):
            raise LFTError(
                f"times must have shape ({k + 1},) or ({k + 1}, {batch}) for k={k} steps, got {tuple(times.shape)}"
            )
    grid = times if times.dim() == 2 else times[:, None].expand(k + 1, batch)  # shape (k+1, batch)

    x = x0
    states = [x0] if return_path else None
    for i in range(k):
        t = grid[i]
        dt = _broadcast(grid[i + 1] - t, x)
        if method == "euler":
            x = x + dt * velocity(x, t)
        else:
            half = grid[i + 1] - t
            x_mid = x + 0.5 * dt * velocity(x, t)
            x = x + dt * velocity(x_mid, t + 0.5 * half)
        if states is not None:
            states.append(x)
    if states is not None:
        return Trajectory(states=torch.stack([s.to(x.dtype) for s in states]), times=times)
    return x
