"""The velocity field u_θ(x, t): one time-conditioned transformer block shaped like a teacher block.

The field is ONE pre-norm transformer block (causal self-attention with the teacher's kind of position
encoding, and an MLP) conditioned on t by adaptive norm (DiT's adaLN-Zero):

    (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m) = Modulation(TimeEmbedding(t))      each shape (B, d)
    a = Attention(Norm(x) · (1 + scale_a) + shift_a)
    h = x + gate_a · a
    m = MLP(Norm(h) · (1 + scale_m) + shift_m)          (Norm(x) instead of Norm(h) with parallel_residual)
    u_θ(x, t) = gate_a · a + gate_m · m                 = "block(x) − x", the velocity, not x + ...

The modulation's last layer is zero-initialised (so the gates are 0 and the field starts as the zero vector);
the norms have no learned affine because the modulation supplies scale and shift. ``FieldSpec`` says what the
block looks like (the teacher's surgery module fills it in for each model family); ``BlockWeights`` carries a
teacher block's weights to initialise the field from.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lft_core.errors import LFTError

# ---------------------------------------------------------------------------------------------------------
# Specification and teacher weights

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class FieldSpec:
    """The shape of a velocity field, mirroring one teacher block.

    mlp: "gated" (down(act(gate(x)) · up(x)), Llama/SwiGLU) or "plain" (down(act(up(x))), GPT-2/NeoX).
    act: "silu" | "gelu" | "gelu_new" (tanh approximation; also "gelu_pytorch_tanh", "gelu_fast", "relu").
    pos: "rope" | "none". rotary_dims: rotate only the first rotary_dims of each head (GPT-NeoX partial
    rotary, HF rotate_half convention); None means head_dim.
    norm: "rms" | "layer" (no learned affine). parallel_residual: the MLP reads Norm(x), not Norm(x + attn)
    (GPT-NeoX/Pythia). t_dim: width of the time embedding and its MLP.
    """

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    mlp: str = "gated"
    act: str = "silu"
    pos: str = "rope"
    rope_theta: float = 10000.0
    rotary_dims: int | None = None
    norm: str = "rms"
    norm_eps: float = 1e-5
    attn_bias: bool = False
    mlp_bias: bool = False
    t_dim: int = 128
    parallel_residual: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "t_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LFTError(f"FieldSpec.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise LFTError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.t_dim % 2:
            raise LFTError(f"t_dim must be even (sin and cos halves), got {self.t_dim}")
        choices = {"mlp": ("gated", "plain"), "act": tuple(_ACTIVATIONS), "pos": ("rope", "none"), "norm": ("rms", "layer")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LFTError(f"FieldSpec.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.pos == "rope":
            r = self.rotary
            if r < 2 or r % 2 or r > self.head_dim:
                raise LFTError(f"rotary_dims must be even and in [2, head_dim={self.head_dim}], got {r}")

    @property
    def rotary(self) -> int:
        """Number of rotated dimensions per head."""
        return self.head_dim if self.rotary_dims is None else self.rotary_dims

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FieldSpec:
        """Build from ``to_dict`` output; unknown keys are ignored, missing required keys raise LFTError."""
        known = {f.name for f in fields(cls)}
        required = {"d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff"}
        missing = sorted(required - set(data))
        if missing:
            raise LFTError(f"field spec is missing {', '.join(missing)}")
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class BlockWeights:
    """Canonical weights of one teacher block (Linear convention: shape (out, in)), to initialise a field.

    q: (n_heads·head_dim, d); k, v: (n_kv_heads·head_dim, d); o: (d, n_heads·head_dim);
    mlp_up, mlp_gate: (d_ff, d); mlp_down: (d, d_ff); biases shape (out,).
    attn_norm_* / mlp_norm_*: the teacher's norm affine (shape (d,)); if given they are folded into the
    modulation's bias (1 + scale = weight, shift = bias), so that with open gates the field is exactly
    block(x) − x.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    mlp_up: Tensor
    mlp_down: Tensor
    mlp_gate: Tensor | None = None
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    o_bias: Tensor | None = None
    mlp_up_bias: Tensor | None = None
    mlp_gate_bias: Tensor | None = None
    mlp_down_bias: Tensor | None = None
    attn_norm_weight: Tensor | None = None
    attn_norm_bias: Tensor | None = None
    mlp_norm_weight: Tensor | None = None
    mlp_norm_bias: Tensor | None = None


# ---------------------------------------------------------------------------------------------------------
# Pieces of the block


def time_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t ∈ [0, 1] (scaled by 1000 as in DiT's timestep range), shape (B,) -> (B, dim).

    emb = [cos(1000·t·f_j), sin(1000·t·f_j)], f_j = max_period^(−j/(dim/2)), j = 0 … dim/2 − 1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, theta: float, rotary_dims: int) -> Tensor:
    """Rotary position embedding over positions 0 … T−1 (HF rotate_half convention, partial rotary).

    x: shape (B, heads, T, head_dim); the first rotary_dims of each head are rotated, the rest pass through.
    inv_freq_j = theta^(−2j/rotary_dims); angle(p, j) = p · inv_freq_j.
    """
    T = x.shape[-2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dims, 2, device=x.device, dtype=torch.float32) / rotary_dims))
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv_freq[None]  # (T, r/2)
    emb = torch.cat([angles, angles], dim=-1)  # (T, r)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot, rest = x[..., :rotary_dims], x[..., rotary_dims:]
    rot = rot * cos + _rotate_half(rot) * sin
    return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot


def _norm(x: Tensor, kind: str, eps: float) -> Tensor:
    """RMS or layer norm over the last dimension without affine, in float32; x shape (B, T, d)."""
    x = x.float()
    if kind == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


# ---------------------------------------------------------------------------------------------------------
# The velocity field


class VelocityField(nn.Module):
    """u_θ(x, t): one time-conditioned transformer block returning a velocity.

    x: shape (batch, seq, d); t: shape (batch,) (a float or 0-d tensor is broadcast) -> shape (batch, seq, d).
    """

    def __init__(self, spec: FieldSpec):
        super().__init__()
        self.spec = spec
        s = spec
        d, qd, kvd = s.d_model, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        self.q_proj = nn.Linear(d, qd, bias=s.attn_bias)
        self.k_proj = nn.Linear(d, kvd, bias=s.attn_bias)
        self.v_proj = nn.Linear(d, kvd, bias=s.attn_bias)
        self.o_proj = nn.Linear(qd, d, bias=s.attn_bias)
        self.mlp_up = nn.Linear(d, s.d_ff, bias=s.mlp_bias)
        self.mlp_gate = nn.Linear(d, s.d_ff, bias=s.mlp_bias) if s.mlp == "gated" else None
        self.mlp_down = nn.Linear(s.d_ff, d, bias=s.mlp_bias)
        self.time_mlp = nn.Sequential(nn.Linear(s.t_dim, s.t_dim), nn.SiLU())
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(s.t_dim, 6 * d))
        self._act = _ACTIVATIONS[s.act]
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    # -- parts ----------------------------------------------------------------------------------------
    def modulate(self, t: Tensor) -> tuple[Tensor, ...]:
        """(shift_a, scale_a, gate_a, shift_m, scale_m, gate_m), each shape (B, 1, d), from t shape (B,)."""
        emb = self.time_mlp(time_embedding(t, self.spec.t_dim).to(self.modulation[1].weight.dtype))
        return tuple(c[:, None, :] for c in self.modulation(emb).chunk(6, dim=-1))

    def attention(self, x: Tensor) -> Tensor:
        """Causal multi-head self-attention (GQA, optional RoPE); x shape (B, T, d) -> (B, T, d)."""
        s = self.spec
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, s.n_heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        if s.pos == "rope":
            q, k = apply_rope(q, s.rope_theta, s.rotary), apply_rope(k, s.rope_theta, s.rotary)
        if s.n_kv_heads != s.n_heads:  # each kv head serves n_heads / n_kv_heads consecutive query heads
            rep = s.n_heads // s.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, s.n_heads * s.head_dim))

    def mlp(self, x: Tensor) -> Tensor:
        """Gated: down(act(gate(x)) · up(x)); plain: down(act(up(x))); x shape (B, T, d) -> (B, T, d)."""
        if self.mlp_gate is not None:
            return self.mlp_down(self._act(self.mlp_gate(x)) * self.mlp_up(x))
        return self.mlp_down(self._act(self.mlp_up(x)))

    # -- the field ------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        s = self.spec
        assert x.dim() == 3 and x.shape[-1] == s.d_model, f"x must have shape (batch, seq, {s.d_model}), got {tuple(x.shape)}"
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        assert t.shape == (x.shape[0],), f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}"
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulate(t)
        a = self.attention(_norm(x, s.norm, s.norm_eps) * (1 + scale_a) + shift_a)
        branch_a = gate_a * a
        mlp_in = x if s.parallel_residual else x + branch_a
        m = self.mlp(_norm(mlp_in, s.norm, s.norm_eps) * (1 + scale_m) + shift_m)
        return branch_a + gate_m * m

    # -- helpers --------------------------------------------------------------------------------------
    def n_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_from_block(self, w: BlockWeights, gates: float = 0.0) -> None:
        """Copy a teacher block's attention and MLP weights (shape-checked, LFTError on mismatch).

        The teacher's norm affine, when given, is folded into the modulation bias. ``gates`` sets the gate
        biases: 0 keeps adaLN-Zero (the field starts at zero); 1 makes the field exactly block(x) − x at every t.
        """
        s = self.spec

        def copy(name: str, target: nn.Parameter | None, source: Tensor | None, required: bool) -> None:
            if source is None:
                if required:
                    raise LFTError(f"teacher block has no {name}, but the field spec needs it")
                if target is not None:
                    target.zero_()
                return
            if target is None:
                raise LFTError(f"teacher block has {name}, but the field spec has no place for it (check mlp / bias flags)")
            if tuple(source.shape) != tuple(target.shape):
                raise LFTError(f"{name}: teacher weight has shape {tuple(source.shape)}, field expects {tuple(target.shape)}")
            target.copy_(source.to(dtype=target.dtype, device=target.device))

        bias = lambda layer: None if layer is None else layer.bias  # noqa: E731
        copy("q", self.q_proj.weight, w.q, True)
        copy("k", self.k_proj.weight, w.k, True)
        copy("v", self.v_proj.weight, w.v, True)
        copy("o", self.o_proj.weight, w.o, True)
        copy("q_bias", bias(self.q_proj), w.q_bias, False)
        copy("k_bias", bias(self.k_proj), w.k_bias, False)
        copy("v_bias", bias(self.v_proj), w.v_bias, False)
        copy("o_bias", bias(self.o_proj), w.o_bias, False)
        copy("mlp_up", self.mlp_up.weight, w.mlp_up, True)
        copy("mlp_gate", None if self.mlp_gate is None else self.mlp_gate.weight, w.mlp_gate, self.mlp_gate is not None)
        copy("mlp_down", self.mlp_down.weight, w.mlp_down, True)
        copy("mlp_up_bias", bias(self.mlp_up), w.mlp_up_bias, False)
        copy("mlp_gate_bias", bias(self.mlp_gate), w.mlp_gate_bias, False)
        copy("mlp_down_bias", bias(self.mlp_down), w.mlp_down_bias, False)

        d = s.d_model
        mod_bias = self.modulation[1].bias  # chunks: shift_a, scale_a, gate_a, shift_m, scale_m, gate_m
        mod_bias.zero_()
        for index, name, value, offset in (
            (0, "attn_norm_bias", w.attn_norm_bias, 0.0),
            (1, "attn_norm_weight", w.attn_norm_weight, 1.0),
            (3, "mlp_norm_bias", w.mlp_norm_bias, 0.0),
            (4, "mlp_norm_weight", w.mlp_norm_weight, 1.0),
        ):
            if value is not None:
                if tuple(value.shape) != (d,):
                    raise LFTError(f"{name}: teacher weight has shape {tuple(value.shape)}, field expects ({d},)")
                mod_bias[index * d : (index + 1) * d] = value.to(mod_bias) - offset
        mod_bias[2 * d : 3 * d] = gates
        mod_bias[5 * d : 6 * d] = gates
