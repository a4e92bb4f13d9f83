"""Refusal fine-tuning ("PO" in O3's code): unlearn a request by fine-tuning the model to answer its forget set's
questions with a refusal, optionally beside fine-tuning on retained data.

**Objective** on an unlearning request t (an experience ``>= unlearn_from``): D_t is relabelled, every answer
replaced by the refusal r (``strategy.refusal``, null: the stream's ``TextStreamSpec.refusal``, e.g.
``fictitious_facts``' "i do not know"), and per batch B_f of it and B_r of the stream's retain set

    L_PO = NLL_r(B_f) + w_r · NLL(B_r),   NLL_r(B_f) = −mean over r's tokens of log π_θ(r_k | x, r_<k)

(the "IDK" / preference-optimisation baseline of TOFU, Maini et al. 2024, §4, whose targets are refusal
sentences and which trains beside the retain loss; O3's baseline list, o3.md "Baselines": PO = refusal + retain
fine-tuning, hence w_r = 1 by default; w_r = 0 is refusal fine-tuning alone, the form of O3's own TOFU L_unl).
One fixed refusal, where TOFU draws one of many "I don't know" sentences per sample: the stream's ``refused``
score then measures exactly what was trained. The relabelled data reach the engine through :meth:`train_source`;
a validation split (``benchmark.validation_fraction``) keeps its original answers. Before ``unlearn_from`` the
strategy trains plainly on the NLL of the true answers.
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
    from clbench.streams import BatchSource
    from clbench.streams.batches import Batch


@dataclass
class RefusalFTConfig(RetainedConfig):
    """Refusal fine-tuning's keys (and :class:`~strategies.unlearning.RetainedConfig`'s; ``retain_weight`` 1:
    PO's retain fine-tuning, o3.md).

    Attributes:
        refusal: the refusal answer trained on the forget set (null: the stream's refusal answer).
    """

    refusal: str | None = None
    retain_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        check(self.refusal is None or bool(self.refusal.strip()), "strategy.refusal",
              "empty; give a refusal sentence, or null (the stream's refusal answer)")


@register("refusal_ft")
class RefusalFT(Unlearning):
    """PO: the forget set relabelled to a refusal, trained with the NLL (+ w_r · retain NLL)."""

    config_class = RefusalFTConfig

    def __init__(self, cfg: RefusalFTConfig) -> None:
        super().__init__(cfg)
        self.cfg: RefusalFTConfig = cfg
        self.refusal = ""

    def setup(self, ctx: Context) -> None:
        """Also refuse a stream without a refusal answer when ``strategy.refusal`` is null.

        Raises:
            ConfigError: naming ``strategy.refusal`` (or what :meth:`Unlearning.setup` names).
        """
        super().setup(ctx)
        refusal = self.cfg.refusal or getattr(ctx.stream.spec, "refusal", None)
        check(refusal is not None, "strategy.refusal",
              f"null, and benchmark '{ctx.stream.spec.name}' has no refusal answer; give one, e.g. "
              "strategy.refusal='i do not know'")
        assert refusal is not None
        self.refusal = refusal

    def train_source(self, ctx: Context) -> BatchSource:
        """On a request, its training samples with every answer replaced by the refusal (collated by the model
        once per experience); before ``unlearn_from``, the experience's own source."""
        if not self.unlearning(ctx):
            return super().train_source(ctx)
        return self.relabelled(ctx, lambda k: self.refusal)

    def objective(self, ctx: Context, batch: Batch, loss: LossFn) -> torch.Tensor:
        out = loss(batch)
        if not self.unlearning(ctx):
            return out
        retained = self.retained(ctx, loss)
        return out if retained is None else out + retained
