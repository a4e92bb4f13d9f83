"""Learning without Forgetting for any :class:`~clbench.models.base.ContinualModel`, language models included.

Avalanche's ``lwf`` (``strategies/avalanche_baselines.py``) distils a classifier's logits and refuses language
models; this one distils whatever the model predicts at the positions it trains (``model.target_logits(batch)``:
a language model's answer positions, one row per answer token; a classifier's logits, one row per sample), so it
runs on ``model=causal_lm`` / ``seq2seq_lm`` (LoRA or full fine-tuning) as on the classifiers.

**Loss** (Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017, §3, Eqs. 2-3, numbering recalled,
not re-checked against the PDF: the knowledge-distillation loss L_old on the recorded outputs of the original
network for the new task's inputs, y'⁽ⁱ⁾ = (y⁽ⁱ⁾)^{1/T} / Σ_j (y⁽ʲ⁾)^{1/T}, i.e. softmax(z / T), for both the
recorded and the current outputs, weighted by the loss-balance weight λ_o): on task t > 0, for each training batch,

    L = L_t(θ) + α · (1/m) Σ_{positions} KL( softmax(z_old / T) ‖ softmax(z_θ / T) )

with z_old the previous model's logits and z_θ the current ones at the m target positions of the batch (the new
task's inputs, with the teacher forcing of its own answers for an LM). LwF writes L_old as the cross-entropy
−Σ y'_old log ŷ'; it differs from the KL by the teacher's entropy, a constant, so the gradients are equal; the KL
is 0 when the model is the previous one (with dropout off: the student runs in training mode, the teacher in eval
mode). No T² factor (LwF has none; Hinton et al.'s distillation adds it). α = ``alpha`` (λ_o), T = ``temperature``.
Nothing is added on the first task. On a multi-head classifier the target logits are the batch's own head, so the
earlier tasks' heads are not distilled: Avalanche's ``lwf`` is the method for classifiers.

**The previous model** is the model at the end of task t − 1 (LwF's "original network", refreshed after every
task, as for a sequence of tasks), kept as a snapshot of the values of the trainable parameters only (with LoRA:
the adapter's A and B; the frozen base model is shared, never copied) plus the floating-point persistent buffers
(a classifier's batch-norm statistics). Its logits come from the live model run with those values swapped in
(``torch.func.functional_call``: no in-place change of the parameters, so the current step's autograd graph is
untouched), in eval mode (no dropout) and without gradient. The student's logits come from one more forward pass of
the current model on the same batch (the engine's task-loss pass does not expose its logits), so a step costs two
extra forward passes, one without gradient.

The snapshot is the strategy's state (on the CPU in the checkpoint): a resumed run distils from the same teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from clbench.config import ConfigError, StrategyConfig, check
from strategies import register
from strategies.base import Strategy

if TYPE_CHECKING:
    from clbench.context import Context
    from clbench.streams.batches import Batch


@dataclass
class LwFLMConfig(StrategyConfig):
    """LwF through the model's target logits.

    Attributes:
        alpha: α, the weight of the distillation term (LwF's λ_o).
        temperature: T, the softmax temperature of both distributions.
    """

    alpha: float = 1.0
    temperature: float = 2.0

    def validate(self) -> None:
        check(self.alpha >= 0, "strategy.alpha", f"{self.alpha}; must be >= 0")
        check(self.temperature > 0, "strategy.temperature", f"{self.temperature}; must be > 0")


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the rows of KL(softmax(teacher / T) ‖ softmax(student / T)), in float32 at least."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_p = F.log_softmax(student.to(dtype) / temperature, dim=-1)
    log_q = F.log_softmax(teacher.to(dtype) / temperature, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean()


class _TargetLogits(nn.Module):
    """``module.target_logits(batch)`` as a forward pass, for ``functional_call`` (parameter names get the prefix
    ``module.``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.module.target_logits(batch)  # type: ignore[operator]


def _snapshot_names(module: nn.Module) -> tuple[list[str], list[str]]:
    """The trainable parameters' names and the floating-point persistent buffers' names of ``module``."""
    params = [n for n, p in module.named_parameters() if p.requires_grad]
    persistent = set(module.state_dict(keep_vars=True))
    buffers = [n for n, b in module.named_buffers() if b.is_floating_point() and n in persistent]
    return params, buffers


@register("lwf_lm")
class LwFLM(Strategy):
    """Distillation of the previous task's model at the target positions of the new task's batches."""

    config_class = LwFLMConfig

    def __init__(self, cfg: LwFLMConfig) -> None:
        super().__init__(cfg)
        self.cfg: LwFLMConfig = cfg
        self.teacher: dict[str, torch.Tensor] | None = None  # name -> value at the end of the previous task
        self._call: _TargetLogits | None = None
        self._values: dict[str, torch.Tensor] = {}

    def attach(self, ctx: Context) -> None:
        """The snapshot on the training device, keyed for ``functional_call``.

        Raises:
            ConfigError: the trainable parameters are not those of the snapshot (e.g. a new adapter per task).
        """
        self._call = _TargetLogits(ctx.module)
        if self.teacher is None:
            self._values = {}
            return
        params, _ = _snapshot_names(ctx.module)
        known = {n for n, _ in ctx.module.named_parameters()} | {n for n, _ in ctx.module.named_buffers()}
        if not set(params) <= set(self.teacher) <= known:
            raise ConfigError(f"strategy '{self.name}' keeps the previous model as the values of the trainable "
                              "parameters, but they changed between tasks: LwF needs one shared set of trainable "
                              "parameters (one LoRA adapter, model.adapter=lora, or full fine-tuning)")
        self.teacher = {k: v.to(ctx.device) for k, v in self.teacher.items()}
        self._values = {f"module.{k}": v for k, v in self.teacher.items()}

    def detach(self, ctx: Context) -> None:
        self._call, self._values = None, {}

    def teacher_logits(self, ctx: Context, batch: Batch) -> torch.Tensor:
        """The previous model's target logits of ``batch`` (eval mode, no gradient)."""
        assert self._call is not None
        module = ctx.module
        training = module.training
        module.eval()
        try:
            with torch.no_grad(), ctx.fabric.autocast():
                return torch.func.functional_call(self._call, self._values, (batch,))
        finally:
            module.train(training)

    def penalty(self, ctx: Context, batch: Batch) -> torch.Tensor | None:
        """α · mean KL(teacher ‖ student) at T over the batch's target positions (None on the first task)."""
        if not self._values or self.cfg.alpha == 0:
            return None
        old = self.teacher_logits(ctx, batch)
        with ctx.fabric.autocast():
            new = ctx.module.target_logits(batch)
        return self.cfg.alpha * distillation(new, old, self.cfg.temperature)

    @torch.no_grad()
    def after_experience(self, ctx: Context) -> None:
        """Snapshot the trainable parameters (and floating buffers): the teacher of the next task."""
        params, buffers = _snapshot_names(ctx.module)
        named = dict(ctx.module.named_parameters()) | dict(ctx.module.named_buffers())
        self.teacher = {n: named[n].detach().clone() for n in params + buffers}

    def state_dict(self) -> dict[str, Any]:
        """The snapshot (CPU), or None before the first task ends."""
        return {"teacher": None if self.teacher is None else
                {k: v.detach().cpu().clone() for k, v in self.teacher.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher = None if state["teacher"] is None else dict(state["teacher"])
        self._values = {}
