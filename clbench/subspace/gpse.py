"""GPSE (global principal subspace extraction) and FedProject of FOT (Bakman et al., ICLR 2024; fot.md §2).

Notation (fot.md §2). Layer l has a weight W ∈ R^{out×d} (conv: d = C_in·kh·kw) and the global basis
U ∈ R^{d×k} (orthonormal columns, k = 0 on task 1). A_k ∈ R^{d×N_k} holds client k's layer inputs as columns
(conv: every patch) over its local training samples of the task, see :mod:`clbench.subspace.inputs`.

**Client** (fot.md §2 step 5, :class:`ResidualSketcher`)::

    R_k = A_k − U Uᵀ A_k              residual outside the global subspace (GPM Eq. 8)
    ρ_k = ‖R_k‖_F / ‖A_k‖_F           (1 on task 1)
    Y_k = R_k G_k,  G_k ∈ R^{N_k×m}   private random matrix, i.i.d. N(0, 1) or U[−1, 1]

G_k is drawn in row chunks while the columns of A_k stream in, so neither G_k nor R_k is ever held in full
(fot.md pitfall 3) and the message — Y_k (d × m) and two scalars — has no dimension equal to N_k.

**Server** (fot.md §2 step 6, :func:`expand_basis`)::

    Y = Σ_k Y_k = R G,  R = [R_1 … R_K],  G = [G_1; …; G_K]      (a secure sum, :mod:`.secure_sum`)
    ρ̄ = Σ_k n_k ρ_k / Σ_k n_k
    ε′ = (ρ̄ − (1 − ε)) / ρ̄                                     (= ε on task 1)
    Y = Ũ Σ̃ Ṽᵀ;  r = the smallest r with Σ_{j≤r} σ̃_j² / ‖Y‖_F² > ε′
    U ← orthonormalised [U, Ũ_{:, 1:r}]

Why it works ([P] Theorem 1; Halko et al. 2011): col(R G) = col(R) almost surely when m ≥ rank R, and
E[G Gᵀ] = c·I gives E[Y Yᵀ] = c·m·R Rᵀ, so Ũ and σ̃²/‖Y‖² estimate R's singular vectors and energy fractions.
With the exact R the rule is GPM's memory update (GPM Eq. 9) ‖U Uᵀ A‖² + Σ_{j≤r} σ_j(R)² ≥ ε ‖A‖², divided
by ‖R‖² using ‖U Uᵀ A‖² = ‖A‖² − ‖R‖² — *provided* ρ is the squared ratio ‖R‖²/‖A‖² pooled over clients.

**FedProject** (fot.md §2 step 4, :func:`project_update`): the aggregated update Δ = θ̄ − θ of every projected
layer loses its component in span(U): Δ_l ← Δ_l − Δ_l U_l U_lᵀ (GPM Eqs. 6-7 applied to Δ).

**Flags** (:class:`GPSEConfig`; defaults = the official code, duygunuryldz/Federated_Orthogonal_Training):

* ``ratio="norm"``: ρ_k = ‖R_k‖/‖A_k‖ as in the code; ``"squared"`` uses ‖R_k‖²/‖A_k‖², the GPM-consistent
  ratio (see "Why"). With a norm ratio ε′ is larger, so GPSE keeps more directions than GPM would.
* ``ratio_mean="samples"``: ρ̄ = Σ n_k ρ_k / Σ n_k as in the code (n_k = the client's column count, which is
  its sample count times the positions per sample, the same weights); ``"pooled"``: ρ̄² = Σ‖R_k‖²/Σ‖A_k‖²
  (ρ̄ its square root with ``ratio="norm"``), the pooled ratio, exact and equally summable.
* ``sketch="gaussian"``: G_k i.i.d. N(0, 1) as in the code's CIFAR-100, 5-Datasets and mini-ImageNet trainers;
  ``"uniform"``: U[−1, 1] as in its PMNIST trainer; ``"gram"`` (not in [P]): the client sends R_k R_kᵀ
  (d × d), whose sum is exactly R Rᵀ, so the server's basis is the pooled GPM basis (fot.md §7 test 3-4).
* ``always_add=True``: the code's loop adds at least one direction even when ε′ ≤ 0 (the old basis already
  holds a fraction ε of the energy); GPM (``False``) adds none then.

``GPSEConfig(ratio="squared", ratio_mean="pooled", always_add=False)`` with ``sketch="gram"`` reproduces
centralized GPM on the pooled activations (paper count, not the GPM code's first-task off-by-one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from clbench.subspace.basis import extend_basis
from clbench.subspace.projection import project_out

__all__ = [
    "RATIOS",
    "RATIO_MEANS",
    "SKETCHES",
    "GPSEConfig",
    "LayerSketch",
    "ResidualSketcher",
    "client_sketch",
    "effective_threshold",
    "expand_basis",
    "mean_ratio",
    "pack_sketches",
    "project_update",
    "sum_sketches",
    "unpack_sketches",
]

SKETCHES = ("gaussian", "uniform", "gram")
RATIOS = ("norm", "squared")
RATIO_MEANS = ("samples", "pooled")

_FIELDS = ("sketch", "ratio_num", "ratio_den")


@dataclass(frozen=True)
class GPSEConfig:
    """The GPSE variant, shared by clients and server (see the module docstring for each flag)."""

    sketch: str = "gaussian"
    ratio: str = "norm"
    ratio_mean: str = "samples"
    always_add: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("sketch", SKETCHES), ("ratio", RATIOS), ("ratio_mean", RATIO_MEANS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPSEConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")


@dataclass(frozen=True, eq=False)
class LayerSketch:
    """One layer's GPSE message of a client, or the sum of several clients' messages.

    ``sketch``: Y_k = R_k G_k (d × m), or R_k R_kᵀ (d × d) in gram mode; float64.
    ``ratio_num`` / ``ratio_den``: the two summable scalars whose sums give ρ̄ (:func:`mean_ratio`):
    n_k·ρ_k and n_k (``ratio_mean="samples"``), or ‖R_k‖²_F and ‖A_k‖²_F (``"pooled"``).
    Every field is additive, so the sum of messages is the message of the pooled clients.
    """

    sketch: Tensor
    ratio_num: float
    ratio_den: float

    def __add__(self, other: LayerSketch) -> LayerSketch:
        if self.sketch.shape != other.sketch.shape:
            raise ValueError(f"LayerSketch: shapes differ, {tuple(self.sketch.shape)} vs {tuple(other.sketch.shape)}")
        return LayerSketch(
            self.sketch + other.sketch.to(self.sketch.device),
            self.ratio_num + other.ratio_num,
            self.ratio_den + other.ratio_den,
        )


def pack_sketches(sketches: Mapping[str, LayerSketch]) -> dict[str, Tensor]:
    """Flatten a client's upload {layer: LayerSketch} to named float64 tensors ``"<layer>/<field>"`` (for
    :mod:`.secure_sum`, a transport record or byte counting); scalars become 0-d tensors."""
    out: dict[str, Tensor] = {}
    for layer, s in sketches.items():
        out[f"{layer}/sketch"] = s.sketch.to(torch.float64)
        out[f"{layer}/ratio_num"] = torch.tensor(s.ratio_num, dtype=torch.float64)
        out[f"{layer}/ratio_den"] = torch.tensor(s.ratio_den, dtype=torch.float64)
    return out


def unpack_sketches(tensors: Mapping[str, Tensor]) -> dict[str, LayerSketch]:
    """Inverse of :func:`pack_sketches`."""
    fields: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        layer, _, field = key.rpartition("/")
        if field not in _FIELDS or not layer:
            raise ValueError(f"unpack_sketches: unexpected key {key!r}")
        fields.setdefault(layer, {})[field] = value
    out: dict[str, LayerSketch] = {}
    for layer, f in fields.items():
        missing = [name for name in _FIELDS if name not in f]
        if missing:
            raise ValueError(f"unpack_sketches: layer {layer!r} lacks {missing}")
        out[layer] = LayerSketch(f["sketch"], float(f["ratio_num"]), float(f["ratio_den"]))
    return out


def sum_sketches(uploads: Iterable[Mapping[str, LayerSketch]]) -> dict[str, LayerSketch]:
    """Plain per-layer sum of the clients' uploads (honest-server mode; see :mod:`.secure_sum` otherwise)."""
    total: dict[str, LayerSketch] = {}
    layers: set[str] | None = None
    for upload in uploads:
        if layers is None:
            layers = set(upload)
        elif set(upload) != layers:
            raise ValueError(f"sum_sketches: uploads name different layers, {sorted(layers)} vs {sorted(upload)}")
        for layer, s in upload.items():
            total[layer] = total[layer] + s if layer in total else s
    if layers is None:
        raise ValueError("sum_sketches: no uploads")
    return total


class ResidualSketcher:
    """Client side of GPSE for one layer (fot.md §2 step 5): stream A_k in column blocks, return Y_k and ρ_k.

    Args:
        basis: the global U (d × k, orthonormal) the server sent at the start of the round, or None (task 1).
        sketch_dim: m, the sketch width (the code: m = d for the MLP and AlexNet convs, 5d for AlexNet fc
            layers and every ResNet layer). Every client must use the same m per layer. Unused in gram mode.
        generator: the client's private generator for G_k; G_k is drawn on its device, then moved to A's
            (pass a CUDA generator for CUDA activations). Unused in gram mode.
        config: the GPSE variant.
        chunk_elements: ~ the number of float64 entries of one chunk of G_k (and of A_k): columns are handled
            ``max(1, chunk_elements // max(d, m))`` at a time (2²² entries = 32 MiB).

    ``update(A)`` accepts any number of calls with d × n blocks (e.g. per batch, via
    :func:`clbench.subspace.layer_input_matrix`); :meth:`message` returns the layer's :class:`LayerSketch`.
    All arithmetic is float64. Y_k depends on how the columns are blocked (G_k's rows come from the
    generator chunk by chunk), but its distribution does not.
    """

    def __init__(
        self,
        basis: Tensor | None,
        sketch_dim: int | None,
        generator: torch.Generator | None,
        config: GPSEConfig | None = None,
        chunk_elements: int = 2**22,
    ):
        self.config = config or GPSEConfig()
        if self.config.sketch != "gram":
            if sketch_dim is None or sketch_dim < 1:
                raise ValueError(f"ResidualSketcher: sketch_dim must be >= 1, got {sketch_dim}")
            if generator is None:
                raise ValueError("ResidualSketcher: a random sketch needs the client's private generator")
        if chunk_elements < 1:
            raise ValueError(f"ResidualSketcher: chunk_elements must be >= 1, got {chunk_elements}")
        if basis is not None and basis.dim() != 2:
            raise ValueError(f"ResidualSketcher: basis must be d × k, got shape {tuple(basis.shape)}")
        self._basis = basis if basis is not None and basis.shape[1] > 0 else None
        self._dim = None if basis is None else basis.shape[0]
        self._sketch_dim = sketch_dim
        self._generator = generator
        self._chunk_elements = chunk_elements
        self._Y: Tensor | None = None
        self._energy = 0.0
        self._residual = 0.0
        self._columns = 0

    @property
    def columns(self) -> int:
        """N_k so far: the number of columns (layer inputs, or conv patches) seen."""
        return self._columns

    def _draw(self, rows: int, device: torch.device) -> Tensor:
        gen = self._generator
        assert gen is not None and self._sketch_dim is not None
        shape = (rows, self._sketch_dim)
        if self.config.sketch == "gaussian":
            G = torch.randn(shape, generator=gen, dtype=torch.float64, device=gen.device)
        else:
            G = torch.rand(shape, generator=gen, dtype=torch.float64, device=gen.device) * 2.0 - 1.0
        return G.to(device)

    def update(self, A: Tensor) -> None:
        """Add the columns of A (d × n): R = A − U(UᵀA), ‖A‖², ‖R‖², and Y_k += R G (gram: R Rᵀ)."""
        if A.dim() != 2:
            raise ValueError(f"ResidualSketcher.update: A must be d × n, got shape {tuple(A.shape)}")
        d, n = A.shape
        if self._dim is None:
            self._dim = d
        elif d != self._dim:
            raise ValueError(f"ResidualSketcher.update: A has {d} rows, expected {self._dim}")
        gram = self.config.sketch == "gram"
        width = d if gram else max(d, self._sketch_dim or 1)
        if self._Y is None:
            self._Y = torch.zeros((d, d if gram else self._sketch_dim), dtype=torch.float64, device=A.device)
        U = None if self._basis is None else self._basis.to(device=A.device, dtype=torch.float64)
        step = max(1, self._chunk_elements // width)
        for start in range(0, n, step):
            block = A[:, start : start + step].detach().to(torch.float64)
            energy = float(block.square().sum())
            self._energy += energy
            if U is None:
                residual_block, residual = block, energy
            else:
                residual_block = block - U @ (U.T @ block)  # GPM Eq. 8
                residual = float(residual_block.square().sum())
            self._residual += residual
            if gram:
                self._Y += residual_block @ residual_block.T
            else:
                self._Y += residual_block @ self._draw(block.shape[1], A.device)
        self._columns += n

    def message(self) -> LayerSketch:
        """The layer's message: Y_k and the two ratio scalars chosen by ``config`` (see :class:`LayerSketch`)."""
        if self._Y is None or self._columns == 0:
            raise RuntimeError("ResidualSketcher.message: no activations were added")
        cfg = self.config
        if cfg.ratio_mean == "pooled":
            return LayerSketch(self._Y, self._residual, self._energy)
        rho2 = 1.0  # task 1: R = A
        if self._basis is not None:
            rho2 = self._residual / self._energy if self._energy > 0 else 0.0
        rho = rho2 if cfg.ratio == "squared" else math.sqrt(rho2)
        return LayerSketch(self._Y, self._columns * rho, float(self._columns))


def client_sketch(
    A: Tensor,
    basis: Tensor | None,
    sketch_dim: int | None,
    generator: torch.Generator | None,
    config: GPSEConfig | None = None,
    chunk_elements: int = 2**22,
) -> LayerSketch:
    """One layer's client message from its whole activation matrix A_k (d × N_k): a one-shot
    :class:`ResidualSketcher` (which still never forms G_k in full)."""
    sketcher = ResidualSketcher(basis, sketch_dim, generator, config, chunk_elements)
    sketcher.update(A)
    return sketcher.message()


def mean_ratio(total: LayerSketch, config: GPSEConfig | None = None) -> float:
    """ρ̄ from the summed scalars: Σ n_k ρ_k / Σ n_k ("samples"), or Σ‖R_k‖²/Σ‖A_k‖² ("pooled"; its square
    root with ``ratio="norm"``)."""
    cfg = config or GPSEConfig()
    if total.ratio_den <= 0:
        raise ValueError(f"mean_ratio: the summed denominator must be > 0, got {total.ratio_den}")
    value = total.ratio_num / total.ratio_den
    return math.sqrt(value) if cfg.ratio_mean == "pooled" and cfg.ratio == "norm" else value


def effective_threshold(threshold: float, rho_bar: float) -> float:
    """ε′ = (ρ̄ − (1 − ε)) / ρ̄ (fot.md §2 step 6): the fraction of the residual's energy to keep so that the
    old basis plus the new directions hold a fraction ε of the whole (GPM Eq. 9 when ρ̄ = ‖R‖²/‖A‖²)."""
    if rho_bar <= 0:
        raise ValueError(f"effective_threshold: rho_bar must be > 0, got {rho_bar}")
    return (rho_bar - (1.0 - threshold)) / rho_bar


def _factor(total: LayerSketch, config: GPSEConfig) -> Tensor:
    """A matrix F with F Fᵀ ∝ the server's estimate of R Rᵀ: Y itself, or (gram mode) V diag(√λ) from the
    eigendecomposition of the summed Σ R_k R_kᵀ = V diag(λ) Vᵀ."""
    S = total.sketch.to(torch.float64)
    if config.sketch != "gram":
        return S
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"expand_basis: a gram sketch must be d × d, got {tuple(S.shape)}")
    evals, evecs = torch.linalg.eigh((S + S.T) / 2)
    return evecs * evals.clamp_min(0.0).sqrt()


def expand_basis(
    basis: Tensor | None,
    total: LayerSketch,
    threshold: float,
    config: GPSEConfig | None = None,
    method: str = "svd",
) -> Tensor:
    """Server side of GPSE for one layer (fot.md §2 step 6): the extended global basis, float64 d × k′.

    ``basis`` is the U the clients used for their residuals (None on task 1), ``total`` the sum of their
    messages, ``threshold`` the task's ε. With ρ̄ = :func:`mean_ratio` and ε′ = :func:`effective_threshold`,
    r is the smallest count with Σ_{j≤r} σ̃_j² ≥ ε′ ‖Y‖² — :func:`clbench.subspace.extend_basis` on Y with the
    paper's count (the code's strict ">" differs only at exact ties). extend_basis also re-projects Y off U
    before its SVD (``method``, float64), orthonormalises the new columns against U (the code: QR of
    [U, Ũ_r]) and caps the basis at d columns. If ε′ ≤ 0 the code adds the top direction (``always_add``)
    and GPM nothing. The old columns are kept as they are; the new ones are orthogonal to them.
    """
    cfg = config or GPSEConfig()
    d = total.sketch.shape[0]
    M = None if basis is None else basis.to(device=total.sketch.device, dtype=torch.float64)
    if M is not None and M.shape[0] != d:
        raise ValueError(f"expand_basis: the basis has {M.shape[0]} rows but the sketch {d}")
    unchanged = total.sketch.new_zeros((d, 0), dtype=torch.float64) if M is None else M
    rho_bar = mean_ratio(total, cfg)
    if rho_bar <= 0:  # nothing of the new activations lies outside span(U)
        return unchanged
    eps_prime = effective_threshold(threshold, rho_bar)
    F = _factor(total, cfg)
    if eps_prime > 0:
        return extend_basis(M, F, eps_prime, rule="paper", method=method)
    if cfg.always_add:
        k = 0 if M is None else M.shape[1]
        return extend_basis(M, F, 1.0, rule="paper", method=method, max_dim=k + 1)
    return unchanged


def project_update(update: Mapping[str, Tensor], bases: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
    """FedProject (fot.md §2 step 4): Δ_l ← Δ_l − Δ_l U_l U_lᵀ for every layer named in ``bases``.

    ``update`` maps parameter names to the aggregated update Δ = θ̄ − θ (weights of shape (out, …), conv
    weights flattened by :func:`clbench.subspace.project_out`). The projection is computed in float64 and
    cast back to Δ's dtype. Entries not in ``bases`` (biases, norm layers, task heads), and layers whose
    basis is None or has no columns, are passed through as the same tensor objects, so with no bases the
    result is bit-identical to FedAvg's update (fot.md §7 test 1). Returns a new dict.
    """
    out = dict(update)
    for name, U in bases.items():
        if name not in update:
            raise KeyError(f"project_update: no update for the projected layer {name!r}")
        if U is None or U.shape[1] == 0:
            continue
        delta = update[name]
        out[name] = project_out(delta.to(torch.float64), U.to(torch.float64)).to(delta.dtype)
    return out


def sketch_shapes(
    state: Mapping[str, Tensor], layers: Iterable[str], factor: int | Mapping[str, int] = 1
) -> dict[str, tuple[int, int]]:
    """(d_l, m_l) of each projected layer: d_l = the weight's fan-in (``weight[0].numel()``, conv: C·kh·kw),
    m_l = factor·d_l (``factor`` one int or per layer; the code: 1 or 5, see the module docstring)."""
    out: dict[str, tuple[int, int]] = {}
    for name in layers:
        if name not in state:
            raise KeyError(f"sketch_shapes: {name!r} is not in the state dict")
        d = state[name][0].numel()
        f = factor[name] if isinstance(factor, Mapping) else factor
        if f < 1:
            raise ValueError(f"sketch_shapes: factor for {name!r} must be >= 1, got {f}")
        out[name] = (d, f * d)
    return out
