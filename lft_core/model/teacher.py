"""The teacher and all model surgery: uniform access to a causal LM's blocks, hidden states and logits.

Every fact about a model family's attribute names (where the block list, the final norm and the LM head live,
how a block's weights are laid out, what a velocity field mirroring one block looks like) is in this file, in
one table, ``FAMILIES``, dispatched by ``config.model_type``; an unknown family raises
``UnsupportedFamily`` naming it. Other modules only see:

* ``Teacher.hidden_states(ids, layers)`` -> h_i, the residual stream *entering* block i (h_L is the last
  block's output, before the final norm), captured with forward hooks;
* ``Teacher.logits(ids, Replace(flow, k))`` / ``Teacher.logits(ids, Skip(start, k))``: next-token logits with
  the flow's span replaced (the span is read from the flow) or k blocks removed;
* ``Teacher.replaced_span`` / ``Teacher.skipped_blocks``: context managers under which the calling thread's
  forward passes run a transport instead of some blocks (per thread: one shared Teacher serves many
  sessions at once, see ``Teacher``);
* ``Teacher.field_spec()`` / ``Teacher.block_weights(i)``: what a velocity field needs to look like (and be
  initialised from) one block of this teacher.

Loading a teacher from a model spec is ``loading.load_teacher``.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from torch import nn

from lft_core.errors import LFTError
from lft_core.flow.field import BlockWeights, FieldSpec
from lft_core.flow.latent import Replacement, replace_on_its_device
from lft_core.span import Span


class TeacherLoadError(LFTError):
    """The model spec cannot be loaded (absent offline, not a model folder, unsupported family...)."""


class UnsupportedFamily(TeacherLoadError, NotImplementedError):
    """A model type with no entry in ``FAMILIES``."""


# ---------------------------------------------------------------------------------------------------------
# The family table: where things live in each supported model class


def _g(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().float()


def _llama_field(c: Any, d: int, t_dim: int) -> FieldSpec:
    heads = c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    return FieldSpec(
        d_model=d, n_heads=heads, n_kv_heads=getattr(c, "num_key_value_heads", heads) or heads,
        head_dim=getattr(c, "head_dim", None) or d // heads, d_ff=c.intermediate_size, mlp="gated",
        act=c.hidden_act, pos="rope", rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        rotary_dims=None, norm="rms", norm_eps=float(c.rms_norm_eps),
        attn_bias=bool(getattr(c, "attention_bias", False)), mlp_bias=bool(getattr(c, "mlp_bias", False)),
        t_dim=t_dim,
    )


def _llama_weights(b: nn.Module, c: Any, d: int) -> BlockWeights:
    a, f = b.self_attn, b.mlp
    return BlockWeights(
        q=_g(a.q_proj.weight), k=_g(a.k_proj.weight), v=_g(a.v_proj.weight), o=_g(a.o_proj.weight),
        q_bias=_g(a.q_proj.bias), k_bias=_g(a.k_proj.bias), v_bias=_g(a.v_proj.bias), o_bias=_g(a.o_proj.bias),
        mlp_up=_g(f.up_proj.weight), mlp_gate=_g(f.gate_proj.weight), mlp_down=_g(f.down_proj.weight),
        mlp_up_bias=_g(f.up_proj.bias), mlp_down_bias=_g(f.down_proj.bias),
        attn_norm_weight=_g(b.input_layernorm.weight), mlp_norm_weight=_g(b.post_attention_layernorm.weight),
    )


def _neox_field(c: Any, d: int, t_dim: int) -> FieldSpec:
    heads = c.num_attention_heads
    head_dim = d // heads
    rope = getattr(c, "rope_parameters", None) or {}
    factor = float(rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0)))
    return FieldSpec(
        d_model=d, n_heads=heads, n_kv_heads=heads, head_dim=head_dim, d_ff=c.intermediate_size,
        mlp="plain", act=c.hidden_act, pos="rope",
        rope_theta=float(rope.get("rope_theta", getattr(c, "rotary_emb_base", 10000.0))),
        rotary_dims=int(head_dim * factor), norm="layer", norm_eps=float(c.layer_norm_eps),
        attn_bias=bool(getattr(c, "attention_bias", True)), mlp_bias=True, t_dim=t_dim,
        parallel_residual=bool(getattr(c, "use_parallel_residual", True)),
    )


def _neox_weights(b: nn.Module, c: Any, d: int) -> BlockWeights:
    a, f = b.attention, b.mlp
    heads = c.num_attention_heads
    hd = d // heads
    w = a.query_key_value.weight.detach().float().view(heads, 3, hd, d)  # fused, interleaved per head
    bias = a.query_key_value.bias
    bv = bias.detach().float().view(heads, 3, hd) if bias is not None else None
    part = lambda j: w[:, j].reshape(heads * hd, d).clone()  # noqa: E731
    pb = lambda j: None if bv is None else bv[:, j].reshape(-1).clone()  # noqa: E731
    return BlockWeights(
        q=part(0), k=part(1), v=part(2), o=_g(a.dense.weight), q_bias=pb(0), k_bias=pb(1), v_bias=pb(2),
        o_bias=_g(a.dense.bias), mlp_up=_g(f.dense_h_to_4h.weight), mlp_gate=None,
        mlp_down=_g(f.dense_4h_to_h.weight), mlp_up_bias=_g(f.dense_h_to_4h.bias),
        mlp_down_bias=_g(f.dense_4h_to_h.bias),
        attn_norm_weight=_g(b.input_layernorm.weight), attn_norm_bias=_g(b.input_layernorm.bias),
        mlp_norm_weight=_g(b.post_attention_layernorm.weight), mlp_norm_bias=_g(b.post_attention_layernorm.bias),
    )


def _gpt2_field(c: Any, d: int, t_dim: int) -> FieldSpec:
    heads = c.n_head
    return FieldSpec(
        d_model=d, n_heads=heads, n_kv_heads=heads, head_dim=d // heads, d_ff=c.n_inner or 4 * d,
        mlp="plain", act=c.activation_function, pos="none", rotary_dims=None, norm="layer",
        norm_eps=float(c.layer_norm_epsilon), attn_bias=True, mlp_bias=True, t_dim=t_dim,
    )


def _gpt2_weights(b: nn.Module, c: Any, d: int) -> BlockWeights:
    a, f = b.attn, b.mlp  # Conv1D stores (in, out)
    qkv = a.c_attn.weight.detach().float().t()  # (3d, d)
    qkv_b = a.c_attn.bias.detach().float()
    return BlockWeights(
        q=qkv[:d].clone(), k=qkv[d : 2 * d].clone(), v=qkv[2 * d :].clone(), o=_g(a.c_proj.weight.t()),
        q_bias=qkv_b[:d].clone(), k_bias=qkv_b[d : 2 * d].clone(), v_bias=qkv_b[2 * d :].clone(),
        o_bias=_g(a.c_proj.bias), mlp_up=_g(f.c_fc.weight.t()), mlp_gate=None, mlp_down=_g(f.c_proj.weight.t()),
        mlp_up_bias=_g(f.c_fc.bias), mlp_down_bias=_g(f.c_proj.bias),
        attn_norm_weight=_g(b.ln_1.weight), attn_norm_bias=_g(b.ln_1.bias),
        mlp_norm_weight=_g(b.ln_2.weight), mlp_norm_bias=_g(b.ln_2.bias),
    )


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its parts, and how one of its blocks maps onto a velocity field."""

    name: str
    model_types: tuple[str, ...]
    blocks: Callable[[nn.Module], nn.ModuleList]
    final_norm: Callable[[nn.Module], nn.Module]
    lm_head: Callable[[nn.Module], nn.Module]
    field_spec: Callable[[Any, int, int], FieldSpec]  # (config, d_model, t_dim) -> FieldSpec
    block_weights: Callable[[nn.Module, Any, int], BlockWeights]  # (block, config, d_model) -> weights


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), lambda m: m.model.layers, lambda m: m.model.norm,
           lambda m: m.lm_head, _llama_field, _llama_weights),
    Family("gpt_neox", ("gpt_neox",), lambda m: m.gpt_neox.layers, lambda m: m.gpt_neox.final_layer_norm,
           lambda m: m.get_output_embeddings(), _neox_field, _neox_weights),
    Family("gpt2", ("gpt2",), lambda m: m.transformer.h, lambda m: m.transformer.ln_f, lambda m: m.lm_head,
           _gpt2_field, _gpt2_weights),
)


def family_of(model: nn.Module) -> Family:
    """The family entry of a Hugging Face causal LM; UnsupportedFamily naming its type when there is none."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    for family in FAMILIES:
        if kind in family.model_types:
            return family
    supported = sorted(t for family in FAMILIES for t in family.model_types)
    raise UnsupportedFamily(f"model type '{kind}' is not supported yet (supported: {supported})")


# ---------------------------------------------------------------------------------------------------------
# What a forward pass is asked to change


@dataclass(frozen=True)
class Replace:
    """Run ``flow(h_m, k=k)`` instead of the blocks of ``flow.span`` (an LFT, or any ``Replacement``)."""

    flow: Replacement
    k: int = 1

    @property
    def span(self) -> Span:
        return Span.of(self.flow.span)


@dataclass(frozen=True)
class Skip:
    """Remove blocks start … start + k − 1 (plain layer skipping)."""

    start: int
    k: int

    @property
    def span(self) -> Span:
        return Span(self.start, self.start + self.k)


Surgery = Union[Replace, Skip]


class _StopForward(Exception):
    """Raised once every requested hidden state is captured (skips the rest of the network)."""


@dataclass
class _Plan:
    """What this thread's forward passes do differently, by block index (see ``Teacher``'s class docstring).

    overrides: block i -> fn(h) returning the block's output hidden states (the block itself is not run);
    capture: the layers whose hidden states to record into ``captured`` (None: capture nothing);
    last: after recording this layer the forward stops.
    """

    overrides: dict[int, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    capture: frozenset[int] | None = None
    last: int = -1
    captured: dict[int, torch.Tensor] = field(default_factory=dict)


_PLAN: ContextVar[_Plan | None] = ContextVar("lft_teacher_plan", default=None)
"""The current thread's (context's) plan. Every Streamlit session, job thread and test thread has its own
context, so one thread's surgery is never seen by a forward pass of another."""


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------------------


class Teacher:
    """A loaded causal LM: ``n_layers`` blocks (L), ``d_model``, tokenizer, hidden states and logits.

    Hidden state indices follow the design: h_0 = embeddings (entering block 0), h_i enters block i,
    h_L = output of block L-1 before the final norm.

    Safe to share between threads (one Teacher serves every session of the app): the model is never changed
    after loading. Each block's ``forward`` is wrapped once, here, by a dispatcher that reads the calling
    thread's plan (a ``ContextVar``): span replacement, skipping and hidden-state capture set a plan for the
    duration of a ``with`` block in the calling thread only, so a forward pass in another thread at the same
    time runs the plain model, and nothing waits for a lock.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, spec: str, model_id: str, weights_hash: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.model_id = model_id
        self.weights_hash = weights_hash
        self.family_entry = family_of(model)
        self.family = self.family_entry.name
        self._blocks = self.family_entry.blocks(model)
        self.n_layers = len(self._blocks)
        self.d_model = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd)
        self.max_positions = int(
            getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
        )
        self.vocab_size = int(model.config.vocab_size)
        self._tuple_output = self._probe_tuple_output()
        for i, block in enumerate(self._blocks):
            self._install_dispatch(i, block)

    def _install_dispatch(self, i: int, block: nn.Module) -> None:
        """Route block i's forward through the calling thread's plan (the module tree is left as it is)."""
        original = block.forward
        tuple_output = self._tuple_output
        n_layers = self.n_layers

        def forward(*args, **kwargs):
            plan = _PLAN.get()
            if plan is None:
                return original(*args, **kwargs)
            if plan.capture is not None and i in plan.capture:
                plan.captured[i] = _block_input(args, kwargs).float()
                if i == plan.last:
                    raise _StopForward
            fn = plan.overrides.get(i)
            if fn is not None:
                out = fn(_block_input(args, kwargs))
                return (out,) if tuple_output else out
            out = original(*args, **kwargs)
            if i == n_layers - 1 and plan.capture is not None and n_layers in plan.capture:
                plan.captured[n_layers] = _block_output(out).float()
                raise _StopForward
            return out

        block.forward = forward

    @contextmanager
    def _planned(self, **changes) -> Iterator[_Plan]:
        """Within the block, this thread's forward passes follow a plan: the current one (if any) with
        ``changes`` (``overrides`` are added to the current ones)."""
        current = _PLAN.get()
        overrides = {**(current.overrides if current else {}), **changes.pop("overrides", {})}
        plan = _Plan(overrides=overrides, **changes)
        token = _PLAN.set(plan)
        try:
            yield plan
        finally:
            _PLAN.reset(token)

    # -- basic facts ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where token ids go in: the input embedding's device (on a model spread by a device map, the
        first device; Accelerate's hooks move each block's inputs to its own device)."""
        device = self.model.get_input_embeddings().weight.device
        return torch.device("cpu") if device.type == "meta" else device

    @property
    def dispatched(self) -> bool:
        """True when the model is spread over devices by a device map (``load_teacher(device_map=...)``)."""
        return bool(getattr(self.model, "hf_device_map", None))

    def __repr__(self) -> str:
        return f"Teacher({self.model_id!r}, family={self.family}, L={self.n_layers}, d={self.d_model})"

    def _probe_tuple_output(self) -> bool:
        seen: list[bool] = []

        def hook(_m, _a, out):
            seen.append(isinstance(out, (tuple, list)))
            raise _StopForward

        handle = self._blocks[0].register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.model(torch.zeros(1, 2, dtype=torch.long, device=self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return bool(seen and seen[0])

    def check_span(self, m: int, n: int) -> Span:
        """Span(m, n) if 0 <= m < n <= L, else LFTError."""
        return Span.of((m, n)).check(self.n_layers, where=f" for {self.model_id}")

    def span_params(self, m: int, n: int) -> int:
        """Number of parameters of teacher blocks m..n-1."""
        self.check_span(m, n)
        return sum(p.numel() for i in range(m, n) for p in self._blocks[i].parameters())

    def encode(self, text: str, max_tokens: int | None = None) -> torch.Tensor:
        """Token ids of ``text`` (no special tokens), shape (1, T); LFTError when empty."""
        if max_tokens is not None:
            # tokenize only a prefix that surely holds max_tokens tokens (a 50 MB text is not read whole)
            chars = 16 * max_tokens + 1024
            while True:
                ids = self.tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
                if len(ids) > max_tokens or chars >= len(text):
                    break
                chars *= 4
            ids = ids[:max_tokens]
        else:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            raise LFTError("the text is empty or too short: give at least two tokens")
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def decode_tokens(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """Each token id of a 1-D sequence decoded on its own (what pages show per token)."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    # -- hidden states ----------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden_states(self, ids: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """h_i for every i in ``layers`` (0..L), each shape (batch, seq, d), float32, from one forward pass.

        Blocks after the deepest requested layer are not run.
        """
        wanted = sorted(set(int(i) for i in layers))
        if not wanted:
            return {}
        if wanted[0] < 0 or wanted[-1] > self.n_layers:
            raise LFTError(f"layers must lie in 0..{self.n_layers}, got {wanted}")
        with self._planned(capture=frozenset(wanted), last=wanted[-1]) as plan:
            try:
                self.model(ids.to(self.device), use_cache=False)
            except _StopForward:
                pass
        missing = [i for i in wanted if i not in plan.captured]
        assert not missing, f"the forward pass did not reach layers {missing}"
        return {i: plan.captured[i] for i in wanted}

    # -- surgery ----------------------------------------------------------------------------------------
    @contextmanager
    def replaced_span(self, span: Span | tuple[int, int],
                      transport: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block, this thread's forward passes do not run blocks m..n-1: block m gives
        ``transport(h_m) -> h_n`` (shape (batch, seq, d)), blocks m+1..n-1 pass their input on. Other threads
        are not affected, and the model itself is not changed."""
        m, n = self.check_span(*span)
        overrides = {m: transport, **{i: (lambda h: h) for i in range(m + 1, n)}}
        with self._planned(overrides=overrides):
            yield

    @contextmanager
    def skipped_blocks(self, start: int, k: int) -> Iterator[None]:
        """Within the block, blocks start..start+k-1 are identities (plain layer skipping); k = 0 is a no-op."""
        if k < 0 or start < 0 or start + k > self.n_layers:
            raise LFTError(f"cannot skip {k} blocks from {start}: the model has {self.n_layers} blocks")
        if k == 0:
            yield
            return
        with self.replaced_span((start, start + k), lambda h: h):
            yield

    @contextmanager
    def applied(self, surgery: Surgery | None) -> Iterator[None]:
        """Within the block the model runs with ``surgery`` (a ``Replace`` or a ``Skip``; None: unchanged)."""
        if surgery is None:
            yield
        elif isinstance(surgery, Skip):
            with self.skipped_blocks(surgery.start, surgery.k):
                yield
        elif isinstance(surgery, Replace):
            if surgery.k < 1:
                raise LFTError(f"k must be at least 1, got {surgery.k}")
            flow, k = surgery.flow, surgery.k
            with self.replaced_span(surgery.span, lambda h: replace_on_its_device(flow, h, k)):
                yield
        else:
            raise TypeError(f"surgery must be a Replace or a Skip, got {type(surgery).__name__}")

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, surgery: Surgery | None = None) -> torch.Tensor:
        """Next-token logits, shape (batch, seq, vocab), float32.

        ``Replace(flow, k)`` runs blocks [0, m), ``flow(h_m, k=k)`` instead of blocks [m, n) of ``flow.span``,
        then blocks [n, L), final norm and LM head. ``Skip(start, k)`` removes k blocks from ``start``.
        """
        with self.applied(surgery):
            return self.model(ids.to(self.device), use_cache=False).logits.float()

    def logits_from_state(self, ids: torch.Tensor, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Next-token logits of the model run on from a given residual stream: ``h`` (shape (batch, seq, d))
        enters block ``layer`` (1..L) in place of the teacher's own h_layer, then blocks [layer, L), the final
        norm and the LM head run as usual. ``ids`` (batch, seq) set the positions (their embeddings are
        computed and discarded). Gradients flow back into ``h`` (the teacher's weights are frozen), which is
        what output-level distillation of a flow needs. Shape (batch, seq, vocab), float32."""
        if not 1 <= layer <= self.n_layers:
            raise LFTError(f"a state can enter blocks 1..{self.n_layers}, not {layer}")
        overrides = {0: lambda _h: h, **{i: (lambda x: x) for i in range(1, layer)}}
        with self._planned(overrides=overrides):
            return self.model(ids.to(self.device), use_cache=False).logits.float()

    # -- what a velocity field of this teacher looks like ----------------------------------------------
    def field_spec(self, t_dim: int = 128) -> FieldSpec:
        """A ``FieldSpec`` mirroring one block: heads, MLP kind, activation, position encoding, norm."""
        return self.family_entry.field_spec(self.model.config, self.d_model, t_dim)

    def block_weights(self, i: int) -> BlockWeights:
        """Canonical weights (Linear convention, shape (out, in)) of teacher block i, for initialising a field."""
        if not 0 <= i < self.n_layers:
            raise LFTError(f"block {i} does not exist (0..{self.n_layers - 1})")
        return self.family_entry.block_weights(self._blocks[i], self.model.config, self.d_model)
