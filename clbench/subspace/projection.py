"""Projection of weight gradients onto the complement of a memory (GPM, Saha et al. ICLR 2021, Eqs. 6-7).

A weight W ∈ R^{out×d} (conv weights flattened to out × C_in·kh·kw, the order of ``weight.view(out, -1)``)
with memory M ∈ R^{d×k} (orthonormal columns) is updated only in span(M)^⊥:

    g ← g − (g M) Mᵀ = g (I − M Mᵀ)                                            (Eqs. 6-7)

The paper's Eq. 7 multiplies from the left because it stores conv weights transposed; the result is the same.
With C ∈ R^{d×(d−k)} an orthonormal basis of span(M)^⊥, I − M Mᵀ = C Cᵀ, so g (I − M Mᵀ) = (g C) Cᵀ, which is
cheaper when k > d/2. Two ways to apply it:

* **gradient form** — after backward, project the flattened weight gradient in place.
  Cost ∝ out·d·min(k, d − k).
* **input form** (``nn.Linear`` only) — for y = x Wᵀ + b the weight gradient is ∇W = δᵀ x (δ = ∂L/∂y, one row
  per sample), so ∇W (I − M Mᵀ) = δᵀ (x (I − M Mᵀ)): the projected gradient is obtained directly from
  projected inputs. Cost ∝ batch·d·min(k, d − k), cheaper when batch < out. ∂L/∂x = δ W and ∂L/∂b = Σ δ
  are unchanged (GPM projects no bias).

Both forms give the same gradient; :class:`LayerProjector` picks one per layer by cost.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.subspace.basis import orthonormal_complement

__all__ = ["FORMS", "LayerProjector", "project_out"]

FORMS = ("auto", "gradient", "input")

INPUT_FORM_OVERHEAD = 1_000_000
"""The input form's fixed cost per step in multiply-adds: its custom autograd function costs ~70 µs of Python
a layer on the CPU (benchmarks/projection.py), about 1e6 multiply-adds there. So "auto" keeps the gradient
form for small layers, where projecting the gradient costs less than that overhead."""


def project_out(g: Tensor, M: Tensor) -> Tensor:
    """Return g (I − M Mᵀ) (GPM Eqs. 6-7) for a weight-shaped gradient g.

    ``g`` has shape (out, …) with prod(…) = d (a Linear gradient (out, d) or a conv gradient
    (out, C, kh, kw)); ``M`` is d × k with orthonormal columns. The result has g's shape and dtype.
    """
    out = g.shape[0]
    g2 = g.reshape(out, -1)
    if M.shape[0] != g2.shape[1]:
        raise ValueError(f"project_out: gradient has d={g2.shape[1]} but the basis has {M.shape[0]} rows")
    if M.shape[1] == 0:
        return g.clone()
    Mg = M.to(device=g.device, dtype=g.dtype)
    return (g2 - (g2 @ Mg) @ Mg.T).reshape(g.shape)


def _apply_projection(rows: Tensor, P: Tensor, complement: bool) -> Tensor:
    """rows (I − M Mᵀ): ``rows − (rows M) Mᵀ`` with P = M, or ``(rows C) Cᵀ`` with P = C the complement."""
    if complement:
        return (rows @ P) @ P.T
    return rows - (rows @ P) @ P.T


class _ProjectedLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b whose backward returns the weight gradient δᵀ x (I − M Mᵀ) (input form of Eqs. 6-7)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, P: Tensor, complement: bool
    ) -> Tensor:
        ctx.save_for_backward(x, weight, P)
        ctx.complement = complement
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, P = ctx.saved_tensors
        out, d = weight.shape
        delta = grad_out.reshape(-1, out).to(weight.dtype)  # autocast may hand a lower precision here
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (delta @ weight).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, d).to(weight.dtype)
            grad_w = delta.T @ _apply_projection(x2, P, ctx.complement)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = delta.sum(0)
        return grad_x, grad_w, grad_b, None, None


class LayerProjector:
    """Projects one layer's weight gradient onto span(M)^⊥ (GPM Eqs. 6-7), in the cheaper of two forms.

    Args:
        module: the layer; its ``weight`` has shape (out, …) with prod(…) = d.
        basis: M, d × k with orthonormal columns (k = 0: every method is a no-op).
        form: ``"gradient"`` (project ``weight.grad`` after backward), ``"input"`` (``nn.Linear`` only: build
            the weight gradient from projected inputs, see the module docstring) or ``"auto"``: input when the
            module is ``nn.Linear``, ``batch_size`` is known and batch·d·m + overhead < out·d·m
            (m = min(k, d − k); overhead = :data:`INPUT_FORM_OVERHEAD`), gradient otherwise.
        batch_size: the training batch size (rows per step), used by ``"auto"``.
        orthonormal: M has orthonormal columns (GPM). ``False`` (HLOP's Hebbian rows H_oldᵀ, whose H_oldᵀH_old
            is a projector only once the rule has converged): the projection is ``g − (g M) Mᵀ`` exactly as
            written, and the complement shortcut below, which assumes a projector, is never taken.

    The projector stores M, or C (a basis of span(M)^⊥) when k > d/2 since g (I − M Mᵀ) = (g C) Cᵀ, in the
    weight's dtype and device (re-cast once if the module moves). Use: ``attach()`` once before training the
    task, ``project_()`` after each backward (and after any gradient all-reduce), ``detach()`` at the end.
    """

    def __init__(self, module: nn.Module, basis: Tensor, form: str = "auto", batch_size: int | None = None,
                 orthonormal: bool = True):
        if form not in FORMS:
            raise ValueError(f"LayerProjector: form must be one of {FORMS}, got {form!r}")
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(f"LayerProjector: {type(module).__name__} has no weight tensor")
        d = weight[0].numel()
        if basis.dim() != 2 or basis.shape[0] != d:
            raise ValueError(
                f"LayerProjector: basis must be {d} × k for this layer, got {tuple(basis.shape)}"
            )
        k = basis.shape[1]
        if k > d:
            raise ValueError(f"LayerProjector: basis has {k} columns, more than d={d}")
        if form == "auto":
            linear = isinstance(module, nn.Linear)
            m = min(k, d - k) if orthonormal else k
            use_input = linear and batch_size is not None and (
                batch_size * d * m + INPUT_FORM_OVERHEAD < weight.shape[0] * d * m)
            form = "input" if use_input else "gradient"
        elif form == "input" and not isinstance(module, nn.Linear):
            raise ValueError(f"LayerProjector: the input form needs nn.Linear, got {type(module).__name__}")
        self.module = module
        self._form = form
        self._dim = d
        self._rank = k
        self._basis = basis.detach()
        self._complement = orthonormal and 2 * k > d
        P = orthonormal_complement(basis.detach()) if self._complement else basis.detach()
        self._P = P.to(device=weight.device, dtype=weight.dtype).contiguous()
        self._attached = False

    @property
    def form(self) -> str:
        """``"gradient"`` or ``"input"`` (``"auto"`` resolved)."""
        return self._form

    @property
    def rank(self) -> int:
        """k, the number of protected directions."""
        return self._rank

    @property
    def dim(self) -> int:
        """d, the flattened input dimension of the weight."""
        return self._dim

    @property
    def basis(self) -> Tensor:
        """The memory M (d × k) as given."""
        return self._basis

    def _matrix(self, like: Tensor) -> Tensor:
        if self._P.device != like.device or self._P.dtype != like.dtype:
            self._P = self._P.to(device=like.device, dtype=like.dtype)
        return self._P

    def project(self, g: Tensor) -> Tensor:
        """Return g (I − M Mᵀ) for a weight-shaped gradient g (pure; g itself when k = 0)."""
        if self._rank == 0:
            return g
        g2 = g.reshape(g.shape[0], -1)
        return _apply_projection(g2, self._matrix(g), self._complement).reshape(g.shape)

    def project_(self) -> None:
        """Project ``module.weight.grad`` in place (gradient form; a no-op for an attached input form)."""
        if self._rank == 0 or (self._form == "input" and self._attached):
            return
        grad = self.module.weight.grad
        if grad is None:
            return
        g2 = grad.view(grad.shape[0], -1)
        P = self._matrix(grad)
        if self._complement:
            g2.copy_((g2 @ P) @ P.T)
        else:
            g2.sub_((g2 @ P) @ P.T)

    def _forward(self, x: Tensor) -> Tensor:
        module = self.module
        weight: Tensor = module.weight
        bias: Tensor | None = module.bias  # type: ignore[assignment]
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return F.linear(x, weight, bias)
        return _ProjectedLinearFn.apply(x, weight, bias, self._matrix(weight), self._complement)

    def attach(self) -> None:
        """Input form: make this module instance compute projected weight gradients; otherwise a no-op."""
        if self._form != "input" or self._rank == 0 or self._attached:
            return
        self.module.forward = self._forward  # instance attribute shadows the class's forward
        self._attached = True

    def detach(self) -> None:
        """Restore the module's class ``forward`` (idempotent)."""
        if self._attached:
            if self.module.__dict__.get("forward") == self._forward:
                del self.module.forward
            self._attached = False
