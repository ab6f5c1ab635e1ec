"""Perfusion's rank-1 edit as pure math (``../shared/reference/perfusion-math.md``, paper Eq. 2-4); the notation is
in ``perfusion.py``. :func:`rank1_edit` is the J-concept edit of one projection as a function (what the math
tests check); :class:`Rank1Projection` and :class:`Gate` are its e-independent parts, which the UNet sites
cache between calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_Scalar = float | Sequence[float] | torch.Tensor | None


@dataclass
class Rank1Projection:
    """The e-independent part of the J-concept edit: C^-1-orthonormal basis and similarity maps."""

    basis: torch.Tensor  # U_b, (d_in, J): u_j^T C^-1 u_k = delta_jk
    coeff_map: torch.Tensor  # C^-1 U_b, (d_in, J): e @ coeff_map = U_b^T C^-1 e
    sim_map: torch.Tensor  # C^-1 i*_j / energy_j, (d_in, J): e @ sim_map = s(e)

    @classmethod
    def from_targets(cls, i_star: torch.Tensor, C_inv: torch.Tensor,
                     upper: torch.Tensor | None = None, dual: bool = False) -> "Rank1Projection":
        """``upper``: the Cholesky factor U of C^-1 (C^-1 = U^T U), when the caller keeps it. ``dual``: the gate
        reads the coordinates of e's projection onto the targets, ``(I C^-1 I^T)^-1 I C^-1 e`` (s_j(i*_k) =
        delta_jk, so every target maps exactly to its o*, also when targets are not C^-1-orthogonal) instead of
        the paper's ``s_j = i*_j^T C^-1 e / i*_j^T C^-1 i*_j``; the same for one target, or orthogonal ones
        (the diffusion transformers' variant, docs/PERFUSION_DIT.md)."""
        i_star = torch.atleast_2d(i_star).double()  # (J, d)
        C_inv = C_inv.double().to(i_star.device)
        if upper is None:
            upper = torch.linalg.cholesky(C_inv).mT  # C^-1 = U^T U
        q, _ = torch.linalg.qr(upper @ i_star.T)  # orthonormal basis of {U i*_j}
        basis = torch.linalg.solve_triangular(upper, q, upper=True)  # u_j = U^-1 q_j
        c_i = C_inv @ i_star.T  # (d, J)
        if dual:  # e @ sim_map = G^-1 I C^-1 e, G = I C^-1 I^T
            return cls(basis=basis, coeff_map=C_inv @ basis, sim_map=torch.linalg.solve(i_star @ c_i, c_i.T).T)
        energy = (i_star.T * c_i).sum(0)  # i*_j^T C^-1 i*_j
        return cls(basis=basis, coeff_map=C_inv @ basis, sim_map=c_i / energy)

    def to(self, dtype: torch.dtype, device=None) -> "Rank1Projection":
        return Rank1Projection(*(t.to(device=device, dtype=dtype) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.basis, self.coeff_map, self.sim_map

    def same_shapes(self, other: "Rank1Projection") -> bool:
        return all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                   for a, b in zip(self.tensors(), other.tensors()))

    def copy_(self, other: "Rank1Projection") -> "Rank1Projection":
        """``other``'s values written into this projection's own tensors (returns self)."""
        for mine, value in zip(self.tensors(), other.tensors()):
            mine.copy_(value)
        return self

    def similarity(self, e: torch.Tensor) -> torch.Tensor:
        return e @ self.sim_map

    def apply(self, e: torch.Tensor, We: torch.Tensor, W_basis: torch.Tensor, o_star: torch.Tensor,
              gate: "Gate | None") -> torch.Tensor:
        """h(e) given the base output ``We = W e``, ``W_basis = W U_b`` (d_out, J) and the gate (None: ungated)."""
        coeff = e @ self.coeff_map.to(e.dtype)  # (..., J)
        s = e @ self.sim_map.to(e.dtype)
        return We - coeff @ W_basis.mT + (s if gate is None else gate(s)) @ o_star


@dataclass(frozen=True)
class Gate:
    """sigmoid((s - beta) / tau) per concept; concepts marked ``ungated`` keep s itself (Eq. 2)."""

    beta: torch.Tensor  # (J,) or ()
    tau: torch.Tensor
    ungated: torch.Tensor | None = None  # (J,) bool

    @classmethod
    def of(cls, beta: _Scalar, tau: _Scalar, dtype: torch.dtype, device) -> "Gate | None":
        """The gate for ``beta``/``tau`` (scalars, per-concept lists with None for ungated, or tensors); None
        when ``beta`` is None. Made once and reused: building it copies to the device."""
        if beta is None:
            return None
        ungated = None
        if isinstance(beta, (list, tuple)):
            if any(b is None for b in beta):
                ungated = torch.tensor([b is None for b in beta]).to(device)
            beta = [0.0 if b is None else b for b in beta]
        return cls(torch.as_tensor(beta, dtype=dtype).to(device),
                   torch.as_tensor(0.1 if tau is None else tau, dtype=dtype).to(device), ungated)

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        gated = torch.sigmoid((s - self.beta) / self.tau)
        return gated if self.ungated is None else torch.where(self.ungated, s, gated)


def gate_of(s: torch.Tensor, beta: _Scalar, tau: _Scalar) -> torch.Tensor:
    """sigmoid((s - beta) / tau), or s itself when ``beta`` is None (ungated); per concept, a None in a
    ``beta`` list leaves that concept ungated."""
    gate = Gate.of(beta, tau, s.dtype, s.device)
    return s if gate is None else gate(s)


def rank1_edit(
    e: torch.Tensor,
    W: torch.Tensor,
    i_star: torch.Tensor,
    o_star: torch.Tensor,
    C_inv: torch.Tensor,
    beta: _Scalar = None,
    tau: _Scalar = None,
) -> torch.Tensor:
    """Perfusion's (gated) rank-1 edit of ``W`` for J >= 1 concepts, applied to ``e``.

    ``e`` (..., d_in) -> (..., d_out); ``i_star`` (J, d_in) or (d_in,);
    ``o_star`` (J, d_out) or (d_out,); ``beta``/``tau`` scalars or (J,);
    ``beta=None`` is the ungated Eq. 2.
    """
    proj = Rank1Projection.from_targets(i_star, C_inv).to(e.dtype, e.device)
    W = W.to(e.dtype)
    return proj.apply(e, e @ W.mT, W @ proj.basis, torch.atleast_2d(o_star).to(e.dtype),
                      Gate.of(beta, tau, e.dtype, e.device))
