"""Teacher: hidden states by hooks, logits with a span replaced or skipped, loading errors."""
from __future__ import annotations

import pytest
import torch

from lft_core.errors import LFTError
from lft_core.model.loading import load_teacher
from lft_core.model.teacher import Replace, Skip, TeacherLoadError


class Fixed:
    """A stand-in replacement of a span that returns given hidden states (the teacher's own h_n)."""

    def __init__(self, x1, span):
        self.x1, self.span = x1, span

    def __call__(self, h, k=1):
        return self.x1


def _check_hidden_states(teacher):
    ids = teacher.encode("The quick brown fox jumps over the lazy dog. " * 3)
    L = teacher.n_layers
    mine = teacher.hidden_states(ids, range(L + 1))
    with torch.no_grad():
        ref = teacher.model(ids, output_hidden_states=True).hidden_states
    for i in range(L):
        torch.testing.assert_close(mine[i], ref[i].float(), rtol=0, atol=0)
    # h_L is the last block's output BEFORE the final norm; HF's last entry is after it.
    final_norm = teacher.family_entry.final_norm(teacher.model)
    torch.testing.assert_close(final_norm(mine[L]), ref[L].float(), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(mine[L], ref[L].float())
    return ids, mine


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
def test_tiny_families(family, tiny_neox_dir, tiny_gpt2_dir):
    teacher = load_teacher(str(tiny_neox_dir if family == "gpt_neox" else tiny_gpt2_dir))
    assert teacher.family == family and teacher.n_layers == 4 and teacher.d_model == 64
    ids, hs = _check_hidden_states(teacher)
    full = teacher.logits(ids)
    # degenerate cases: empty skip, and a "flow" that returns x1 exactly
    assert torch.equal(teacher.logits(ids, Skip(1, 0)), full)
    x1 = hs[3]
    assert torch.equal(teacher.logits(ids, Replace(Fixed(x1, (1, 3)), 1)), full)
    # a real skip changes the logits, and the model is restored afterwards
    assert not torch.allclose(teacher.logits(ids, Skip(1, 2)), full)
    assert torch.equal(teacher.logits(ids), full)


def test_embedded_model(smol):
    assert smol.family == "llama" and smol.n_layers == 30 and smol.d_model == 576
    ids, hs = _check_hidden_states(smol)
    out = smol.model.generate(smol.encode("The capital of France is"), max_new_tokens=2, do_sample=False)
    assert "Paris" in smol.tokenizer.decode(out[0])
    full = smol.logits(ids)
    x1 = hs[12]
    assert torch.equal(smol.logits(ids, Replace(Fixed(x1, (6, 12)), 1)), full)


def test_surgery_restores_blocks_on_error(tiny_neox):
    blocks = list(tiny_neox._blocks)
    with pytest.raises(RuntimeError):
        with tiny_neox.replaced_span((0, 3), lambda h: h):
            raise RuntimeError("boom")
    assert list(tiny_neox._blocks) == blocks


def test_span_checks(tiny_neox):
    for m, n in [(3, 3), (3, 1), (-1, 2), (0, 5)]:
        with pytest.raises(LFTError, match="span"):
            tiny_neox.check_span(m, n)
    assert tiny_neox.span_params(0, 2) == 2 * tiny_neox.span_params(0, 1)


def test_absent_model_offline_is_a_clear_error():
    with pytest.raises(TeacherLoadError, match="not available on this machine"):
        load_teacher("EleutherAI/pythia-410m-this-does-not-exist")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(TeacherLoadError, match="not a model folder"):
        load_teacher(str(tmp_path))
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher(str(tmp_path / "missing"))


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2", "llama"])
def test_field_initialised_from_a_block_reproduces_it(family, tmp_path):
    """With gates=1 the velocity field is exactly block(x) - x, so one Euler step equals the teacher block:
    checks field_spec / block_weights for each family (weights, head layout, rotary, residual style)."""
    from conftest import make_tiny_model
    from lft_core.flow.field import VelocityField
    from lft_core.flow.latent import LatentFlow

    teacher = load_teacher(str(make_tiny_model(tmp_path / family, family)))
    ids = teacher.encode("Every family must copy exactly. " * 4)
    hs = teacher.hidden_states(ids, [1, 2])
    flow = LatentFlow(VelocityField(teacher.field_spec()), span=(1, 2))
    flow.field.init_from_block(teacher.block_weights(1), gates=1.0)
    with torch.no_grad():
        out = flow(hs[1], k=1)
    scale = hs[2].abs().max()
    assert (out - hs[2]).abs().max() < 1e-4 * scale
