"""Energy-threshold bases of representation matrices (GPM, Saha et al. ICLR 2021, Eq. 5 and Eqs. 8-9).

Notation: R ∈ R^{d×n} a representation matrix (columns = layer inputs, see :mod:`clbench.subspace.inputs`),
R = U Σ Vᵀ its SVD with σ_1 ≥ σ_2 ≥ …, ε ∈ [0, 1] the energy threshold, M ∈ R^{d×k} the memory (orthonormal
columns). ``‖·‖_F`` is the Frobenius norm, so ‖R‖²_F = Σ σ_i².

* **Eq. 5 (first task).** The smallest k with Σ_{i≤k} σ_i² ≥ ε Σ_i σ_i², M = U[:, :k] ("paper" rule).
  The official code (sahagobinda/GPM) instead takes k = #{i : cumsum(σ²)_i / Σσ² < ε}, one fewer
  ("code" rule, the default, which produced the published numbers).
* **Eq. 8.** R̂ = R − M Mᵀ R (the part of the new representations outside the memory).
* **Eq. 9.** With R̂ = Û Σ̂ V̂ᵀ, the smallest k with ‖M Mᵀ R‖²_F + Σ_{i≤k} σ̂_i² ≥ ε ‖R‖²_F; then
  M ← [M, Û[:, :k]]. Here the official code's count equals the paper's (no off-by-one), so both rules use it.

Everything runs on R's device in torch (no NumPy round trip). The singular pairs can come from a full SVD or
from an eigendecomposition of the smaller Gram matrix, see :func:`top_singular`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = [
    "RULES",
    "basis_union",
    "energy_rank",
    "extend_basis",
    "orthonormal_complement",
    "threshold_basis",
    "top_singular",
]

RULES = ("code", "paper")
METHODS = ("auto", "svd", "gram", "gram32")


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def _work_dtype(t: Tensor) -> torch.dtype:
    """Floating dtype in which products of ``t`` are formed: its own, but at least float32."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


@contextmanager
def _highest_matmul_precision() -> Iterator[None]:
    """Disable TF32 / reduced-precision float32 matmuls for the duration (they would spoil a Gram matrix)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def energy_rank(
    sv2: Tensor,
    threshold: float,
    total: float | Tensor | None = None,
    already: float = 0.0,
    rule: str = "code",
) -> int:
    """Number of leading directions that reach an energy threshold (GPM Eq. 5, Eq. 9).

    ``sv2`` holds squared singular values in descending order, ``total`` the energy to compare against
    (default Σ sv2) and ``already`` the energy the existing memory captures (‖M Mᵀ R‖²_F in Eq. 9).
    With c_k = (already + Σ_{i≤k} sv2_i) / total:

    * ``rule="paper"``: the smallest k with c_k ≥ ε (Eq. 5 with already = 0, Eq. 9 otherwise); ``len(sv2)`` if
      no k reaches ε.
    * ``rule="code"``: k = #{k : c_k < ε}, the official code's first-task count: always one fewer than the
      paper's k (the c_k before the paper's k are exactly those below ε), e.g. σ² = [50, 30, 15, 5], ε = 0.9:
      paper 3, code 2 (equal only when no c_k reaches ε). The official code's memory *update* (Eq. 9)
      counts like the paper, which is why :func:`extend_basis` always asks for "paper".

    Both rules give 0 when already ≥ ε·total.
    """
    _check_rule(rule)
    sv2 = sv2.detach().to(torch.float64)
    if sv2.numel() == 0:
        return 0
    cum = torch.cumsum(sv2, dim=0)
    tot = float(cum[-1]) if total is None else float(total)
    if tot <= 0.0 or already >= threshold * tot:
        return 0
    ratio = (already + cum) / tot
    below = int((ratio < threshold).sum())
    if rule == "code":
        return below
    return min(below + 1, sv2.numel())


def _sym_product(X: Tensor) -> Tensor:
    """X Xᵀ from the blocks on and above the diagonal only (a symmetric rank-k update, ~5/8 of the work).

    torch has no SYRK; for m = X.shape[0] ≥ 256 the rows are split into b = min(8, m // 128) blocks and
    the b(b+1)/2 upper blocks are multiplied (measured 176 → 117 ms for a 576 × 14400 float64 X, 1 thread).
    """
    m = X.shape[0]
    blocks = min(8, m // 128)
    if blocks < 2:
        return X @ X.T
    edges = [round(i * m / blocks) for i in range(blocks + 1)]
    G = X.new_empty((m, m))
    for i in range(blocks):
        rows = X[edges[i] : edges[i + 1]]
        for j in range(i, blocks):
            block = rows @ X[edges[j] : edges[j + 1]].T
            G[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = block
            if j > i:
                G[edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = block.T
    return G


def _gram(X: Tensor, dtype: torch.dtype) -> Tensor:
    """X Xᵀ formed in ``dtype``. When X must be up-cast, it is done in column chunks of ~8 MB accumulated
    into G (cache-friendly; avoids a full up-cast copy of X: measured 204 → 153 ms at 576 × 14400)."""
    if X.dtype == dtype:
        return _sym_product(X)
    m, N = X.shape
    cols = max(1024, 2**20 // max(m, 1))
    if cols >= N:
        return _sym_product(X.to(dtype))
    G = torch.zeros((m, m), dtype=dtype, device=X.device)
    for start in range(0, N, cols):
        G += _sym_product(X[:, start : start + cols].to(dtype))
    return G


def _gram_eig(R: Tensor, side: str, product_dtype: torch.dtype, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eigenpairs (descending) of the Gram matrix R Rᵀ (side "left") or Rᵀ R ("right")."""
    with _highest_matmul_precision():
        G = _gram(R if side == "left" else R.T, product_dtype)
    evals, evecs = torch.linalg.eigh(G.to(dtype))
    return evals.flip(0).clamp_min(0.0), evecs.flip(1)


# CUDA compute capabilities with full-rate float64 (P100, V100, A100, H100/H200, B100/B200).
_FULL_FP64_CUDA = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


def _fast_float64(device: torch.device) -> bool:
    """Whether float64 matmuls run at about half the float32 rate or better (CPUs, data-centre GPUs)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) in _FULL_FP64_CUDA


def _resolve_method(method: str, d: int, n: int, device: torch.device) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    # Measured (benchmarks/basis.py, 1 CPU thread, ε = 0.97): the Gram route beats a full SVD on every GPM
    # shape (576×14400: SVD 2.0 s, float64 Gram 0.20 s, float32 Gram 0.12 s). The float32 product costs
    # accuracy (largest principal angle vs a float64 SVD 3.5e-4 rad there, float64 Gram ~1e-12), so it is
    # used only for wide R on GPUs whose float64 rate is a small fraction of float32 (consumer cards).
    # Tall R (d > n): U = R V / σ amplifies Gram errors by σ_1²/σ_i², so the product stays in float64.
    if d <= n and not _fast_float64(device):
        return "gram32"
    return "gram"


def top_singular(
    R: Tensor, method: str = "auto", dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Left singular vectors and squared singular values of R (d × n), descending.

    Returns ``(U, sv2)``: U is d × r with orthonormal columns in R's dtype and device, ``sv2`` the float64
    σ_i² (i ≤ r), r ≤ min(d, n). Numerically zero directions are dropped (they carry no energy): σ_i ≤
    max(d, n)·u·σ_1 for an SVD, σ_i² ≤ √max(d, n)·u·σ_1² for a Gram eigendecomposition (u the unit roundoff of
    the precision the squares were formed in), and σ_i² ≤ √u·σ_1² for the tall Gram route below, whose U
    would otherwise lose orthogonality.

    Methods (all give the same subspace up to rounding):

    * ``"svd"``: ``torch.linalg.svd`` of R in ``dtype``. Cost ~ d·n·min(d, n) with a large constant.
    * ``"gram"``: eigendecomposition (``eigh``) of the smaller Gram matrix, formed and decomposed in
      ``dtype``.
      d ≤ n: R Rᵀ = U Σ² Uᵀ directly. d > n: Rᵀ R = V Σ² Vᵀ, then U = R V Σ⁻¹.
    * ``"gram32"``: as ``"gram"`` but the Gram product is formed in float32 (eigh still in ``dtype``); for
      d ≤ n only (for d > n it behaves as ``"gram"``, see above).
    * ``"auto"``: ``"gram"``; ``"gram32"`` for d ≤ n on GPUs with slow float64 (see ``benchmarks/basis.py``:
      10-30x faster than NumPy's SVD on GPM's conv shapes at float64 accuracy, 2x more with "gram32" at
      ~1e-4 rad).
    """
    if R.dim() != 2:
        raise ValueError(f"top_singular: R must be 2-D (d × n), got shape {tuple(R.shape)}")
    d, n = R.shape
    out_dtype = _work_dtype(R)
    if d == 0 or n == 0:
        return R.new_zeros((d, 0), dtype=out_dtype), torch.zeros(0, dtype=torch.float64, device=R.device)
    resolved = _resolve_method(method, d, n, R.device)
    if resolved == "svd":
        U, sv, _ = torch.linalg.svd(R.to(dtype), full_matrices=False)
        r = int((sv > max(d, n) * torch.finfo(dtype).eps * sv[0]).sum())
        return U[:, :r].to(out_dtype), (sv[:r].to(torch.float64) ** 2)
    if d <= n:
        product_dtype = torch.float32 if resolved == "gram32" else dtype
        evals, evecs = _gram_eig(R, "left", product_dtype, dtype)
        floor = max(d, n) ** 0.5 * torch.finfo(product_dtype).eps * evals[0]
        r = int((evals > floor).sum())
        return evecs[:, :r].to(out_dtype), evals[:r].to(torch.float64)
    evals, V = _gram_eig(R, "right", dtype, dtype)
    r = int((evals > torch.finfo(dtype).eps ** 0.5 * evals[0]).sum())
    sig = evals[:r].sqrt()
    U = (R.to(dtype) @ V[:, :r]) / sig
    return U.to(out_dtype), evals[:r].to(torch.float64)


def threshold_basis(R: Tensor, threshold: float, rule: str = "code", method: str = "auto") -> Tensor:
    """First-task memory M = U[:, :k] of R (GPM Eq. 5).

    k is :func:`energy_rank` of the squared singular values of R with the given ``rule`` ("code": the official
    code's k = #{cumsum(σ²)/Σσ² < ε}; "paper": the smallest k with Σ_{i≤k}σ_i² ≥ ε Σσ_i²). Returns a d × k
    matrix with orthonormal columns in R's dtype and device (k may be 0).
    """
    _check_rule(rule)
    U, sv2 = top_singular(R, method=method)
    k = energy_rank(sv2, threshold, rule=rule)
    return U[:, :k].contiguous()


def extend_basis(
    M: Tensor | None,
    R: Tensor,
    threshold: float,
    rule: str = "code",
    method: str = "auto",
    max_dim: int | None = None,
) -> Tensor:
    """Memory update after a task (GPM Eqs. 8-9); the first task (``M`` None) is :func:`threshold_basis`.

    With M (d × m, orthonormal) and the new representations R (d × n):

    * Eq. 8: R̂ = R − M (Mᵀ R).
    * total = ‖R‖²_F, already = ‖Mᵀ R‖²_F (= ‖M Mᵀ R‖²_F as M is orthonormal).
    * Eq. 9: k = the smallest k with already + Σ_{i≤k} σ̂_i² ≥ ε·total, σ̂ the singular values of R̂. This is the
      count of both the paper and the official code (the code's off-by-one is in the first task only), so
      ``rule`` matters only when M is None. A memory with 0 columns (the first task kept nothing) takes this
      path too, with the paper's count, as the official code does. If already ≥ ε·total, k = 0 and M is
      returned unchanged.
    * M ← [M, Û[:, :k]], the new columns orthogonalised once more against M (classical Gram–Schmidt in
      float64, then QR) so that Mᵀ Û ≈ 0 to rounding. Directions of R̂ whose energy is below the rounding of
      the projection (σ̂_i² ≤ u·‖R‖²_F, u the unit roundoff of R's dtype) are never added.
    * The number of columns is capped at d (the official code drops columns beyond ``in``) and at ``max_dim``;
      existing columns are never removed.

    Returns a new d × (m + k) tensor in M's dtype and device (``M`` itself when k = 0).
    """
    _check_rule(rule)
    if M is None or M.shape[1] == 0:
        basis = threshold_basis(R, threshold, rule=rule if M is None else "paper", method=method)
        cap = R.shape[0] if max_dim is None else min(R.shape[0], max_dim)
        return basis[:, :cap]
    d, m = M.shape
    if R.shape[0] != d:
        raise ValueError(f"extend_basis: R has {R.shape[0]} rows but the basis has dimension {d}")
    cap = d if max_dim is None else min(d, max_dim)
    if m >= cap:
        return M
    work = _work_dtype(R)
    Rw = R.to(work)
    Mw = M.to(device=R.device, dtype=work)
    with _highest_matmul_precision():
        proj = Mw.T @ Rw  # m × n
        R_hat = Rw - Mw @ proj  # Eq. 8
    total = float(torch.linalg.matrix_norm(Rw.to(torch.float64)) ** 2)
    already = float(torch.linalg.matrix_norm(proj.to(torch.float64)) ** 2)
    if total <= 0.0 or already >= threshold * total:
        return M
    U_hat, sv2_hat = top_singular(R_hat, method=method)
    noise = torch.finfo(work).eps * total
    sv2_hat = sv2_hat[sv2_hat > noise]
    k = energy_rank(sv2_hat, threshold, total=total, already=already, rule="paper")  # Eq. 9
    k = min(k, cap - m)
    if k == 0:
        return M
    new = U_hat[:, :k].to(torch.float64)
    M64 = Mw.to(torch.float64)
    new = new - M64 @ (M64.T @ new)
    Q, Rq = torch.linalg.qr(new)
    keep = Rq.diagonal().abs() > 0.5  # a column that lost half its norm to M was rounding noise
    Q = Q[:, keep]
    return torch.cat([M, Q.to(device=M.device, dtype=M.dtype)], dim=1)


def basis_union(bases: Sequence[Tensor], tol: float = 1e-6) -> Tensor:
    """Orthonormal basis of span(B_1) + … + span(B_p) (e.g. a server merging client subspaces).

    The bases are concatenated, [B_1 … B_p] = U Σ Wᵀ (SVD in float64), and the columns of U with
    σ_i > tol·σ_1 are kept. Inputs need not be orthonormal. Returns d × r in the first basis' dtype/device.
    """
    if len(bases) == 0:
        raise ValueError("basis_union: need at least one basis")
    d = bases[0].shape[0]
    if any(b.dim() != 2 or b.shape[0] != d for b in bases):
        raise ValueError(f"basis_union: every basis must be 2-D with {d} rows")
    ref = bases[0]
    out_dtype = _work_dtype(ref)
    cat = torch.cat([b.to(device=ref.device, dtype=torch.float64) for b in bases], dim=1)
    if cat.shape[1] == 0:
        return ref.new_zeros((d, 0), dtype=out_dtype)
    U, sv, _ = torch.linalg.svd(cat, full_matrices=False)
    if sv.numel() == 0 or float(sv[0]) == 0.0:
        return ref.new_zeros((d, 0), dtype=out_dtype)
    r = int((sv > tol * sv[0]).sum())
    return U[:, :r].to(out_dtype).contiguous()


def orthonormal_complement(M: Tensor) -> Tensor:
    """Orthonormal basis C (d × (d − k)) of span(M)^⊥ for M with k linearly independent columns.

    From the complete QR factorisation M = Q R (float64): the last d − k columns of Q span the orthogonal
    complement, so Cᵀ M = 0 and I − M Mᵀ = C Cᵀ when M is orthonormal. Returns M's dtype and device.
    """
    if M.dim() != 2:
        raise ValueError(f"orthonormal_complement: M must be 2-D, got shape {tuple(M.shape)}")
    d, k = M.shape
    out_dtype = _work_dtype(M)
    if k == 0:
        return torch.eye(d, dtype=out_dtype, device=M.device)
    if k > d:
        raise ValueError(f"orthonormal_complement: M has more columns ({k}) than rows ({d})")
    Q, _ = torch.linalg.qr(M.to(torch.float64), mode="complete")
    return Q[:, k:].to(out_dtype).contiguous()
