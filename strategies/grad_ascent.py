"""Gradient ascent (GradAsc), the simplest LLM-unlearning baseline (the shared parts: :mod:`strategies.unlearning`).

**Objective.** On an unlearning request t (an experience ``>= unlearn_from``) with forget set D_t, gradient
ascent maximises the forget set's negative log-likelihood, i.e. minimises

    L_GA = −NLL(D_t) = (1/|tokens|) Σ_{answer tokens k} log π_θ(y_k | x, y_<k)

per batch (the negative of the model's loss: the mean answer-token cross-entropy), as in TOFU's ``grad_ascent``
(Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs", §4: "Gradient Ascent") and O3's baseline
list (o3.md "Baselines", GradAsc). It is unbounded below: long runs collapse the model (the utility loss the
unlearning papers report); ``engine.epochs`` and ``engine.lr`` bound it here. Before ``unlearn_from``: L = NLL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from strategies import register
from strategies.unlearning import LossFn, Unlearning, UnlearningConfig

if TYPE_CHECKING:
    from clbench.context import Context
    from clbench.streams.batches import Batch


@register("grad_ascent")
class GradAscent(Unlearning):
    """GradAsc: L = −NLL(D_t) on a request, NLL before ``unlearn_from``."""

    config_class = UnlearningConfig

    def objective(self, ctx: Context, batch: Batch, loss: LossFn) -> torch.Tensor:
        return -loss(batch) if self.unlearning(ctx) else loss(batch)
