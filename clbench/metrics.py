"""Forgetting metrics from the accuracy matrix R (all in %), the evaluation that fills it, and TOFU's KS-test
forget quality.

R[i, j] is the test accuracy on experience j after training experience i (T × T; every entry is measured,
including j > i, which FWT needs). ``b[j]`` is the accuracy of the initial (untrained) model on experience j.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchmetrics import MeanMetric


def _square(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise ValueError(f"accuracy matrix must be T × T with T >= 1, got shape {R.shape}")
    return R


def acc(R: np.ndarray) -> float:
    """Average accuracy after the last experience: ACC = (1/T) Σ_j R[T−1, j]
    (Lopez-Paz & Ranzato 2017; GPM Eq. 10)."""
    R = _square(R)
    return float(R[-1].mean())


def bwt(R: np.ndarray) -> float:
    """Backward transfer: BWT = 1/(T−1) Σ_{j<T−1} (R[T−1, j] − R[j, j]) (Lopez-Paz & Ranzato 2017, Eq. 3;
    GPM Eq. 10). Negative means forgetting; 0 for T = 1."""
    R = _square(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean(R[-1, :-1] - np.diag(R)[:-1]))


def fwt(R: np.ndarray, b: np.ndarray) -> float:
    """Forward transfer: FWT = 1/(T−1) Σ_{j>0} (R[j−1, j] − b_j), b_j = accuracy of the initial model on
    experience j (Lopez-Paz & Ranzato 2017, Eq. 4); 0 for T = 1."""
    R = _square(R)
    b = np.asarray(b, dtype=np.float64)
    T = R.shape[0]
    if b.shape != (T,):
        raise ValueError(f"initial accuracies must have shape ({T},), got {b.shape}")
    if T == 1:
        return 0.0
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


def forgetting(R: np.ndarray) -> float:
    """Average forgetting after the last experience, Chaudhry et al. 2018 ("Riemannian Walk", ECCV), at k = T−1:

        f_j = max_{l ∈ [j, T−2]} R[l, j] − R[T−1, j],   forgetting = 1/(T−1) Σ_{j<T−1} f_j.

    The paper takes the max over the earlier rows l < k of accuracies a_{l,j} it measures on tasks already
    trained only (j ≤ l); clbench's R also holds the entries j > i (FWT needs them), so the max is restricted
    explicitly to the rows after task j was trained (l ≥ j). Rows l < j score a task not trained yet (chance,
    or whatever transfer gave it) and never count as accuracy it "once had". Since f_j ≥ R[j, j] −
    R[T−1, j], forgetting ≥ −BWT, with equality when no task scored above R[j, j] before the last row.
    0 for T = 1."""
    R = _square(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([R[j : T - 1, j].max() - R[-1, j] for j in range(T - 1)]))


def acc_seen(R: np.ndarray, i: int) -> float:
    """Average accuracy over the experiences seen after experience i: (1/(i+1)) Σ_{j≤i} R[i, j]."""
    return float(np.mean(_square(R)[i, : i + 1]))


def bwt_seen(R: np.ndarray, i: int) -> float:
    """BWT of the first i+1 experiences after experience i: (1/i) Σ_{j<i} (R[i, j] − R[j, j]); 0 for i = 0."""
    R = _square(R)
    return 0.0 if i == 0 else float(np.mean(R[i, :i] - np.diag(R)[:i]))


def summary(R: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The four headline scores, keyed as in MLflow: ``acc``, ``bwt``, ``fwt``, ``forgetting``."""
    return {"acc": acc(R), "bwt": bwt(R), "fwt": fwt(R, b), "forgetting": forgetting(R)}


@dataclass
class PerSample:
    """The per-sample values of the scores ``names`` over one evaluation (:func:`evaluate`), each with its sample's
    group index (−1: the batch has no groups), for statistics a mean cannot give (TOFU's KS-test forget quality:
    :func:`forget_quality`)."""

    names: tuple[str, ...]
    values: dict[str, list[np.ndarray]] = field(default_factory=dict)
    groups: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, scores: Mapping[str, torch.Tensor], group: torch.Tensor | None) -> None:
        for name in self.names:
            if name in scores:
                values = scores[name].detach().to(torch.float64).cpu().numpy()
                self.values.setdefault(name, []).append(values)
                self.groups.setdefault(name, []).append(
                    np.full(len(values), -1) if group is None else group.cpu().numpy())

    def lines(self, after: int, test_experience: int, group_names: Sequence[str]) -> list[str]:
        """CSV lines ``score,after_experience,test_experience,group,value`` (:data:`PER_SAMPLE_HEADER`; group ""
        where none; quoted as CSV where a name needs it)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for name, chunks in self.values.items():
            for values, groups in zip(chunks, self.groups[name], strict=True):
                writer.writerows([name, after, test_experience, group_names[g] if g >= 0 else "", f"{v:.10g}"]
                                 for v, g in zip(values.tolist(), groups.tolist(), strict=True))
        return buf.getvalue().splitlines()


PER_SAMPLE_HEADER = "score,after_experience,test_experience,group,value"
"""The header of a run's ``per_sample.csv`` artifact (after_experience −1: the initial evaluation)."""


def per_sample_values(text: str, score: str, after: int | None, groups: Sequence[str]) -> np.ndarray:
    """The values of ``score`` in a ``per_sample.csv`` text for the samples of ``groups`` evaluated after
    experience ``after`` (−1: the initial evaluation; None: the last one)."""
    rows = list(csv.reader(io.StringIO(text.strip())))[1:]
    mine = [r for r in rows if r[0] == score]
    if after is None:
        after = max((int(r[1]) for r in mine), default=-1)
    return np.array([float(r[4]) for r in mine if int(r[1]) == after and r[3] in groups])


def forget_quality(unlearned: np.ndarray, retained: np.ndarray) -> float:
    """TOFU's forget quality (Maini et al. 2024, §2.5): the p-value of the two-sample Kolmogorov–Smirnov test
    between the truth ratios of the forget set's samples under the unlearned model and under a model that never
    learnt them (the retain model); high (→ 1) when the two distributions cannot be told apart. The test depends on
    the samples' ranks only, so the truth ratio and its inverse (TOFU's code computes p(ã)/p(â)) give the same
    p-value."""
    from scipy.stats import ks_2samp

    if len(unlearned) == 0 or len(retained) == 0:
        raise ValueError(f"forget quality needs samples on both sides, got {len(unlearned)} and {len(retained)}")
    return float(ks_2samp(unlearned, retained).pvalue)


@torch.no_grad()
def evaluate(score: Callable[[Any], dict[str, torch.Tensor]], batches: Iterable[Any], device: torch.device,
             groups: Sequence[str] = (), kept: PerSample | None = None) -> dict[str, float]:
    """The mean over every sample of ``batches`` of each named per-sample score ``score(batch)`` gives (a model's
    :meth:`~clbench.models.base.ContinualModel.score`: accuracy in %, exact match, loss, ...), accumulated on the
    device in float64 with torchmetrics. With ``groups`` (the stream's group names) and dict batches carrying a
    ``group`` index per sample, also the mean of each score over each group's samples, as ``<score>.<group>``
    (only for groups that have samples here). ``kept`` collects the per-sample values of its scores."""
    means: dict[str, MeanMetric] = {}

    def update(name: str, values: torch.Tensor) -> None:
        if name not in means:
            # set_dtype after .to: .to() casts the states back to float32 (torchmetrics 1.x)
            means[name] = MeanMetric(nan_strategy="error").to(device).set_dtype(torch.float64)
        means[name].update(values.to(torch.float64))

    for batch in batches:
        scores = score(batch)
        for name, values in scores.items():
            update(name, values)
        grouped = isinstance(batch, Mapping) and "group" in batch
        if kept is not None:
            kept.add(scores, batch["group"] if grouped else None)
        if groups and grouped:
            index = batch["group"].to(device)
            for g in index.unique().tolist():
                if g < 0:
                    continue
                rows = index == g
                for name, values in scores.items():
                    update(f"{name}.{groups[g]}", values[rows])
    return {name: float(m.compute()) for name, m in means.items()}
