"""Hebbian subspace learning: Oja's subspace rule with frozen old rows (HLOP, Xiao et al. ICLR 2024).

The neural counterpart of :mod:`clbench.subspace.basis` (SVD of a representation matrix): k lateral *subspace
neurons* per layer learn, online and with a local rule, an orthonormal basis of the principal subspace of the
layer's presynaptic activity. The paper's equation numbers could not be checked (hlop.md), so the references
below are hlop.md's steps and the paper's sections.

Notation: x ∈ R^d a presynaptic activity vector (a row of a batch X ∈ R^{B×d}); H ∈ R^{k×d} the lateral weights,
rows ordered old (H_old, k_old rows, learned on earlier tasks, frozen) then new (H_new, m rows, learning).

* **Oja's subspace rule** (hlop.md Algorithm step 1; paper Sec. 3.2, 4.1; Oja 1989). The subspace neurons
  respond y = H x and feed back x⁻ = −Hᵀy (x̂ = Hᵀy), and the weights follow the Hebbian/anti-Hebbian update
  ΔH ∝ y (x + x⁻)ᵀ = y xᵀ − y yᵀ H, averaged over the batch:

      Y = X Hᵀ,   X̂ = Y H,   ΔH = (1/B) Yᵀ (X − X̂).                                            (step 1)

  Its stable fixed point has H Hᵀ = I and rowspace(H) = the span of the top-k eigenvectors of the **uncentred**
  second moment E[x xᵀ] (no mean is removed, as in GPM). Official code, reproduced here: ``iterations`` (5)
  updates on the same batch; ΔH clamped element-wise to [−clip, clip] (10); momentum M ← μ M + (1 − μ) ΔH, then
  H ← H + η M (μ = 0.9; μ = 0 is the plain rule H ← H + η ΔH).
* **New rows for a new task** (steps 2-4). Task 1 adds m_1 rows; at the end of every task all rows are merged
  into the frozen old block; task k adds m_k new rows (initialised like ``torch.nn.init.orthogonal_``: orthonormal
  among themselves, not to the old rows). Y and X̂ use all rows, but only the new rows change (the rows of ΔH
  for old rows are dropped and their momentum is not kept), so with an orthonormal H_old the new rows learn the
  principal subspace of the residual x − H_oldᵀ H_old x and their overlap H_new H_oldᵀ decays to 0 at a rate
  set by the new rows' output variance (hlop.md "Pitfalls").
* **Projection** (step 4a). With P = H_oldᵀ H_old, a weight update ΔW = δ (x − P x)ᵀ leaves W x_old unchanged for
  x_old ∈ rowspace(H_old); equivalently G ← G (I − P) for a weight gradient G (out × d, conv weights reshaped to
  out × C_in·kh·kw). P is an orthogonal projector only once H_old H_oldᵀ = I: under-converged rows give
  eigenvalues of P above 1, which turn the "projection" into a push along old directions (hlop.md "Pitfalls");
  :meth:`HebbianSubspace.projector_eigenvalues` and :meth:`HebbianSubspace.orthonormality_error` measure this.

Two deviations from the official code are available, both off by default (hlop.md "Pitfalls"): new rows started
orthogonal to the old ones (``add_rows(..., orthogonal_to_old=True)``) and an exact re-orthonormalisation of all
rows when they are frozen (``merge(orthonormalize=True)``).

Interface shared with the SVD route: both give an orthonormal basis M (d × k, columns) for
:class:`~clbench.subspace.projection.LayerProjector`: ``extend_basis(M_old, R, ε)`` (energy threshold) or
:func:`hebbian_extend` ``(M_old, R, rows)`` (a row budget); :meth:`HebbianSubspace.basis` turns lateral weights
learned online into such an M.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["HebbianSubspace", "hebbian_extend"]


def _orthonormal_rows(m: int, d: int, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    """m × d with orthonormal rows drawn uniformly (QR of a Gaussian with the sign of R's diagonal fixed)."""
    q, r = torch.linalg.qr(torch.randn(d, m, generator=generator, dtype=torch.float64))
    sign = torch.sign(r.diagonal())
    sign[sign == 0] = 1.0
    return (q * sign).T.to(dtype)


def _span(rows: Tensor, min_norm: float) -> Tensor:
    """Orthonormal basis (d × r, float64) of the row span of ``rows`` (k × d): left singular vectors of rowsᵀ
    with singular value above ``min_norm`` (rows of a converged H have unit norm, so all k are kept)."""
    if rows.shape[0] == 0:
        return rows.new_zeros((rows.shape[1], 0), dtype=torch.float64)
    U, sv, _ = torch.linalg.svd(rows.to(torch.float64).T, full_matrices=False)
    return U[:, sv > min_norm]


class HebbianSubspace:
    """Lateral weights H (k × d) of one layer's subspace neurons, learned with Oja's subspace rule.

    Args:
        dim: d, the dimension of the presynaptic activity (conv layers: C_in·kh·kw of the unfolded patches).
        lr: η, the Hebbian learning rate (HLOP's code: 0.001 for the 784-d PMNIST input, 0.01 elsewhere; for
            activity on another scale keep η·E‖x‖² constant, hlop.md "Pitfalls").
        momentum: μ of the momentum buffer (code: 0.9; 0 for the plain rule).
        iterations: updates per activity batch, all on the same batch (code: 5).
        clip: element-wise bound on the raw ΔH (code: 10; ``None``: no clamp).
        device, dtype: where H lives (fp32 by default, as the code; hlop.md: keep conv batches in fp32).

    Use per task: :meth:`add_rows` (new subspace neurons), :meth:`step` on every training batch's activity (or
    :meth:`fit` on a representation matrix), then :meth:`merge` at the end of the task; :meth:`project` /
    :meth:`basis` give the projection of later tasks. Everything runs under ``torch.no_grad``.
    """

    def __init__(self, dim: int, lr: float = 0.01, momentum: float = 0.9, iterations: int = 5,
                 clip: float | None = 10.0, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if dim < 1:
            raise ValueError(f"HebbianSubspace: dim must be >= 1, got {dim}")
        if lr <= 0 or not 0.0 <= momentum < 1.0 or iterations < 1 or (clip is not None and clip <= 0):
            raise ValueError(f"HebbianSubspace: need lr > 0, 0 <= momentum < 1, iterations >= 1, clip > 0 or None; "
                             f"got lr={lr}, momentum={momentum}, iterations={iterations}, clip={clip}")
        self.dim = dim
        self.lr = lr
        self.momentum = momentum
        self.iterations = iterations
        self.clip = clip
        self.weight = torch.zeros((0, dim), device=device, dtype=dtype)
        self.n_old = 0
        self._buffer = torch.zeros((0, dim), device=device, dtype=dtype)  # momentum M of the new rows

    @classmethod
    def from_basis(cls, basis: Tensor, **kwargs: Any) -> HebbianSubspace:
        """A learner whose frozen old rows are H_old = Mᵀ for an orthonormal basis M (d × k), e.g. one from the
        SVD route, on M's device; ``kwargs``: the constructor's lr, momentum, iterations, clip and dtype (default:
        M's)."""
        if basis.dim() != 2:
            raise ValueError(f"HebbianSubspace.from_basis: need a d × k basis, got {tuple(basis.shape)}")
        kwargs.setdefault("dtype", basis.dtype if basis.dtype in (torch.float32, torch.float64) else torch.float32)
        learner = cls(basis.shape[0], device=basis.device, **kwargs)
        learner.weight = basis.T.to(learner.weight.dtype).contiguous()
        learner.merge()
        return learner

    @property
    def rows(self) -> int:
        """k, the number of subspace neurons (old + new)."""
        return self.weight.shape[0]

    @property
    def old(self) -> Tensor:
        """H_old (k_old × d), the frozen rows that define the projection."""
        return self.weight[: self.n_old]

    @property
    def new(self) -> Tensor:
        """H_new (m × d), the rows learning on the current task."""
        return self.weight[self.n_old :]

    def add_rows(self, m: int, generator: torch.Generator | None = None, orthogonal_to_old: bool = False) -> int:
        """Add up to ``m`` new subspace neurons (capped so that k ≤ d); return how many were added.

        New rows have orthonormal rows among themselves (the code's ``orthogonal_`` init); with
        ``orthogonal_to_old`` (a deviation, hlop.md "Pitfalls") they are also orthogonal to span(H_old), which
        removes the initial overlap that under-converged rows turn into projector eigenvalues above 1.
        Adding rows twice within a task is allowed: all of them learn until the next :meth:`merge`.
        """
        if m < 0:
            raise ValueError(f"HebbianSubspace.add_rows: m must be >= 0, got {m}")
        m = min(m, self.dim - self.rows)
        if m == 0:
            return 0
        dtype, device = self.weight.dtype, self.weight.device
        if orthogonal_to_old and self.rows > 0:
            taken = _span(self.weight, 1e-6)
            free = taken.shape[0] - taken.shape[1]
            m = min(m, free)
            if m == 0:
                return 0
            g = torch.randn(self.dim, m, generator=generator, dtype=torch.float64).to(device)
            g = g - taken @ (taken.T @ g)
            g = g - taken @ (taken.T @ g)  # twice is enough (Kahan-Parlett)
            fresh = torch.linalg.qr(g)[0].T.to(dtype)
        else:
            fresh = _orthonormal_rows(m, self.dim, generator, dtype).to(device)
        self.weight = torch.cat([self.weight, fresh])
        self._buffer = torch.cat([self._buffer, torch.zeros_like(fresh)])
        return m

    def merge(self, orthonormalize: bool = False) -> None:
        """End of a task: every row becomes old and frozen, and the momentum of the new rows is dropped
        (hlop.md step 3). ``orthonormalize`` (a deviation, default off) replaces H by an exactly orthonormal
        basis of its row span (numerically dependent rows are dropped), so that H_oldᵀ H_old is an exact
        projector."""
        if orthonormalize and self.rows > 0:
            Q = _span(self.weight, 1e-6)
            self.weight = Q.T.to(self.weight.dtype)
        self.n_old = self.rows
        self._buffer = self._buffer[:0]

    def residual(self, x: Tensor) -> Tensor:
        """X − (X H_oldᵀ) H_old (rows of ``x`` flattened to (N, d), in H's dtype and device): the old rows' part of
        X − YH in Oja's rule, fixed while H_old is frozen; :meth:`step` takes it precomputed for activity it sees
        more than once (HLOP's extra Hebbian passes)."""
        X = x.detach().reshape(-1, self.dim).to(device=self.weight.device, dtype=self.weight.dtype)
        return X if self.n_old == 0 else X - (X @ self.old.T) @ self.old

    @torch.no_grad()
    def step(self, x: Tensor, residual: Tensor | None = None) -> None:
        """Oja's subspace rule on one batch of activity ``x`` (B × d, or any (…, d): leading dims are samples):
        ``iterations`` times ΔH = (1/B) Yᵀ(X − YH) with Y = XHᵀ over all rows, clamped, through the momentum
        buffer into the new rows only (hlop.md steps 1, 4b). A no-op without new rows. ``residual``: the same
        batch's :meth:`residual`, if already formed (same rows, same order)."""
        if self.rows == self.n_old:
            return
        if x.shape[-1] != self.dim:
            raise ValueError(f"HebbianSubspace.step: activity has d={x.shape[-1]}, the learner d={self.dim}")
        X = x.detach().reshape(-1, self.dim).to(device=self.weight.device, dtype=self.weight.dtype)
        k0, M, mu = self.n_old, self._buffer, self.momentum
        H_new = self.weight[k0:].clone()
        # The old rows are frozen, so their part of X − YH is the same in every iteration: X − Y_old H_old is
        # formed once (2·B·d·k_old), and each iteration costs 3·B·d·m for the m new rows instead of
        # 2·B·d·(k_old + m) + B·d·m.
        if residual is None:
            residual = self.residual(X)
        elif residual.shape != X.shape:
            raise ValueError(f"HebbianSubspace.step: residual {tuple(residual.shape)} does not match the activity "
                             f"{tuple(X.shape)}")
        for _ in range(self.iterations):
            Y = X @ H_new.T
            delta = Y.T @ (residual - Y @ H_new) / X.shape[0]
            if self.clip is not None:
                delta.clamp_(-self.clip, self.clip)
            M = mu * M + (1.0 - mu) * delta
            H_new += self.lr * M
        self.weight, self._buffer = torch.cat([self.weight[:k0], H_new]), M

    @torch.no_grad()
    def fit(self, R: Tensor, batch_size: int = 64, epochs: int = 1, generator: torch.Generator | None = None) -> None:
        """Run :meth:`step` over the columns of a representation matrix R (d × n, see
        :mod:`clbench.subspace.inputs`) in batches of ``batch_size`` columns, ``epochs`` times, in an order
        shuffled by ``generator`` (in column order when it is ``None``)."""
        if R.dim() != 2 or R.shape[0] != self.dim:
            raise ValueError(f"HebbianSubspace.fit: R must be {self.dim} × n, got {tuple(R.shape)}")
        n = R.shape[1]
        X = R.T
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(R.device) if generator is not None else None
            for start in range(0, n, batch_size):
                idx = slice(start, start + batch_size)
                self.step(X[idx] if order is None else X[order[idx]])

    def project(self, v: Tensor) -> Tensor:
        """v − (v H_oldᵀ) H_old for row vectors v (…, d): the projected trace x − H_oldᵀ H_old x of activities,
        or G (I − H_oldᵀ H_old) of a weight gradient G (out × d) (hlop.md step 4a). v itself without old rows."""
        if self.n_old == 0:
            return v
        H = self.old.to(device=v.device, dtype=v.dtype)
        return v - (v @ H.T) @ H

    def basis(self, which: str = "all", min_norm: float = 1e-3) -> Tensor:
        """Orthonormal basis (d × r columns, H's dtype) of the subspace the rows span, for the SVD route's
        consumers (:class:`~clbench.subspace.projection.LayerProjector`, principal angles).

        ``which``: ``"old"`` (span(H_old)), ``"new"`` (the new rows with their span(H_old) component removed:
        what the current task adds) or ``"all"`` (``"old"`` then ``"new"``). Directions whose singular value is
        at most ``min_norm`` are dropped (e.g. new rows that have collapsed onto old ones), so r ≤ the row count.
        """
        if which not in ("all", "old", "new"):
            raise ValueError(f"HebbianSubspace.basis: which must be 'all', 'old' or 'new', got {which!r}")
        old = _span(self.old, min_norm)
        if which == "old":
            return old.to(self.weight.dtype)
        rest = self.new.to(torch.float64).T
        for _ in range(2):  # remove the span(H_old) component (twice for orthogonality to rounding)
            rest = rest - old @ (old.T @ rest)
        new = _span(rest.T, min_norm)
        return (new if which == "new" else torch.cat([old, new], dim=1)).to(self.weight.dtype)

    def projector_eigenvalues(self) -> Tensor:
        """The nonzero eigenvalues of P = H_oldᵀ H_old (descending, float64): the squared singular values of
        H_old. A projector has them all equal to 1; values above 1 mean under-converged rows (hlop.md)."""
        return torch.linalg.svdvals(self.old.to(torch.float64)) ** 2

    def orthonormality_error(self, which: str = "all") -> float:
        """max |H Hᵀ − I| over the rows ``which`` (``"all"``, ``"old"``, ``"new"``); 0 for no rows."""
        H = {"all": self.weight, "old": self.old, "new": self.new}[which].to(torch.float64)
        if H.shape[0] == 0:
            return 0.0
        return float((H @ H.T - torch.eye(H.shape[0], dtype=H.dtype, device=H.device)).abs().max())

    def state_dict(self) -> dict[str, Any]:
        """The learner's state (rows, frozen count, momentum) on the CPU."""
        return {"weight": self.weight.detach().cpu(), "n_old": self.n_old, "momentum": self._buffer.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` onto this learner's device and dtype."""
        device, dtype = self.weight.device, self.weight.dtype
        weight, n_old = state["weight"], int(state["n_old"])
        if weight.dim() != 2 or weight.shape[1] != self.dim or not 0 <= n_old <= weight.shape[0]:
            raise ValueError(f"HebbianSubspace.load_state_dict: weight {tuple(weight.shape)} with n_old={n_old} "
                             f"does not fit d={self.dim}")
        self.weight = weight.to(device=device, dtype=dtype)
        self.n_old = n_old
        self._buffer = state["momentum"].to(device=device, dtype=dtype)

    def to(self, device: torch.device | str) -> HebbianSubspace:
        """Move H and the momentum to ``device`` (in place); returns self."""
        self.weight = self.weight.to(device)
        self._buffer = self._buffer.to(device)
        return self


def hebbian_extend(old: Tensor | None, R: Tensor, rows: int, *, lr: float = 0.01, momentum: float = 0.9,
                   iterations: int = 5, clip: float | None = 10.0, batch_size: int = 64, epochs: int = 1,
                   generator: torch.Generator | None = None, orthogonal_to_old: bool = False) -> Tensor:
    """The Hebbian counterpart of :func:`~clbench.subspace.basis.extend_basis`: [M_old, M_new] (d × (k + r)).

    ``old`` (d × k, orthonormal columns, or ``None``) becomes the frozen rows H_old = M_oldᵀ; ``rows`` new
    subspace neurons (capped at d − k) learn with Oja's subspace rule (hlop.md steps 1, 4b) on the columns of R
    (d × n) for ``epochs`` passes in batches of ``batch_size`` (see :meth:`HebbianSubspace.fit`); the result is
    ``old`` followed by :meth:`HebbianSubspace.basis` ``("new")``: orthonormal, orthogonal to ``old``, in R's
    dtype and device. Its quality depends on convergence (η·E‖x‖², epochs): check it by principal angles to
    :func:`~clbench.subspace.basis.top_singular` of the residual R − M_old M_oldᵀ R.
    """
    d = R.shape[0]
    dtype = R.dtype if R.dtype in (torch.float32, torch.float64) else torch.float32
    frozen = R.new_zeros((d, 0), dtype=dtype) if old is None else old.to(device=R.device, dtype=dtype)
    learner = HebbianSubspace.from_basis(frozen, lr=lr, momentum=momentum, iterations=iterations, clip=clip)
    learner.add_rows(rows, generator=generator, orthogonal_to_old=orthogonal_to_old)
    learner.fit(R, batch_size=batch_size, epochs=epochs, generator=generator)
    return torch.cat([frozen, learner.basis("new")], dim=1)
