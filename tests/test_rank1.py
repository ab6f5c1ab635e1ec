"""The rank-1 edit against its closed forms (perfusion-math.md)."""
import pytest
import torch

from personalize.methods.rank1 import Rank1Projection, rank1_edit

D_IN, D_OUT = 12, 7


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)
    C = A @ A.T / D_IN + 0.1 * torch.eye(D_IN, dtype=torch.float64)
    C_inv = torch.linalg.inv(C)
    W = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    return g, C_inv, W


def test_ungated_equals_rome_weight_update(setup):
    g, C_inv, W = setup
    i_star = torch.randn(D_IN, generator=g, dtype=torch.float64)
    o_star = torch.randn(D_OUT, generator=g, dtype=torch.float64)
    e = torch.randn(5, 3, D_IN, generator=g, dtype=torch.float64)
    energy = i_star @ C_inv @ i_star
    W_rome = W + torch.outer(o_star - W @ i_star, C_inv @ i_star) / energy
    assert torch.allclose(rank1_edit(e, W, i_star, o_star, C_inv), e @ W_rome.T, atol=1e-10)


def test_input_orthogonal_in_metric_is_untouched(setup):
    g, C_inv, W = setup
    i_star = torch.randn(D_IN, generator=g, dtype=torch.float64)
    o_star = torch.randn(D_OUT, generator=g, dtype=torch.float64)
    e = torch.randn(4, D_IN, generator=g, dtype=torch.float64)
    ci = C_inv @ i_star
    e_orth = e - torch.outer(e @ ci, i_star) / (i_star @ ci)  # i*^T C^-1 e_orth = 0
    assert torch.allclose(e_orth @ ci, torch.zeros(4, dtype=torch.float64), atol=1e-10)
    for beta in (None, 0.75):
        # gated: the gate at s = 0 is sigmoid(-beta/tau), so compare without the o* term
        out = rank1_edit(e_orth, W, i_star, o_star, C_inv, beta=beta, tau=0.1)
        gate = 0.0 if beta is None else torch.sigmoid(torch.tensor(-beta / 0.1, dtype=torch.float64))
        assert torch.allclose(out, e_orth @ W.T + gate * o_star, atol=1e-10)


def test_target_input_maps_to_target_output(setup):
    g, C_inv, W = setup
    i_star = torch.randn(D_IN, generator=g, dtype=torch.float64)
    o_star = torch.randn(D_OUT, generator=g, dtype=torch.float64)
    out = rank1_edit(i_star[None], W, i_star, o_star, C_inv)
    assert torch.allclose(out[0], o_star, atol=1e-10)
    # gated with a low threshold: the gate is ~open at s = 1
    gated = rank1_edit(i_star[None], W, i_star, o_star, C_inv, beta=0.5, tau=0.01)
    assert torch.allclose(gated[0], o_star, atol=1e-8)


def test_single_concept_through_multi_concept_path_matches_formula(setup):
    g, C_inv, W = setup
    i_star = torch.randn(D_IN, generator=g, dtype=torch.float64)
    o_star = torch.randn(D_OUT, generator=g, dtype=torch.float64)
    e = torch.randn(6, D_IN, generator=g, dtype=torch.float64)
    beta, tau = 0.75, 0.1
    sim = e @ C_inv @ i_star
    s = sim / (i_star @ C_inv @ i_star)
    e_perp = e - s[:, None] * i_star
    expected = e_perp @ W.T + torch.sigmoid((s - beta) / tau)[:, None] * o_star
    got = rank1_edit(e, W, i_star[None], o_star[None], C_inv, beta=torch.tensor([beta]), tau=torch.tensor([tau]))
    assert torch.allclose(got, expected, atol=1e-10)


def test_multi_concept_e_perp_is_metric_orthogonal_to_every_target(setup):
    g, C_inv, W = setup
    J = 3
    i_stars = torch.randn(J, D_IN, generator=g, dtype=torch.float64)
    proj = Rank1Projection.from_targets(i_stars, C_inv)
    # the basis is C^-1-orthonormal and spans the targets
    gram = proj.basis.T @ C_inv @ proj.basis
    assert torch.allclose(gram, torch.eye(J, dtype=torch.float64), atol=1e-10)
    e = torch.randn(10, D_IN, generator=g, dtype=torch.float64)
    e_perp = e - (e @ proj.coeff_map) @ proj.basis.T
    assert torch.allclose(e_perp @ C_inv @ i_stars.T, torch.zeros(10, J, dtype=torch.float64), atol=1e-9)
    # a projection that forgets C^-1 (a known re-implementation bug) is not orthogonal in the metric
    q, _ = torch.linalg.qr(i_stars.T)
    wrong = e - (e @ q) @ q.T
    assert not torch.allclose(wrong @ C_inv @ i_stars.T, torch.zeros(10, J, dtype=torch.float64), atol=1e-3)


def test_two_concepts_each_target_maps_to_its_output_when_gated_open(setup):
    g, _, W = setup
    o_stars = torch.randn(2, D_OUT, generator=g, dtype=torch.float64)
    # metric-orthogonal targets and a steep gate: each i*_j opens only its own gate
    C_inv_eye = torch.eye(D_IN, dtype=torch.float64)
    i_stars = torch.zeros(2, D_IN, dtype=torch.float64)
    i_stars[0, 0], i_stars[1, 1] = 2.0, 3.0
    out = rank1_edit(i_stars, W, i_stars, o_stars, C_inv_eye, beta=0.5, tau=0.02)
    assert torch.allclose(out, o_stars, atol=1e-6)
