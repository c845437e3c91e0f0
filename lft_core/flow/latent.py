"""The latent flow: a span [m, n) of teacher blocks replaced by integrating a velocity field from h_m to h_n.

The LFT replaces blocks m … n−1 by integrating a learned velocity field (``field.VelocityField``) from t = 0
(x0 = h_m) to t = 1 (x̂_1 ≈ h_n) in k steps (see ``solvers``). ``LatentFlow`` wraps the field with
per-dimension normalisation stats (mu, sigma) and the ``Span`` it replaces:
x0 = (h_m − mu) / sigma, integrate, h_n ≈ x̂_1 · sigma + mu. Saving and loading live in ``store``.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from lft_core.errors import LFTError
from lft_core.flow.field import FieldSpec, VelocityField
from lft_core.flow.solvers import Trajectory, integrate
from lft_core.span import Span


class Replacement(Protocol):
    """What can stand in for a span of teacher blocks: it knows its ``span`` and maps h_m to h_n.

    ``replacement(h_m, k=k)``: h_m shape (batch, seq, d) -> h_n estimate, same shape. ``LatentFlow`` is one;
    test stand-ins and closed-form baselines are others.
    """

    span: Span

    def __call__(self, h_m: Tensor, k: int = 1) -> Tensor: ...

MAX_K = 64  # most integration steps training, evaluation and the toy lab allow
MAX_STEPS = 256  # most integration steps a LatentFlow takes (room above MAX_K for fine trajectory paths)


# ---------------------------------------------------------------------------------------------------------
# The latent flow: normalisation + field + solver


def floor_sigma(sigma: Tensor, floor: float = 1e-3) -> Tensor:
    """sigma_j floored at floor · median(sigma) (and at 1e-8), shape (d,)."""
    sigma = sigma.float()
    lowest = max(float(sigma.median()) * floor, 1e-8)
    return sigma.clamp(min=lowest)


class LatentFlow(nn.Module):
    """A span [m, n) of teacher blocks replaced by a flow: h_n ≈ Φ_k(h_m).

    forward: x0 = (h_m − mu) / sigma, x̂_1 = k solver steps of the field, h_n ≈ x̂_1 · sigma + mu.
    h_m: shape (batch, seq, d). mu, sigma: buffers, shape (d,), float32 (identity by default).
    """

    def __init__(self, field: VelocityField | FieldSpec, span: Span | tuple[int, int] = Span(0, 1)):
        super().__init__()
        self.field = field if isinstance(field, VelocityField) else VelocityField(field)
        self.span = Span.of(span).check()
        d = self.field.spec.d_model
        self.register_buffer("mu", torch.zeros(d))
        self.register_buffer("sigma", torch.ones(d))

    @property
    def spec(self) -> FieldSpec:
        return self.field.spec

    def set_normalisation(self, mu: Tensor, sigma: Tensor, floor: float = 1e-3) -> None:
        """Per-dimension statistics, shape (d,), applied to both ends of the span.

        Per-dimension standardisation matters because residual streams (SmolLM2's especially) have a few
        dimensions tens to hundreds of times larger than the median: unnormalised, they would dominate the
        squared-error losses. sigma is floored at floor · median(sigma) so that a near-constant dimension is
        not blown up into noise.
        """
        d = self.spec.d_model
        assert tuple(mu.shape) == (d,) and tuple(sigma.shape) == (d,), f"mu and sigma must have shape ({d},)"
        if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()) or (sigma < 0).any():
            raise LFTError("normalisation stats must be finite, with sigma >= 0")
        self.mu.copy_(mu.detach().float())
        self.sigma.copy_(floor_sigma(sigma.detach(), floor))

    def normalise(self, h: Tensor) -> Tensor:
        """(h − mu) / sigma in float32; h shape (..., d)."""
        return (h.float() - self.mu) / self.sigma

    def denormalise(self, x: Tensor) -> Tensor:
        """x · sigma + mu in float32; x shape (..., d)."""
        return x.float() * self.sigma + self.mu

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """u_θ(x, t) in normalised space; x shape (batch, seq, d), t shape (batch,). Used by the losses."""
        return self.field(x, t)

    def forward(
        self, h_m: Tensor, k: int = 1, method: str = "euler", return_path: bool = False
    ) -> Tensor | Trajectory:
        """h_n estimate, shape (batch, seq, d) in h_m's dtype; or a Trajectory of denormalised states
        (shape (k+1, batch, seq, d)) with return_path."""
        assert h_m.dim() == 3 and h_m.shape[-1] == self.spec.d_model, (
            f"h_m must have shape (batch, seq, {self.spec.d_model}), got {tuple(h_m.shape)}"
        )
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_STEPS:
            raise LFTError(f"the number of integration steps k must be an integer in 1..{MAX_STEPS}, got {k!r}")
        out = integrate(self.velocity, self.normalise(h_m), k, method=method, return_path=return_path)
        if isinstance(out, Trajectory):
            return Trajectory(states=self.denormalise(out.states).to(h_m.dtype), times=out.times)
        return self.denormalise(out).to(h_m.dtype)

    def n_params(self) -> int:
        return self.field.n_params()


def replace_on_its_device(replacement: Replacement, h_m: Tensor, k: int) -> Tensor:
    """``replacement(h_m, k=k)`` computed where the replacement's weights are and returned on h_m's device and
    in its dtype (a teacher spread over devices hands h_m over on whichever device block m sits on)."""
    home = None
    if isinstance(replacement, nn.Module):
        home = next((t.device for t in [*replacement.parameters(), *replacement.buffers()]), None)
    out = replacement(h_m if home is None else h_m.to(home), k=k)
    return out.to(h_m.device, h_m.dtype)


def check_replaces(flow: Replacement, span: Span | tuple[int, int], label: str = "the flow") -> None:
    """LFTError unless ``flow`` (anything with a ``span``) replaces exactly ``span``; ``label`` names it."""
    if tuple(flow.span) != tuple(span):
        raise LFTError(f"{label} replaces {Span.of(flow.span)}, not {Span.of(span)}")
