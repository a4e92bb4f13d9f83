"""Gradient difference (GradDiff): gradient ascent on the forget set plus fine-tuning on retained data.

**Objective** on an unlearning request t (an experience ``>= unlearn_from``), per training batch B_f of the forget
set D_t and a batch B_r of the stream's retain set (``strategy.retain_set``):

    L_GD = −NLL(B_f) + w_r · NLL(B_r)

(Liu et al. 2022, "Continual Learning and Private Unlearning", the gradient-difference baseline; TOFU, Maini et al.
2024, §4 "Gradient Difference", whose code sums the two losses, i.e. w_r = 1; O3's baseline list, o3.md
"Baselines": GradDif = gradient ascent + retain fine-tuning). NLL is the model's loss, the mean answer-token
cross-entropy. Before ``unlearn_from`` the strategy trains plainly on the NLL. The retain batches and the shared
keys: :mod:`strategies.unlearning`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from clbench.config import check
from strategies import register
from strategies.unlearning import LossFn, RetainedConfig, Unlearning

if TYPE_CHECKING:
    from clbench.context import Context
    from clbench.streams.batches import Batch


@dataclass
class GradDiffConfig(RetainedConfig):
    """GradDiff's keys (:class:`~strategies.unlearning.RetainedConfig`); ``retain_weight`` w_r = 1, TOFU's sum
    of the two losses, and it must be > 0 (with w_r = 0 GradDiff is ``grad_ascent``)."""

    retain_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        check(self.retain_weight > 0, "strategy.retain_weight",
              f"{self.retain_weight}; must be > 0 (w_r = 0 is gradient ascent: strategy=grad_ascent)")


@register("grad_diff")
class GradDiff(Unlearning):
    """GradDiff: L = −NLL(B_f) + w_r · NLL(B_r) on a request, NLL before ``unlearn_from``."""

    config_class = GradDiffConfig

    def objective(self, ctx: Context, batch: Batch, loss: LossFn) -> torch.Tensor:
        if not self.unlearning(ctx):
            return loss(batch)
        retained = self.retained(ctx, loss)
        assert retained is not None  # retain_weight > 0: setup read the retain set
        return -loss(batch) + retained
