"""Forgetting metrics from the accuracy matrix R (all in %).

R[i, j] is the test accuracy on experience j after training experience i (T × T; every entry is measured,
including j > i, which FWT needs). ``b[j]`` is the accuracy of the initial (untrained) model on experience j.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
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


@torch.no_grad()
def evaluate(score: Callable[[Any], dict[str, torch.Tensor]], batches: Iterable[Any], device: torch.device,
             groups: Sequence[str] = ()) -> dict[str, float]:
    """The mean over every sample of ``batches`` of each named per-sample score ``score(batch)`` gives (a model's
    :meth:`~clbench.models.base.ContinualModel.score`: accuracy in %, exact match, loss, ...), accumulated on the
    device in float64 with torchmetrics. With ``groups`` (the stream's group names) and dict batches carrying a
    ``group`` index per sample, also the mean of each score over each group's samples, as ``<score>.<group>``
    (only for groups that have samples here)."""
    means: dict[str, MeanMetric] = {}

    def update(name: str, values: torch.Tensor) -> None:
        if name not in means:
            means[name] = MeanMetric(nan_strategy="error").set_dtype(torch.float64).to(device)
        means[name].update(values.to(torch.float64))

    for batch in batches:
        scores = score(batch)
        for name, values in scores.items():
            update(name, values)
        if groups and isinstance(batch, Mapping) and "group" in batch:
            index = batch["group"].to(device)
            for g in index.unique().tolist():
                if g < 0:
                    continue
                rows = index == g
                for name, values in scores.items():
                    update(f"{name}.{groups[g]}", values[rows])
    return {name: float(m.compute()) for name, m in means.items()}
