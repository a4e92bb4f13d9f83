"""The maths of O3's per-request OOD detector (Gao et al. 2024; ../shared/methods/o3.md §2-§4), as pure functions
and small fitted objects on tensors and arrays. No model, no tokenizer, no training loop.

* **Contrastive entropy loss** (o3.md §2). For hidden state l, Qˡ (B × d) pools the LoRA encoder on the masked
  batch and Kˡ (B × d) the frozen encoder on the clean batch, row j of both from sample j. With raw dot products
  and no temperature, Pˡ = row-softmax(Qˡ Kˡᵀ) and

      L_CEL = Σ_l (1/B) Σ_j H(Pˡ_j),   H(p) = −Σ_i p_i log(p_i + ε),  ε = 1e-5.           (:func:`contrastive_entropy`)

* **Local-global layer score** (o3.md §3), fitted per layer l on the training split's features z_l:
  the mean μ_l, the precision Σ_l⁻¹ (the pseudo-inverse of the empirical covariance, scikit-learn's
  ``EmpiricalCovariance`` as the code uses) and the bank F_l of L2-normalised training features;

      s_l(x) = −1000 · max_{f∈F_l} cos(z_l, f) − ½ (z_l − μ_l)ᵀ Σ_l⁻¹ (z_l − μ_l)              (:class:`LayerScore`)

  (local = nearest-neighbour cosine, global = Mahalanobis; either alone is O3's ablation).
* **Aggregation** (o3.md §3): a linear One-Class SVM on s(x) ∈ R^L; g(x) is its ``score_samples`` (ScienceQA) or
  ``decision_function`` (TOFU).                                                              (:class:`Aggregator`)
* **Soft weight** (o3.md §4): from g on the train split (mean m_a) and the held-out ID split (mean m_b, standard
  deviation σ_b),

      F(y) = ½ Φ((y − m_a)/σ_b) + ½ Φ((y − m_b)/σ_b),   x0 = (m_a + m_b)/2,
      c(g) = 1 − |F(g) − F(2x0 − g)|,   w̃ = sigmoid(10 c − 2) ∈ (σ(−2), σ(8)] ≈ (0.119, 0.9997].   (:class:`WeightMap`)

* **Quantiser** (o3.md §4's hand-tuned tables as data, :class:`Quantiser`, presets :data:`SCIENCEQA` and
  :data:`TOFU`), and w(x) = max_i w_i(x) over the detectors of all requests so far (:func:`max_over_detectors`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.special import expit, ndtr
from torch import Tensor

CEL_EPS = 1e-5
"""ε inside the logarithm of H(p) (the code's)."""

LOCAL_SCALE = 1000.0
"""The weight of the cosine (local) term of s_l (the code's)."""

SVM_SCORES = ("score_samples", "decision_function")


def contrastive_entropy(q_layers: Sequence[Tensor], k_layers: Sequence[Tensor], eps: float = CEL_EPS) -> Tensor:
    """L_CEL = Σ_l (1/B) Σ_j H(row-softmax(Qˡ Kˡᵀ)_j), H(p) = −Σ_i p_i log(p_i + ε) (o3.md §2).

    ``q_layers[l]`` and ``k_layers[l]`` are (B × d_l) with row j from the same sample; the gradient flows through
    both (the caller passes detached keys for a frozen key encoder). Raw dot products, no temperature; p log(p+ε)
    is taken as 0 where p = 0 (``torch.xlogy``), so an underflowed softmax stays finite.

    Range: with ε > 0, log(p_i + ε) ≥ log p_i gives H(p) ≤ −Σ p_i log p_i ≤ log B, and Σ p_i log(p_i + ε) ≤
    log(1 + ε) gives H(p) ≥ −log(1 + ε) ≈ −1e-5, with equality exactly for one-hot rows. So
    L_CEL ∈ [−L·log(1 + ε), L·log B]; with ε = 0 it is Shannon entropy, in [0, L·log B] and 0 only when every row
    of every Pˡ is one-hot. A joint permutation of the rows of Qˡ and Kˡ permutes the rows and columns of Pˡ,
    which leaves the mean of the row entropies unchanged.

    Raises:
        ValueError: no layers, unequal numbers of layers, or a layer whose Q and K differ in shape.
    """
    if not q_layers or len(q_layers) != len(k_layers):
        raise ValueError(f"contrastive_entropy: {len(q_layers)} query layers and {len(k_layers)} key layers; give "
                         "the same number >= 1")
    total = q_layers[0].new_zeros(())
    for layer, (q, k) in enumerate(zip(q_layers, k_layers, strict=True)):
        if q.ndim != 2 or q.shape != k.shape:
            raise ValueError(f"contrastive_entropy: layer {layer} has Q {tuple(q.shape)} and K {tuple(k.shape)}; "
                             "give two (B, d) matrices")
        p = torch.softmax(q @ k.T, dim=-1)
        total = total - torch.xlogy(p, p + eps).sum(dim=-1).mean()
    return total


@dataclass
class LayerScore:
    """The local-global layer score s(x) ∈ R^L (o3.md §3), fitted on training features with :meth:`fit`.

    Attributes:
        mean: μ_l, (L, d).
        precision: Σ_l⁻¹, (L, d, d): the pseudo-inverse of the empirical (maximum-likelihood, 1/n) covariance, as
            scikit-learn's ``EmpiricalCovariance`` computes it (``scipy.linalg.pinvh``). A covariance estimated
            from fewer samples than dimensions is singular; the pseudo-inverse is the code's choice (shrinkage
            would be a deviation, o3.md "Pitfalls").
        bank: F_l, (L, n, d): the L2-normalised training features.
        local: keep the cosine term −1000·max_f cos(z_l, f) (False: the global-only ablation).
        global_: keep the Mahalanobis term −½ d²_l (False: the local-only ablation).
    """

    mean: np.ndarray
    precision: np.ndarray
    bank: np.ndarray
    local: bool = True
    global_: bool = True

    def __post_init__(self) -> None:
        if not (self.local or self.global_):
            raise ValueError("LayerScore: local and global_ are both off; keep at least one term")

    @classmethod
    def fit(cls, features: np.ndarray, local: bool = True, global_: bool = True) -> LayerScore:
        """Fit μ_l, Σ_l⁻¹ and F_l on ``features`` (n, L, d) of the training split (float64).

        Raises:
            ValueError: ``features`` is not (n, L, d) with n >= 2, or both terms are off.
        """
        from sklearn.covariance import EmpiricalCovariance

        z = np.asarray(features, dtype=np.float64)
        if z.ndim != 3 or z.shape[0] < 2:
            raise ValueError(f"LayerScore.fit: features of shape {z.shape}; give (n, L, d) with n >= 2 samples")
        covs = [EmpiricalCovariance(assume_centered=False).fit(z[:, layer]) for layer in range(z.shape[1])]
        return cls(mean=np.stack([c.location_ for c in covs]), precision=np.stack([c.precision_ for c in covs]),
                   bank=np.stack([_unit(z[:, layer]) for layer in range(z.shape[1])]), local=local, global_=global_)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """s(x) for ``features`` (m, L, d): an (m, L) array, s_l = −1000·max_f cos(z_l, f) − ½(z_l−μ_l)ᵀΣ_l⁻¹(z_l−μ_l)
        (either term dropped by the ablation flags).

        Raises:
            ValueError: the features' (L, d) differ from the fitted ones.
        """
        z = np.asarray(features, dtype=np.float64)
        if z.ndim != 3 or z.shape[1:] != self.mean.shape:
            raise ValueError(f"LayerScore: features of shape {z.shape}; the score was fitted on (n, "
                             f"{self.mean.shape[0]}, {self.mean.shape[1]})")
        score = np.zeros(z.shape[:2])
        if self.local:
            cos = np.einsum("mld,lnd->mln", _unit(z), self.bank)
            score -= LOCAL_SCALE * cos.max(axis=2)
        if self.global_:
            centred = (z - self.mean).transpose(1, 0, 2)  # (L, m, d): one BLAS product per layer
            score -= 0.5 * ((centred @ self.precision) * centred).sum(axis=2).T
        return score


def _unit(z: np.ndarray) -> np.ndarray:
    """Rows of ``z`` scaled to unit L2 norm along the last axis (a zero row stays zero)."""
    norm = np.linalg.norm(z, axis=-1, keepdims=True)
    return z / np.where(norm > 0, norm, 1.0)


@dataclass
class Aggregator:
    """g(x) from s(x) ∈ R^L: a One-Class SVM with a linear kernel (o3.md §3), fitted with :meth:`fit`.

    A linear OCSVM's ``score_samples`` is ⟨coef, s⟩ and its ``decision_function`` is ⟨coef, s⟩ − offset, so the
    fitted SVM is kept as these two numbers (checkpointable, no scikit-learn at scoring time). The two choices
    differ by a constant, which :class:`WeightMap` cancels (it depends on g only through differences and σ_b):
    ``method`` changes g, never w.

    Attributes:
        coef: the SVM's weight vector, (L,).
        offset: its ``offset_``.
        method: ``score_samples`` (ScienceQA's code) or ``decision_function`` (TOFU's code).
    """

    coef: np.ndarray
    offset: float
    method: str = "score_samples"

    @classmethod
    def fit(cls, scores: np.ndarray, nu: float = 0.1, method: str = "score_samples") -> Aggregator:
        """Fit ``OneClassSVM(kernel="linear", nu=nu)`` on ``scores`` (n, L) of the training split; ν = 0.1 is
        ScienceQA's, 0.01 TOFU's.

        Raises:
            ValueError: ν outside (0, 1], an unknown ``method``, or fewer than 2 samples.
        """
        from sklearn.svm import OneClassSVM

        if not (isinstance(nu, int | float) and 0 < nu <= 1):
            raise ValueError(f"Aggregator: nu={nu} is outside (0, 1] (the fraction of training outliers)")
        if method not in SVM_SCORES:
            raise ValueError(f"Aggregator: method {method!r} is not one of {list(SVM_SCORES)}")
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 2 or s.shape[0] < 2:
            raise ValueError(f"Aggregator.fit: scores of shape {s.shape}; give (n, L) with n >= 2")
        svm = OneClassSVM(kernel="linear", nu=nu).fit(s)
        return cls(coef=np.asarray(svm.coef_, dtype=np.float64).ravel(), offset=float(svm.offset_[0]),
                   method=method)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """g for ``scores`` (m, L): ⟨coef, s⟩ (``score_samples``), minus ``offset`` for ``decision_function``."""
        g = np.asarray(scores, dtype=np.float64) @ self.coef
        return g - self.offset if self.method == "decision_function" else g


@dataclass(frozen=True)
class WeightMap:
    """The soft weight w̃(g) of o3.md §4, from the statistics of g on the two splits (:meth:`fit`).

    F(y) = ½Φ((y − m_a)/σ_b) + ½Φ((y − m_b)/σ_b), x0 = (m_a + m_b)/2, c(g) = 1 − |F(g) − F(2x0 − g)|,
    w̃ = sigmoid(10c − 2). F is increasing, so c is symmetric about x0, equals 1 there (w̃ = σ(8)), does not
    increase with |g − x0| and tends to 0 in both tails (w̃ → σ(−2) ≈ 0.119).

    Attributes:
        m_a: mean of g on the training split.
        m_b: mean of g on the held-out in-distribution split.
        sigma_b: standard deviation of g on the held-out split (population, 1/n).
    """

    m_a: float
    m_b: float
    sigma_b: float

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.m_a, self.m_b, self.sigma_b)) or self.sigma_b <= 0:
            raise ValueError(f"WeightMap: m_a={self.m_a}, m_b={self.m_b}, sigma_b={self.sigma_b}; the held-out "
                             "scores need a finite spread sigma_b > 0 (at least 2 distinct held-out scores)")

    @classmethod
    def fit(cls, g_train: np.ndarray, g_heldout: np.ndarray) -> WeightMap:
        """m_a = mean(g_train); m_b, σ_b = mean and population standard deviation of ``g_heldout``.

        Raises:
            ValueError: an empty split, or σ_b = 0 (fewer than 2 distinct held-out scores).
        """
        a, b = np.asarray(g_train, dtype=np.float64), np.asarray(g_heldout, dtype=np.float64)
        if a.size == 0 or b.size == 0:
            raise ValueError(f"WeightMap.fit: {a.size} training and {b.size} held-out scores; both splits need some")
        return cls(m_a=float(a.mean()), m_b=float(b.mean()), sigma_b=float(b.std()))

    @property
    def x0(self) -> float:
        """The centre (m_a + m_b)/2."""
        return 0.5 * (self.m_a + self.m_b)

    def cdf(self, y: np.ndarray) -> np.ndarray:
        """F(y) = ½Φ((y − m_a)/σ_b) + ½Φ((y − m_b)/σ_b)."""
        y = np.asarray(y, dtype=np.float64)
        return 0.5 * ndtr((y - self.m_a) / self.sigma_b) + 0.5 * ndtr((y - self.m_b) / self.sigma_b)

    def confidence(self, g: np.ndarray) -> np.ndarray:
        """c(g) = 1 − |F(g) − F(2x0 − g)| ∈ [0, 1]."""
        g = np.asarray(g, dtype=np.float64)
        return 1.0 - np.abs(self.cdf(g) - self.cdf(2.0 * self.x0 - g))

    def __call__(self, g: np.ndarray) -> np.ndarray:
        """w̃ = sigmoid(10·c(g) − 2)."""
        return expit(10.0 * self.confidence(g) - 2.0)


@dataclass(frozen=True)
class Band:
    """One row of a quantisation table: w̃ in the interval from ``low`` to ``high`` maps to scale · w̃^power
    (power 0: the constant ``scale``; scale 1, power 1: w̃ itself; TOFU's 10·w̃²: scale 10, power 2).

    Attributes:
        low: the interval's lower threshold, in [0, 1].
        high: its upper threshold, in [low, 1].
        scale: the factor, >= 0.
        power: the exponent of w̃, >= 0.
        low_closed: the interval contains ``low``.
        high_closed: the interval contains ``high``.
    """

    low: float
    high: float
    scale: float
    power: float = 0.0
    low_closed: bool = False
    high_closed: bool = True

    def describe(self) -> str:
        """The interval and its value, e.g. ``(0.3, 0.4] -> 1*w^1``."""
        return (f"{'[' if self.low_closed else '('}{self.low}, {self.high}{']' if self.high_closed else ')'} -> "
                f"{self.scale}*w^{self.power}")

    def contains(self, w: np.ndarray) -> np.ndarray:
        """Whether each w̃ lies in the interval."""
        above = w >= self.low if self.low_closed else w > self.low
        below = w <= self.high if self.high_closed else w < self.high
        return above & below


@dataclass(frozen=True)
class Quantiser:
    """w = q(w̃): a table of disjoint intervals (:class:`Band`) in ascending order, and ``default`` outside them
    (o3.md §4: the hand-tuned tables; every threshold is data, so a config can change any of them).

    :meth:`__post_init__` refuses a table that is not in ascending order of its thresholds (a row with low > high,
    or a row starting below the end of the row before), whose intervals overlap or are empty, leave [0, 1], or
    whose values are negative or not finite. It does not require the output to be non-decreasing in w̃: both of
    o3.md's tables are not (ScienceQA's falls from w̃ = 0.4 to 0 on (0.4, 0.9]; TOFU's 10·w̃² reaches 1.024 just
    below 0.32, above the 1 at 0.32).

    Attributes:
        bands: the rows, ordered by threshold.
        default: w outside every row (0: the base model).
        name: a label (``scienceqa``, ``tofu``; ``custom`` for a table from a config); not compared.
    """

    bands: tuple[Band, ...]
    default: float = 0.0
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        validate_bands(self.bands, self.default)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], default: float = 0.0, name: str = "custom") -> Quantiser:
        """A quantiser from config rows, each a mapping of :class:`Band`'s fields (``low``, ``high``, ``scale``,
        optionally ``power``, ``low_closed``, ``high_closed``).

        Raises:
            ValueError: a row with missing or unknown keys, or a table :func:`validate_bands` refuses.
        """
        bands = []
        allowed = set(Band.__dataclass_fields__)
        for i, row in enumerate(rows):
            unknown, missing = set(row) - allowed, {"low", "high", "scale"} - set(row)
            if unknown or missing:
                raise ValueError(f"quantiser row {i}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                                 f"a row has {sorted(allowed)}")
            bands.append(Band(**dict(row)))
        return cls(tuple(bands), default, name)

    def __call__(self, soft: np.ndarray) -> np.ndarray:
        """w for each w̃ in ``soft``."""
        w = np.asarray(soft, dtype=np.float64)
        out = np.full(w.shape, self.default)
        for band in self.bands:
            inside = band.contains(w)
            out[inside] = band.scale * w[inside] ** band.power
        return out


def validate_bands(bands: Sequence[Band], default: float = 0.0) -> None:
    """Check a quantisation table (see :class:`Quantiser`).

    Raises:
        ValueError: naming the first bad row and what is wrong with it: a threshold outside [0, 1] or not finite,
            low > high (thresholds not monotone), an empty interval, a row that starts before the previous one
            ends (rows out of order or overlapping), a negative or non-finite scale or power, or a bad default.
    """
    if not (math.isfinite(default) and default >= 0):
        raise ValueError(f"quantiser: default {default} must be a finite value >= 0")
    previous: Band | None = None
    for i, band in enumerate(bands):
        where = f"quantiser row {i} {band.describe()}"
        if not all(math.isfinite(v) and 0 <= v <= 1 for v in (band.low, band.high)):
            raise ValueError(f"{where}: thresholds must lie in [0, 1], the range of the soft weight")
        if band.low > band.high:
            raise ValueError(f"{where}: low {band.low} > high {band.high}; thresholds must be monotone")
        if band.low == band.high and not (band.low_closed and band.high_closed):
            raise ValueError(f"{where}: the interval is empty")
        if not (math.isfinite(band.scale) and band.scale >= 0 and math.isfinite(band.power) and band.power >= 0):
            raise ValueError(f"{where}: scale and power must be finite and >= 0")
        if previous is not None and (band.low < previous.high
                                     or (band.low == previous.high and band.low_closed and previous.high_closed)):
            raise ValueError(f"{where}: it starts before row {i - 1} {previous.describe()} ends; rows must be "
                             "disjoint and in ascending order of their thresholds (not monotone or overlapping)")
        previous = band


SCIENCEQA = Quantiser((Band(0.3, 0.4, scale=1.0, power=1.0), Band(0.9, 1.0, scale=1.2)), name="scienceqa")
"""ScienceQA (o3.md §4): w̃ > 0.9 → 1.2; w̃ ∈ (0.3, 0.4] → w̃; otherwise 0."""

TOFU = Quantiser((Band(0.2, 0.32, scale=10.0, power=2.0, high_closed=False),
                  Band(0.32, 1.0, scale=1.0, low_closed=True)), name="tofu")
"""TOFU (o3.md §4): w̃ ≥ 0.32 → 1; w̃ ∈ (0.2, 0.32) → 10·w̃²; otherwise 0."""

QUANTISERS: dict[str, Quantiser] = {q.name: q for q in (SCIENCEQA, TOFU)}
"""The named presets."""


def detection_accuracy(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """The best balanced accuracy of telling in-distribution inputs (higher scores) from OOD ones by a threshold:
    max_τ ½(P[s_in ≥ τ] + P[s_out < τ]), in [0.5, 1] (τ above every score gives ½). O3's detector checkpoint
    selection compares epochs by it (:meth:`clbench.ood.RequestDetector.fit`).

    Raises:
        ValueError: either set is empty.
    """
    pos, neg = np.asarray(in_scores, dtype=np.float64).ravel(), np.asarray(out_scores, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"detection_accuracy: {pos.size} in-distribution and {neg.size} OOD scores; both needed")
    taus = np.append(np.unique(np.concatenate([pos, neg])), np.inf)
    tpr = (pos[None, :] >= taus[:, None]).mean(axis=1)
    tnr = (neg[None, :] < taus[:, None]).mean(axis=1)
    return float((0.5 * (tpr + tnr)).max())


def max_over_detectors(weights: Sequence[np.ndarray], n: int) -> np.ndarray:
    """w(x) = max_i w_i(x) over the detectors of every request so far (o3.md §4), for ``n`` inputs; zeros (the
    base model) when there is no detector yet.

    Raises:
        ValueError: a detector's weights are not ``n`` values.
    """
    out = np.zeros(n)
    for i, w in enumerate(weights):
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (n,):
            raise ValueError(f"max_over_detectors: detector {i} gave weights of shape {w.shape}, expected ({n},)")
        out = np.maximum(out, w)
    return out


__all__ = [
    "CEL_EPS",
    "LOCAL_SCALE",
    "QUANTISERS",
    "SCIENCEQA",
    "SVM_SCORES",
    "TOFU",
    "Aggregator",
    "Band",
    "LayerScore",
    "Quantiser",
    "WeightMap",
    "contrastive_entropy",
    "max_over_detectors",
    "validate_bands",
]
