"""The gate knob: gate=off is the ungated Eq. 2 edit; per-concept None in a beta list leaves that concept ungated."""
import pytest
import torch

from personalize import attach
from personalize.errors import BadInputError
from personalize.methods.rank1 import gate_of, rank1_edit


def test_gate_of_mixes_gated_and_ungated_concepts():
    s = torch.randn(3, 5, 2)
    got = gate_of(s, [None, 0.5], [0.1, 0.2])
    assert torch.equal(got[..., 0], s[..., 0])
    assert torch.allclose(got[..., 1], torch.sigmoid((s[..., 1] - 0.5) / 0.2))


def test_gate_off_applies_the_ungated_edit(tiny, trained_concept):
    layer = next(m for n, m in tiny.unet.named_modules() if n.endswith("attn2"))
    e = torch.randn(2, 7, layer.to_v.in_features)
    with attach(tiny, trained_concept, gate="off") as handle:
        method = handle.methods[0]
        assert method.beta is None
        name = next(n for n, m in tiny.unet.named_modules() if m is layer)
        got = layer.to_v(e)
        want = rank1_edit(e, layer.to_v.base_layer.weight, method.i_star, method.target_output(name, "v"),
                          method.C_inv, beta=None)
    assert torch.allclose(got, want, atol=1e-5)
    with attach(tiny, trained_concept, beta=0.7) as handle:
        gated = layer.to_v(e)
    assert not torch.allclose(gated, want, atol=1e-3)


def test_gate_knob_rejects_other_values(tiny, trained_concept):
    with pytest.raises(BadInputError, match="gate=on or gate=off"):
        attach(tiny, trained_concept, gate="maybe")
