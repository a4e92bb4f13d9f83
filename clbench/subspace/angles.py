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

__all__ = ["principal_angles"]


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
