"""Gradient projection off a reference subspace, per parameter tensor (OGPSA, Sun et al. 2026, ogpsa.md §2).

With g = ∇L_s the gradient of the training (safety) loss and r_1 … r_m the mean gradients of m reference losses
(general capability), OGPSA steps along the steepest descent direction that leaves every reference loss unchanged
to first order:

    d* = argmin_d ⟨g, d⟩  s.t.  ⟨r_j, d⟩ = 0 ∀j, ‖d‖ ≤ 1   ⇒   g̃ = (I − UᵀU) g,                    (ogpsa.md §2)

U holding an orthonormal basis of S = span{r_j} in its rows. The official code builds U **per trainable tensor**
(blockwise: the global U is block-diagonal, of rank ≤ m per tensor) from the m mean gradients by Gram–Schmidt in
the order of the reference sets: b_j = r_j / ‖r_j‖, u_1 = b_1, w = b_2 − ⟨b_2, u_1⟩u_1, u_2 = w / ‖w‖; a tensor whose
reference gradient has norm ≤ 1e-10 gets no basis (it is not projected), and a direction whose Gram–Schmidt
residual is below 1e-6 (parallel references) is dropped. Blockwise orthogonality implies orthogonality to every
flattened r_j. Variants (flags of the strategy): ``global`` granularity (one basis of the concatenated
parameter vector), and ``svd`` bases (the top-k right singular vectors of the per-batch reference gradients,
instead of the span of the means).

The code's one-set rule g − ⟨g, b⟩ b / (‖b‖² + 1e-8) differs from the exact projection by a relative 1e-8 (below
fp32's resolution); the exact one is used. Modes: ``orthogonal`` (the code's default) g ↦ (I − UᵀU)g; ``plane``
g ↦ UᵀU g (only the in-span part); ``threshold`` (one reference set, A-GEM-like): project only when ⟨g, u⟩ < 0,
else scale g by ``scale``. The first two are linear (projecting micro-batches and summing equals projecting the
sum); ``threshold`` is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["MODES", "ReferenceBasis", "gram_schmidt_rows", "project_gradients", "reference_basis", "svd_rows"]

MODES = ("orthogonal", "plane", "threshold")
ZERO_NORM = 1e-10  # a reference gradient at most this long gives no direction (the code's rule)
DEPENDENT = 1e-6  # a Gram–Schmidt residual of a unit vector below this is a repeated direction (the code's rule)

ReferenceBasis = dict[str, Tensor]
"""Parameter name → U, rows orthonormal (k × numel of the tensor, fp32, k ≤ m); a tensor left out is not
projected. With ``global`` granularity the single key ``""`` holds the basis of the concatenated parameters."""


def gram_schmidt_rows(vectors: Tensor, zero_norm: float = ZERO_NORM, dependent: float = DEPENDENT) -> Tensor:
    """Orthonormal rows spanning ``vectors``' rows (m × n), in their order: each row is normalised (skipped when
    its norm ≤ ``zero_norm``), then made orthogonal to the rows kept so far and kept when the residual's norm is
    at least ``dependent`` (classical Gram–Schmidt with one re-orthogonalisation pass, in float64)."""
    kept: list[Tensor] = []
    for v in vectors.double():
        norm = v.norm()
        if norm <= zero_norm:
            continue
        w = v / norm
        for _ in range(2):  # twice is enough (Giraud et al. 2005): orthogonal to fp64 rounding
            for u in kept:
                w = w - (w @ u) * u
        if w.norm() >= dependent:
            kept.append(w / w.norm())
    if not kept:
        return vectors.new_zeros((0, vectors.shape[1]), dtype=torch.float32)
    return torch.stack(kept).float()


def svd_rows(rows: Tensor, rank: int, zero_norm: float = ZERO_NORM, dependent: float = DEPENDENT) -> Tensor:
    """The top-``rank`` right singular vectors of ``rows`` (samples × n) as orthonormal rows (the ``svd``
    variant's basis from per-batch reference gradients), those whose singular value exceeds ``zero_norm`` and
    ``dependent`` times the largest (the same rules as :func:`gram_schmidt_rows`: rounding is no direction)."""
    _, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    floor = max(zero_norm, dependent * float(s[0])) if len(s) else zero_norm
    keep = int((s[:rank] > floor).sum())
    return vh[:keep].float()


def reference_basis(per_set: Sequence[Mapping[str, Tensor]], granularity: str = "per_tensor",
                    basis: str = "mean", rank: int = 2) -> ReferenceBasis:
    """The basis of the reference gradients.

    Args:
        per_set: for ``basis="mean"``, one mapping per reference set of parameter name → that set's mean gradient;
            for ``basis="svd"``, one mapping per reference *batch* (of any set) of name → its gradient.
        granularity: ``per_tensor`` (the code: a basis per tensor) or ``global`` (one basis of the concatenation,
            in the order of the first mapping's keys).
        basis: ``mean`` (Gram–Schmidt of the sets' mean gradients, rank ≤ m) or ``svd`` (top-``rank`` singular
            directions of the per-batch gradients).
        rank: the ``svd`` basis's rank.
    """
    if not per_set:
        raise ValueError("reference_basis: no reference gradients")
    names = list(per_set[0])

    def build(rows: Tensor) -> Tensor:
        return gram_schmidt_rows(rows) if basis == "mean" else svd_rows(rows, rank)

    if granularity == "global":
        rows = torch.stack([torch.cat([g[n].reshape(-1).float() for n in names]) for g in per_set])
        return {"": build(rows)}
    out: ReferenceBasis = {}
    for n in names:
        U = build(torch.stack([g[n].reshape(-1).float() for g in per_set]))
        if U.shape[0]:
            out[n] = U
    return out


def project_gradients(grads: Mapping[str, Tensor], basis: ReferenceBasis, mode: str = "orthogonal",
                      scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Project the gradients ``grads`` (name → tensor, changed in place) with ``basis`` as ``mode`` says.

    Returns:
        (‖g‖², ‖UᵀU g‖²) summed over the tensors, on the device (no sync): cos(g, S) = sqrt of their ratio, and in
        ``orthogonal`` mode the removed fraction ‖g − g̃‖/‖g‖ is the same number.
    """
    names = [n for n in grads if n in basis] if "" not in basis else list(grads)
    first = next(iter(grads.values()))
    total = torch.zeros((), device=first.device, dtype=torch.float32)
    inside = torch.zeros_like(total)
    for g in grads.values():
        flat = g.detach().reshape(-1)
        total += flat @ flat if flat.dtype == torch.float32 else flat.float().pow(2).sum()
    if "" in basis:  # global: one basis of the concatenation
        flat = torch.cat([grads[n].reshape(-1).float() for n in names])
        coef = basis[""].to(flat.device) @ flat
        inside += coef.pow(2).sum()
        new = _apply(flat, basis[""].to(flat.device), coef, mode, scale)
        offset = 0
        for n in names:
            size = grads[n].numel()
            grads[n].copy_(new[offset:offset + size].view_as(grads[n]))
            offset += size
        return total, inside
    for n in names:
        g = grads[n]
        U = basis[n].to(g.device)
        if mode == "orthogonal" and g.dtype == torch.float32 and g.is_contiguous():  # one fused pass, in place
            flat = g.view(-1)
            coef = U @ flat
            inside += coef @ coef
            flat.addmv_(U.T, coef, alpha=-1.0)  # g ← g − Uᵀ(U g)
            continue
        flat = g.reshape(-1).float()
        coef = U @ flat
        inside += coef @ coef
        g.copy_(_apply(flat, U, coef, mode, scale).view_as(g))
    return total, inside


def _apply(flat: Tensor, U: Tensor, coef: Tensor, mode: str, scale: float) -> Tensor:
    """One tensor's (or the concatenation's) projected gradient, from its coefficients ``coef`` = U g."""
    in_span = coef @ U
    if mode == "orthogonal":
        return flat - in_span
    if mode == "plane":
        return in_span
    if mode == "threshold":  # one direction u: remove it only where g points against it, else scale g
        return flat - in_span if float(coef.sum()) < 0 else flat * scale
    raise ValueError(f"unknown projection mode '{mode}'; one of {MODES}")
