"""Principal angles between subspaces (Björck & Golub 1973; small angles after Knyazev & Argentati 2002).

For orthonormal bases Q_a (d × p), Q_b (d × q), q ≤ p, the principal angles 0 ≤ θ_1 ≤ … ≤ θ_q ≤ π/2 satisfy

    cos θ_i = σ_i(Q_aᵀ Q_b)            (descending σ ↔ ascending θ)
    sin θ_i = σ_{q+1−i}((I − Q_a Q_aᵀ) Q_b)

arccos loses all accuracy for θ below ~1e-8 (cos θ = 1 − θ²/2 rounds to 1), arcsin near π/2, so each angle is
taken from the sine when sin² θ < 1/2 and from the cosine otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["principal_angles", "split_by_alignment"]


def _orthonormal(A: Tensor) -> Tensor:
    """Orthonormal basis of span(A) (columns): QR, then a rank check on R's diagonal refined by an SVD."""
    if A.shape[1] == 0:
        return A
    Q, R = torch.linalg.qr(A)
    diag = R.diagonal().abs()
    tol = max(A.shape) * torch.finfo(A.dtype).eps * float(diag.max()) if diag.numel() else 0.0
    if bool((diag > tol).all()):
        return Q
    # rank deficient: keep the well-conditioned directions of span(A)
    U, sv, _ = torch.linalg.svd(A, full_matrices=False)
    r = int((sv > max(A.shape) * torch.finfo(A.dtype).eps * sv[0]).sum()) if sv.numel() else 0
    return U[:, :r]


def principal_angles(A: Tensor, B: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between span(A) and span(B) (columns of d × p and d × q).

    The columns are orthonormalised first (QR; rank-deficient inputs are reduced to their numerical rank),
    so the result has min(rank A, rank B) entries. Computed in float64 (or A's dtype if wider), accurate also
    for tiny angles via the sine formula. Returns a float64 tensor on A's device.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(
            f"principal_angles: need d × p and d × q matrices, got {tuple(A.shape)}, {tuple(B.shape)}"
        )
    Qa = _orthonormal(A.to(torch.float64))
    Qb = _orthonormal(B.to(device=A.device, dtype=torch.float64))
    if Qa.shape[1] < Qb.shape[1]:
        Qa, Qb = Qb, Qa
    q = Qb.shape[1]
    if q == 0:
        return torch.zeros(0, dtype=torch.float64, device=A.device)
    C = Qa.T @ Qb
    cos = torch.linalg.svdvals(C).clamp(-1.0, 1.0)  # descending → ascending angles
    sin = torch.linalg.svdvals(Qb - Qa @ C).clamp(-1.0, 1.0).flip(0)  # ascending, paired with cos
    from_sin = torch.arcsin(sin)
    from_cos = torch.arccos(cos)
    return torch.where(sin**2 < 0.5, from_sin, from_cos)


def split_by_alignment(F: Tensor, U: Tensor, min_cos: float) -> tuple[Tensor, Tensor]:
    """Split span(F) into its principal vectors nearly parallel to span(U) and an orthonormal basis of the rest.

    For orthonormal F (d × p) and U (d × q), take the SVD Uᵀ F = A Σ Bᵀ with a square B (p × p). The columns of
    F B are the principal vectors of span(F) with respect to span(U), cos θ_i = σ_i (0 beyond rank(Uᵀ F)). The
    first m with σ_i ≥ ``min_cos`` form the aligned part F B[:, :m]; F B[:, m:] spans the rest of span(F).
    This is ROGO's greedy relaxing-space search in closed form (rogo.md §2 R4: repeatedly take the direction of
    span(F) closest to span(U) while its cosine is at least ε_s, and remove it from F). Computed in float64;
    returns ``(aligned, rest)`` in F's dtype and device, both with orthonormal columns.
    """
    if F.shape[1] == 0 or U.shape[1] == 0:
        return F[:, :0], F
    F64 = F.to(torch.float64)
    _, sv, Bh = torch.linalg.svd(U.to(device=F.device, dtype=torch.float64).T @ F64, full_matrices=True)
    m = int((sv >= min_cos).sum())
    rotated = (F64 @ Bh.T).to(F.dtype)
    return rotated[:, :m].contiguous(), rotated[:, m:].contiguous()
