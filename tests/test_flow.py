"""Solvers, losses, the transformer velocity field and flow checkpoints (all CPU, seeded, a few seconds)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lft_core.errors import LFTError
from lft_core.flow.field import BlockWeights, FieldSpec, VelocityField
from lft_core.flow.latent import LatentFlow
from lft_core.flow.store import FlowCheckpointError, load_flow, save_flow
from lft_core.flow.losses import flow_walking_loss, sfm_loss, walk_times
from lft_core.flow.methods import METHODS, compute_loss
from lft_core.flow.solvers import Trajectory, integrate


def small_spec(**overrides) -> FieldSpec:
    base = dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, mlp="gated", act="silu", pos="rope",
                norm="rms", t_dim=16)
    base.update(overrides)
    return FieldSpec(**base)


def open_gates(field: VelocityField, seed: int = 0) -> VelocityField:
    """Give a zero-initialised field a random non-zero modulation so that its output depends on x and t."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lin = field.modulation[1]
        lin.weight.copy_(0.1 * torch.randn(lin.weight.shape, generator=g))
        lin.bias.copy_(1.0 + 0.1 * torch.randn(lin.bias.shape, generator=g))
    return field


# ---------------------------------------------------------------------------------------------------------
# Solvers


@pytest.mark.parametrize("method", ["euler", "midpoint"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_constant_field_lands_at_x0_plus_v(method, k):
    torch.manual_seed(0)
    x0, v = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    out = integrate(lambda x, t: v.expand_as(x), x0, k, method=method)
    assert torch.allclose(out, x0 + v, atol=1e-6)


def test_midpoint_beats_euler_on_exponential_growth():
    # u(x, t) = x has the exact solution x0 · e at t = 1.
    x0 = torch.tensor([[1.0], [-2.0]])
    exact = x0 * math.e
    for k in (2, 4, 8):
        err_euler = (integrate(lambda x, t: x, x0, k, "euler") - exact).abs().max()
        err_mid = (integrate(lambda x, t: x, x0, k, "midpoint") - exact).abs().max()
        assert err_mid < 0.25 * err_euler, (k, err_mid, err_euler)
    # Euler with k steps is exactly (1 + 1/k)^k.
    assert torch.allclose(integrate(lambda x, t: x, x0, 4), x0 * (1.25**4))


def test_time_dependent_field_sees_the_grid_times():
    # u(x, t) = 2t integrates to x0 + 1; Euler on a grid gives the left Riemann sum of 2t.
    x0 = torch.zeros(3, 1)
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return (2 * t)[:, None].expand_as(x)

    out = integrate(velocity, x0, 2, "euler", times=torch.tensor([0.0, 0.25, 1.0]))
    assert torch.allclose(out, torch.full((3, 1), 2 * 0.25 * 0.75))  # 0·0.25 + 0.5·0.75
    assert [s.tolist() for s in seen] == [[0.0] * 3, [0.25] * 3]
    assert torch.allclose(integrate(velocity, x0, 64, "midpoint"), torch.ones(3, 1), atol=1e-5)  # exact


def test_per_sample_times_and_trajectory():
    x0 = torch.zeros(2, 1)
    times = torch.tensor([[0.0, 0.0], [0.5, 0.1], [1.0, 1.0]])  # shape (k+1, batch)
    path = integrate(lambda x, t: t[:, None] + 1.0, x0, 2, times=times, return_path=True)
    assert isinstance(path, Trajectory) and path.states.shape == (3, 2, 1) and path.k == 2
    # sample 0: 0 + 0.5·1 = 0.5, then + 0.5·1.5 = 1.25; sample 1: 0.1·1 = 0.1, then + 0.9·1.1 = 1.09
    assert torch.allclose(path.states[:, :, 0], torch.tensor([[0.0, 0.0], [0.5, 0.1], [1.25, 1.09]]))
    assert torch.equal(path.end, path.states[-1])


def test_solver_input_errors():
    x0 = torch.zeros(2, 3)
    with pytest.raises(LFTError, match="k must be an integer >= 1"):
        integrate(lambda x, t: x, x0, 0)
    with pytest.raises(LFTError, match="unknown solver"):
        integrate(lambda x, t: x, x0, 2, method="rk4")
    with pytest.raises(LFTError, match="times must have shape"):
        integrate(lambda x, t: x, x0, 2, times=torch.linspace(0, 1, 4))


# ---------------------------------------------------------------------------------------------------------
# Losses


def test_sfm_loss_is_zero_for_the_exact_velocity_of_a_linear_pair():
    torch.manual_seed(0)
    x0, x1 = torch.randn(8, 4, 6), torch.randn(8, 4, 6)
    exact = lambda x, t: (x1 - x0)  # noqa: E731  (the straight path's velocity, constant in t)
    assert sfm_loss(exact, x0, x1, generator=torch.Generator().manual_seed(1)).item() == 0.0
    assert sfm_loss(lambda x, t: torch.zeros_like(x), x0, x1).item() == pytest.approx((x1 - x0).pow(2).mean().item())


def test_sfm_loss_evaluates_on_the_straight_path():
    x0, x1 = torch.zeros(3, 2), torch.ones(3, 2) * 4
    t = torch.tensor([0.0, 0.25, 1.0])
    seen = {}

    def velocity(x, tt):
        seen["x"], seen["t"] = x.clone(), tt.clone()
        return torch.zeros_like(x)

    sfm_loss(velocity, x0, x1, t=t)
    assert torch.allclose(seen["x"][:, 0], torch.tensor([0.0, 1.0, 4.0])) and torch.equal(seen["t"], t)


def test_walk_times_are_sorted_and_span_zero_to_one():
    times = walk_times(64, 4, torch.Generator().manual_seed(0))
    assert times.shape == (5, 64)
    assert torch.all(times[0] == 0) and torch.all(times[-1] == 1)
    assert torch.all(times[1:] >= times[:-1]) and len(set(times[1].tolist())) > 50  # per-sample, random


def test_flow_walking_zero_for_exact_field_and_reaches_every_step():
    torch.manual_seed(0)
    x0, x1 = torch.randn(16, 3), torch.randn(16, 3)
    assert flow_walking_loss(lambda x, t: (x1 - x0), x0, x1, k=3).item() == pytest.approx(0.0, abs=1e-10)

    # u(x, t) = a_j · x on the j-th third of [0, 1]: a parameter used only in the last step still gets a gradient.
    a = torch.zeros(3, requires_grad=True)

    def velocity(x, t):
        j = torch.clamp((t * 3).long(), max=2)
        return a[j][:, None] * x

    g = torch.Generator().manual_seed(0)
    times = torch.tensor([0.0, 1 / 3 + 0.01, 2 / 3 + 0.01, 1.0])[:, None].expand(4, 16)
    x_hat = integrate(velocity, x0, 3, times=times)
    loss = (x_hat - x1).pow(2).mean()
    loss.backward()
    assert torch.all(a.grad != 0), a.grad

    # Gradients flow *through* the states: detaching intermediate states changes the gradient of a.
    a.grad = None

    def detached_walk():
        x = x0
        for i in range(3):
            dt = times[i + 1] - times[i]
            x = (x + dt[:, None] * velocity(x, times[i])).detach() if i < 2 else x + dt[:, None] * velocity(x, times[i])
        return x

    with torch.no_grad():
        a.copy_(torch.tensor([0.3, -0.2, 0.5]))
    (integrate(velocity, x0, 3, times=times) - x1).pow(2).mean().backward()
    through = a.grad.clone()
    a.grad = None
    (detached_walk() - x1).pow(2).mean().backward()
    assert through[0] != 0 and a.grad[0] == 0 and not torch.allclose(through, a.grad)

    # flow_walking_loss itself backpropagates through the random-time walk into a field's parameters.
    field = torch.nn.Linear(3, 3)
    loss = flow_walking_loss(lambda x, t: field(x) * t[:, None], x0, x1, k=3, generator=g)
    loss.backward()
    assert field.weight.grad is not None and field.weight.grad.abs().sum() > 0


def test_flow_walking_matches_the_analytic_three_step_composition():
    # u(x, t) = c · x: k Euler steps multiply by Π (1 + c Δt_i); d loss / d c follows from the product rule.
    x0, x1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 1.0]])
    c = torch.tensor(0.7, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    times = walk_times(1, 3, torch.Generator().manual_seed(5))[:, 0]
    loss = flow_walking_loss(lambda x, t: c * x, x0, x1, k=3, generator=g)
    loss.backward()
    dts = (times[1:] - times[:-1]).double()
    factor = torch.prod(1 + 0.7 * dts)
    d_factor = sum(dts[i] * torch.prod(1 + 0.7 * torch.cat([dts[:i], dts[i + 1 :]])) for i in range(3))
    x0d, x1d = x0.double(), x1.double()
    expected_loss = (factor * x0d - x1d).pow(2).mean()
    expected_grad = (2 * (factor * x0d - x1d) * x0d * d_factor).mean()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert c.grad.item() == pytest.approx(expected_grad.item(), rel=1e-4)


def test_hybrid_and_dispatcher():
    torch.manual_seed(0)
    x0, x1 = torch.randn(8, 2), torch.randn(8, 2)
    field = torch.nn.Linear(2, 2)
    u = lambda x, t: field(x)  # noqa: E731
    fw = flow_walking_loss(u, x0, x1, k=3, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    walk_times(8, 3, g)  # the hybrid draws the FW times first, then the SFM times, from the same generator
    sfm = sfm_loss(u, x0, x1, generator=g)
    hybrid = compute_loss("hybrid", u, x0, x1, k=3, alpha=0.25, generator=torch.Generator().manual_seed(3))
    assert hybrid.item() == pytest.approx((fw + 0.25 * sfm).item(), rel=1e-6)
    assert list(METHODS) == ["sfm", "fw", "hybrid"]
    for method in METHODS:
        assert torch.isfinite(compute_loss(method, u, x0, x1, 3, 0.1, torch.Generator().manual_seed(0)))
    with pytest.raises(LFTError, match="unknown training method 'ot'"):
        compute_loss("ot", u, x0, x1)
    noise = METHODS["fw"].draw(8, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
    with pytest.raises(LFTError, match="unknown training method 'ot'"):  # given times, an unknown name still fails
        compute_loss("ot", u, x0, x1, noise=noise)


# ---------------------------------------------------------------------------------------------------------
# Velocity field


def test_field_shape_zero_init_and_time_dependence():
    torch.manual_seed(0)
    field = VelocityField(small_spec())
    x, t = torch.randn(3, 7, 32), torch.rand(3)
    v = field(x, t)
    assert v.shape == (3, 7, 32) and torch.all(v == 0)  # adaLN-Zero: gates start at zero
    open_gates(field)
    v0, v1 = field(x, torch.zeros(3)), field(x, torch.ones(3))
    assert v0.abs().mean() > 1e-3 and not torch.allclose(v0, v1)
    assert torch.allclose(field(x, 0.5), field(x, torch.full((3,), 0.5)))  # a float t is broadcast


@pytest.mark.parametrize("overrides", [
    dict(pos="rope"),
    dict(pos="none"),
    dict(pos="rope", n_kv_heads=4, rotary_dims=4, mlp="plain", act="gelu_new", norm="layer", attn_bias=True,
         mlp_bias=True, parallel_residual=True),
    dict(n_kv_heads=1),
])
def test_field_is_causal(overrides):
    torch.manual_seed(0)
    field = open_gates(VelocityField(small_spec(**overrides)))
    x, t = torch.randn(2, 9, 32), torch.rand(2)
    changed = x.clone()
    changed[:, 5:] += torch.randn(2, 4, 32)
    v, v_changed = field(x, t), field(changed, t)
    assert torch.allclose(v[:, :5], v_changed[:, :5], atol=1e-6)
    assert not torch.allclose(v[:, 5:], v_changed[:, 5:], atol=1e-3)


def test_rope_makes_attention_depend_on_position():
    # With RoPE, the first-token output changes when the same token sits after a prefix differently spaced;
    # with pos="none", attention is permutation-invariant over the visible keys.
    torch.manual_seed(0)
    x = torch.randn(1, 6, 32)
    for pos, invariant in (("none", True), ("rope", False)):
        field = open_gates(VelocityField(small_spec(pos=pos)))
        a = field.attention(x)
        perm = torch.tensor([1, 0, 2, 3, 4, 5])  # swap the first two keys: the last query sees the same set
        b = field.attention(x[:, perm])
        assert torch.allclose(a[:, -1], b[:, -1], atol=1e-5) == invariant, pos


def test_gqa_shares_kv_heads():
    spec = small_spec(n_heads=4, n_kv_heads=2)
    field = VelocityField(spec)
    assert field.k_proj.weight.shape == (2 * 8, 32) and field.q_proj.weight.shape == (4 * 8, 32)
    with pytest.raises(LFTError, match="multiple of n_kv_heads"):
        small_spec(n_heads=4, n_kv_heads=3)


def test_spec_round_trip_and_validation():
    spec = small_spec(rotary_dims=4, norm="layer")
    assert FieldSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(LFTError, match="act must be one of"):
        small_spec(act="tanh")
    with pytest.raises(LFTError, match="rotary_dims"):
        small_spec(rotary_dims=3)
    with pytest.raises(LFTError, match="missing d_ff"):
        FieldSpec.from_dict({"d_model": 4, "n_heads": 1, "n_kv_heads": 1, "head_dim": 4})


def _random_block(spec: FieldSpec, seed: int = 0) -> BlockWeights:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    d, q, kv = spec.d_model, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    return BlockWeights(q=r(q, d), k=r(kv, d), v=r(kv, d), o=r(d, q), mlp_up=r(spec.d_ff, d),
                        mlp_gate=r(spec.d_ff, d) if spec.mlp == "gated" else None, mlp_down=r(d, spec.d_ff))


def test_init_from_block_copies_weights_and_checks_shapes():
    spec = small_spec()
    field, w = VelocityField(spec), _random_block(spec)
    field.init_from_block(w)
    for name, tensor in (("q_proj", w.q), ("k_proj", w.k), ("v_proj", w.v), ("o_proj", w.o), ("mlp_up", w.mlp_up),
                         ("mlp_gate", w.mlp_gate), ("mlp_down", w.mlp_down)):
        assert torch.equal(getattr(field, name).weight, tensor), name
    assert torch.all(field(torch.randn(1, 3, 32), torch.rand(1)) == 0)  # gates stay closed by default
    bad = _random_block(small_spec(n_kv_heads=4))
    with pytest.raises(LFTError, match=r"k: teacher weight has shape \(32, 32\), field expects \(16, 32\)"):
        VelocityField(spec).init_from_block(bad)
    with pytest.raises(LFTError, match="no mlp_gate"):
        VelocityField(spec).init_from_block(_random_block(small_spec(mlp="plain")))
    with pytest.raises(LFTError, match="has q_bias"):
        w.q_bias = torch.zeros(32)
        VelocityField(spec).init_from_block(w)


def _hf_block(family: str):
    """Block 0 of a tiny random HF model: (BlockWeights with norm affine, FieldSpec, h_0, h_1)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48, max_position_embeddings=32, rotary_pct=0.5)
    else:
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norm affine and larger weights so the check has teeth
        for name, p in model.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    d = 32
    if family == "llama":
        b = model.model.layers[0]
        a, f = b.self_attn, b.mlp
        w = BlockWeights(q=a.q_proj.weight, k=a.k_proj.weight, v=a.v_proj.weight, o=a.o_proj.weight,
                         mlp_up=f.up_proj.weight, mlp_gate=f.gate_proj.weight, mlp_down=f.down_proj.weight,
                         attn_norm_weight=b.input_layernorm.weight, mlp_norm_weight=b.post_attention_layernorm.weight)
        spec = FieldSpec(d_model=d, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, mlp="gated", act="silu",
                         norm="rms", norm_eps=cfg.rms_norm_eps, t_dim=16)
    elif family == "gpt_neox":
        b = model.gpt_neox.layers[0]
        a, f = b.attention, b.mlp
        qkv = a.query_key_value.weight.view(4, 3, 8, d)
        qkv_b = a.query_key_value.bias.view(4, 3, 8)
        w = BlockWeights(q=qkv[:, 0].reshape(32, d), k=qkv[:, 1].reshape(32, d), v=qkv[:, 2].reshape(32, d),
                         o=a.dense.weight, q_bias=qkv_b[:, 0].reshape(-1), k_bias=qkv_b[:, 1].reshape(-1),
                         v_bias=qkv_b[:, 2].reshape(-1), o_bias=a.dense.bias, mlp_up=f.dense_h_to_4h.weight,
                         mlp_down=f.dense_4h_to_h.weight, mlp_up_bias=f.dense_h_to_4h.bias,
                         mlp_down_bias=f.dense_4h_to_h.bias, attn_norm_weight=b.input_layernorm.weight,
                         attn_norm_bias=b.input_layernorm.bias, mlp_norm_weight=b.post_attention_layernorm.weight,
                         mlp_norm_bias=b.post_attention_layernorm.bias)
        spec = FieldSpec(d_model=d, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=48, mlp="plain", act=cfg.hidden_act,
                         rotary_dims=4, norm="layer", norm_eps=cfg.layer_norm_eps, attn_bias=True, mlp_bias=True,
                         parallel_residual=cfg.use_parallel_residual, t_dim=16)
    else:
        b = model.transformer.h[0]
        a, f = b.attn, b.mlp
        qkv, qkv_b = a.c_attn.weight.t(), a.c_attn.bias
        w = BlockWeights(q=qkv[:d], k=qkv[d : 2 * d], v=qkv[2 * d :], o=a.c_proj.weight.t(), q_bias=qkv_b[:d],
                         k_bias=qkv_b[d : 2 * d], v_bias=qkv_b[2 * d :], o_bias=a.c_proj.bias,
                         mlp_up=f.c_fc.weight.t(), mlp_down=f.c_proj.weight.t(), mlp_up_bias=f.c_fc.bias,
                         mlp_down_bias=f.c_proj.bias, attn_norm_weight=b.ln_1.weight, attn_norm_bias=b.ln_1.bias,
                         mlp_norm_weight=b.ln_2.weight, mlp_norm_bias=b.ln_2.bias)
        spec = FieldSpec(d_model=d, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=128, mlp="plain",
                         act=cfg.activation_function, pos="none", norm="layer", norm_eps=cfg.layer_norm_epsilon,
                         attn_bias=True, mlp_bias=True, t_dim=16)
    return w, spec, hidden[0], hidden[1]


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_open_gates_reproduce_the_teacher_block(family):
    """With the norm affine folded in and gates = 1, u(x, t) = block(x) − x exactly: this checks RoPE (full and
    partial rotary), GQA, both MLP kinds, both norms, biases and the parallel residual against transformers."""
    w, spec, h0, h1 = _hf_block(family)
    field = VelocityField(spec)
    field.init_from_block(w, gates=1.0)
    with torch.no_grad():
        v = field(h0, torch.rand(h0.shape[0]))
    scale = (h1 - h0).abs().max()
    assert scale > 0.1
    assert (v - (h1 - h0)).abs().max() < 1e-4 * scale, (v - (h1 - h0)).abs().max()
    with torch.no_grad():  # one Euler step of a LatentFlow is then exactly one teacher block
        flow = LatentFlow(field, span=(0, 1))
        assert torch.allclose(flow(h0, k=1), h1, atol=1e-4 * float(h1.abs().max()))


def test_n_params_is_about_one_block():
    spec = FieldSpec(d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536)  # SmolLM2-135M's block
    field = VelocityField(spec)
    block = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536
    assert block < field.n_params() < 1.2 * block


# ---------------------------------------------------------------------------------------------------------
# LatentFlow and checkpoints


def test_latent_flow_normalisation_and_paths():
    torch.manual_seed(0)
    flow = LatentFlow(small_spec(), span=(2, 5))
    h = torch.randn(2, 4, 32) * 3 + 1
    assert torch.equal(flow(h, k=3), h)  # zero field: the flow is the identity, in any units
    mu, sigma = torch.randn(32), torch.rand(32) + 0.5
    sigma[0] = 0.0  # a constant dimension: floored, never divided by zero
    flow.set_normalisation(mu, sigma)
    assert flow.sigma[0] == pytest.approx(1e-3 * float(sigma.median()))
    assert torch.allclose(flow.denormalise(flow.normalise(h)), h, atol=1e-5)
    # A field that adds a constant c in normalised space moves h by c · sigma in original units.
    c = torch.randn(32)
    flow.velocity = lambda x, t: c.expand_as(x)  # type: ignore[method-assign]
    out = flow(h, k=2, method="midpoint")
    assert torch.allclose(out, h + c * flow.sigma, atol=1e-4)
    path = flow(h, k=4, return_path=True)
    assert path.states.shape == (5, 2, 4, 32) and torch.allclose(path.states[0], h, atol=1e-5)
    assert torch.allclose(path.states[2], h + 0.5 * c * flow.sigma, atol=1e-4)
    with pytest.raises(LFTError, match="0 <= m < n"):
        LatentFlow(small_spec(), span=(3, 3))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    flow = LatentFlow(open_gates(VelocityField(small_spec(rotary_dims=4))), span=(3, 9))
    flow.set_normalisation(torch.randn(32), torch.rand(32) + 0.5)
    target = tmp_path / "flows" / "demo"
    save_flow(flow, target, {"method": "fw", "k": 3, "history": [{"step": 1, "loss": torch.tensor(0.5)}]})
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    loaded, config = load_flow(target)
    assert config["method"] == "fw" and config["span"] == [3, 9] and config["history"][0]["loss"] == 0.5
    assert loaded.span == (3, 9) and loaded.spec == flow.spec
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(loaded(h, k=3), flow(h, k=3))
    save_flow(flow, target, {"method": "fw", "k": 5})  # overwrite an existing checkpoint in place
    assert load_flow(target)[1]["k"] == 5


def test_truncated_or_missing_checkpoint_raises(tmp_path):
    flow = LatentFlow(small_spec(), span=(0, 2))
    target = tmp_path / "f"
    save_flow(flow, target, {})
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(FlowCheckpointError, match="model.safetensors"):
        load_flow(target)
    with pytest.raises(FlowCheckpointError, match="not found"):
        load_flow(tmp_path / "nowhere")
    save_flow(flow, target, {})
    (target / "config.json").write_text("{not json")
    with pytest.raises(FlowCheckpointError, match="invalid flow config"):
        load_flow(target)
    # Weights that do not match the config's spec.
    save_flow(LatentFlow(small_spec(d_ff=64), span=(0, 2)), tmp_path / "other", {})
    save_flow(flow, target, {})
    (target / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(FlowCheckpointError, match="do not match"):
        load_flow(target)
    assert issubclass(FlowCheckpointError, LFTError)


def test_field_runs_under_bf16_autocast_on_cpu():
    # The GPU path uses torch.autocast("cuda", bfloat16); CPU autocast exercises the same dtype mixing.
    torch.manual_seed(0)
    flow = LatentFlow(open_gates(VelocityField(small_spec())), span=(0, 1))
    flow.set_normalisation(torch.zeros(32), torch.ones(32) * 2)
    h = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flow(h, k=2)
        loss = compute_loss("hybrid", flow.velocity, flow.normalise(h), flow.normalise(h + 1), 3, 0.1,
                            torch.Generator().manual_seed(0))
    loss.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out, flow(h, k=2), atol=0.1 * float(out.detach().abs().max()))
    assert all(p.grad is not None for p in flow.field.parameters() if p.requires_grad)
