"""Negative Preference Optimization (NPO; Zhang, Lin, Bai, Mei 2024, "Negative Preference Optimization: From
Catastrophic Collapse to Effective Unlearning", arXiv 2404.05868): DPO with the forget set as the dispreferred
answers and no preferred ones.

**Objective** on an unlearning request t (an experience ``>= unlearn_from``), per batch of the forget set D_t:

    L_NPO = (2/β) · mean_i log(1 + (π_θ(y_i|x_i) / π_ref(y_i|x_i))^β)
          = −(2/β) · mean_i log σ(−β (log π_θ(y_i|x_i) − log π_ref(y_i|x_i)))

(the paper's Eq. 3), with log π(y|x) the sum of the answer tokens' log-probabilities (end token included;
:meth:`clbench.models.lm.LanguageModel.sequence_logps`) and π_ref the model **as the request starts**. At
π_θ = π_ref the loss is (2/β) log 2; as β → 0 its gradient tends to gradient ascent's on the summed NLL, and for
β > 0 each sample's weight 2σ(β log(π_θ/π_ref)) shrinks once it is forgotten, which is what slows the collapse.
β = 0.1 is the official code's (``licong-lin/negative-preference-optimization``, ``config/forget.yaml``).
``retain_weight`` > 0 adds w_r · NLL(B_r) on the stream's retain set (the paper's NPO-RT; default 0, plain NPO).
Before ``unlearn_from`` the strategy trains plainly on the NLL.

**Reference log-probabilities**: log π_ref(y_i|x_i) of every forget sample is one of the strategy's anchors
(:meth:`NPO.anchors`): the loop computes it once, as the request starts (eval mode, no gradient), adds it to the
experience's batches as the field ``npo_ref_logp`` and keeps it in the checkpoint, so a run resumed in the middle
of a request trains against the same π_ref, not the half-unlearned model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from clbench.config import check
from strategies import register
from strategies.unlearning import LossFn, RetainedConfig, Unlearning

if TYPE_CHECKING:
    from clbench.context import Context
    from clbench.streams.batches import Batch

REF = "npo_ref_logp"
"""The batch field of π_ref's sequence log-probabilities."""


@dataclass
class NPOConfig(RetainedConfig):
    """NPO's keys (and :class:`~strategies.unlearning.RetainedConfig`'s, ``retain_weight`` 0: plain NPO).

    Attributes:
        beta: β > 0 (the official code's 0.1).
    """

    beta: float = 0.1
    retain_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        check(self.beta > 0, "strategy.beta", f"{self.beta}; must be > 0 (NPO's β, e.g. 0.1)")


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """(2/β) · mean log(1 + exp(β (logp − ref_logp))) = (2/β) · mean softplus(β (logp − ref_logp)) (module
    docstring), numerically stable for any log-ratio."""
    return 2.0 / beta * F.softplus(beta * (logp - ref_logp)).mean()


@register("npo")
class NPO(Unlearning):
    """NPO against π_ref = the model as each request starts (+ optional retain NLL)."""

    config_class = NPOConfig

    def __init__(self, cfg: NPOConfig) -> None:
        super().__init__(cfg)
        self.cfg: NPOConfig = cfg
        self._logps: Any = None

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        # log π_θ goes through the Fabric-wrapped model (precision, DDP) as the model's loss does
        mark = getattr(ctx.model, "mark_forward_method", None)
        if mark is not None:
            mark("sequence_logps")
        self._logps = ctx.model.sequence_logps

    def anchors(self, ctx: Context, batch: Batch) -> dict[str, torch.Tensor]:
        """On a request, ``npo_ref_logp``: log π_ref(y|x) of the batch's samples, the model as the request starts
        (nothing before ``unlearn_from``)."""
        if not self.unlearning(ctx):
            return {}
        return {REF: ctx.module.sequence_logps(batch).float()}

    def objective(self, ctx: Context, batch: Batch, loss: LossFn) -> torch.Tensor:
        if not self.unlearning(ctx):
            return loss(batch)
        assert isinstance(batch, Mapping)
        out = npo_loss(self._logps(batch), batch[REF], self.cfg.beta)
        retained = self.retained(ctx, loss)
        return out if retained is None else out + retained
