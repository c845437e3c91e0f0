"""Training losses of a Latent Flow Transformer, generic over any velocity ``u(x, t)``.

x0, x1: paired states, shape (batch, ...) (a token's h_m and h_n, or a 2-D toy point and its partner).

* Standard flow matching (SFM): straight path x_t = (1−t)·x0 + t·x1 with t ~ U(0, 1) per sample,
  loss = mean ‖u(x_t, t) − (x1 − x0)‖².
* Flow Walking (FW): per sample sorted random times 0 < t_1 < … < t_{k−1} < 1, Euler-integrate x0 through
  [0, t_1, …, t_{k−1}, 1] with u (gradients through every step), loss = mean ‖x̂_1 − x1‖².
* (Hybrid, FW + α·SFM, and every other training method are classes of ``methods``, built from these.)
* Teacher path (``path_loss``, an extra term of any method): flow matching along the piecewise-linear path
  through the teacher's intermediate states h_{m+1} … h_{n−1} (waypoints at t_l = (l − m)/(n − m)).

All losses are means over every element (batch, seq and feature), computed in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

from lft_core.errors import LFTError
from lft_core.flow.solvers import Velocity, integrate


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U(0, 1) samples of ``shape`` on ``device``, drawn from ``generator`` (which may live on another device)."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _check_pair(x0: Tensor, x1: Tensor) -> None:
    assert x0.shape == x1.shape, f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}"
    assert x0.dim() >= 1 and x0.shape[0] > 0, f"x0 must have a non-empty batch dimension, got {tuple(x0.shape)}"


def straight_path(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 − t)·x0 + t·x1; x0, x1 shape (batch, ...), t shape (batch,) -> shape (batch, ...)."""
    assert t.shape == (x0.shape[0],), f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}"
    tb = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tb) * x0 + tb * x1


def _weighted_mean(sq: Tensor, weight: Tensor | None) -> Tensor:
    """mean(weight · sq); ``weight`` broadcasts to sq's shape (e.g. (batch, seq, 1) per token, (d,) per dim)."""
    return sq.mean() if weight is None else (sq * weight.to(sq.dtype)).mean()


def sfm_loss(
    velocity: Velocity, x0: Tensor, x1: Tensor, t: Tensor | None = None, generator: torch.Generator | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """Standard flow matching: mean w·(u(x_t, t) − (x1 − x0))² with x_t on the straight path.

    x0, x1: shape (batch, ...); t: optional times, shape (batch,), default U(0, 1) per sample;
    weight: optional, broadcastable to x0 (default 1).
    """
    _check_pair(x0, x1)
    if t is None:
        t = uniform((x0.shape[0],), generator, x0.device)
    t = t.to(device=x0.device, dtype=torch.float32)
    x_t = straight_path(x0, x1, t)
    target = (x1 - x0).float()
    return _weighted_mean((velocity(x_t, t).float() - target).pow(2), weight)


def walk_times(batch: int, k: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Flow Walking's per-sample time grids: 0, sorted U(0,1) inner times t_1 < … < t_{k−1}, 1.

    Returns shape (k+1, batch), float32.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LFTError(f"Flow Walking needs k >= 1 steps, got {k!r}")
    inner = uniform((k - 1, batch), generator, torch.device(device)).sort(dim=0).values
    zeros = torch.zeros(1, batch, device=device)
    return torch.cat([zeros, inner, zeros + 1.0], dim=0)


def flow_walking_loss(
    velocity: Velocity, x0: Tensor, x1: Tensor, k: int = 3, generator: torch.Generator | None = None,
    weight: Tensor | None = None, times: Tensor | None = None,
) -> Tensor:
    """Flow Walking: mean w·(x̂_1 − x1)², x̂_1 = k Euler steps from x0 through random sorted times.

    x0, x1: shape (batch, ...); weight: optional, broadcastable to x0; times: optional time grids, shape
    (k+1, batch) (default: ``walk_times`` from ``generator``). Gradients reach u through every step.
    """
    _check_pair(x0, x1)
    if times is None:
        times = walk_times(x0.shape[0], k, generator, x0.device)
    x_hat = integrate(velocity, x0, k, method="euler", times=times.to(x0.device))
    return _weighted_mean((x_hat.float() - x1.float()).pow(2), weight)


def path_loss(
    velocity: Velocity, path: Tensor, t: Tensor | None = None, generator: torch.Generator | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """Flow matching along the teacher's own path: mean w·(u(x_t, t) − v_t)² on the piecewise-linear path
    through the waypoints.

    path: shape (P+1, batch, ...), the states at times 0, 1/P, …, 1 (for a span [m, n): h_m, h_{m+1}, …, h_n,
    so P = n − m and t_l = (l − m)/(n − m)). Per sample t ~ U(0, 1) (or ``t``, shape (batch,)); in segment
    l = ⌊tP⌋ the state is x_t = path[l] + (tP − l)·(path[l+1] − path[l]) and the target velocity is
    P·(path[l+1] − path[l]). With P = 1 this is SFM. Each token gives P targets instead of one.
    """
    assert path.dim() >= 2 and path.shape[0] >= 2, f"path must have shape (P+1, batch, ...), got {tuple(path.shape)}"
    pieces, batch = path.shape[0] - 1, path.shape[1]
    if t is None:
        t = uniform((batch,), generator, path.device)
    t = t.to(device=path.device, dtype=torch.float32)
    seg = (t * pieces).floor().clamp(max=pieces - 1).long()
    frac = (t * pieces - seg).view(-1, *([1] * (path.dim() - 2)))
    rows = torch.arange(batch, device=path.device)
    start, end = path[seg, rows], path[seg + 1, rows]
    x_t = start + frac.to(path.dtype) * (end - start)
    target = ((end - start) * pieces).float()
    return _weighted_mean((velocity(x_t, t).float() - target).pow(2), weight)


@dataclass(frozen=True)
class Noise:
    """The random times of one batch: ``walk`` (k+1, batch) for Flow Walking, ``t`` (batch,) for SFM (None
    where the method draws none). Drawn for a whole (global) batch and then cut by ``rows``, so that a
    data-parallel rank uses exactly the times a single process would give the same samples."""

    walk: Tensor | None = None
    t: Tensor | None = None
    path: Tensor | None = None

    def rows(self, index: slice | Tensor) -> Noise:
        """The times of the samples ``index`` of the batch (a slice or an index tensor)."""
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        return Noise(None if self.walk is None else self.walk[:, index], pick(self.t), pick(self.path))
