"""Elastic Weight Consolidation for any :class:`~clbench.models.base.ContinualModel`, language models included.

Avalanche's ``ewc`` (``strategies/avalanche_baselines.py``) trains with cross-entropy on a classifier's logits and
refuses language models; this one reads the model only through ``loss(batch)``, so it runs on ``model=causal_lm`` /
``seq2seq_lm`` (LoRA or full fine-tuning) as on the classifiers.

**Penalty** (Kirkpatrick et al., PNAS 2017, Eq. 3, with one quadratic per earlier task as the paper's §2 says for
a third task): training task t minimises

    L(θ) = L_t(θ) + (λ/2) · Σ_{k<t} Σ_i F_k,i (θ_i − θ*_k,i)²

over the trainable parameters θ (those with ``requires_grad`` at the end of task k: with ``model.adapter=lora``
the one LoRA adapter's A and B, with ``model.adapter=none`` every weight), θ*_k their values at the end of task k.
``mode=online`` keeps one penalty instead (online EWC, Schwarz et al., ICML 2018, "Progress & Compress"):
F̃_k = γ·F̃_{k−1} + F_k (γ = ``decay_factor``) anchored at θ*_{k−1}, the latest end-of-task values, i.e.
(λ/2)·Σ_i F̃_{t−1,i}(θ_i − θ*_{t−1,i})² (Avalanche's form: γ applied when the importances are accumulated).

The separate penalties are kept as one quadratic, exactly: Σ_k F_k (θ − θ*_k)² = A (θ − c)² + C per coordinate,
with A = Σ_k F_k, c = Σ_k F_k θ*_k / A (θ*_k of the latest task where A = 0) and the constant
C = Σ_k F_k (θ*_k − c)² (summed over the coordinates, float64). Its value and gradient λ·A·(θ − c) =
λ·Σ_k F_k (θ − θ*_k) are the paper's; a step costs one quadratic however many tasks have passed, and the state is
two tensors per parameter, not two per parameter and task.

**Fisher.** The diagonal *empirical* Fisher of the finished task's training set: F_i = (1/N) Σ_n (∂ℓ_n/∂θ_i)²,
ℓ_n the model's own loss of sample n alone (its observed answer / label, not one sampled from the model's
predictive distribution: that would be the true Fisher), one backward pass per sample, the model in eval mode (no
dropout), over ``fisher_samples`` random training samples (null: all). For an LM, ℓ_n is the mean NLL of the
sample's answer tokens.

**One shared set of trainable parameters.** EWC anchors parameters that keep training. With one adapter per task
(O-LoRA's, IncLoRA's) the earlier adapters are frozen and the new one has no earlier value, so there is nothing to
consolidate; this strategy adds no adapter (it is SeqLoRA + EWC with ``model.adapter=lora``), and it refuses to
continue if a parameter it anchored is gone or frozen when a task starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from clbench.config import ConfigError, StrategyConfig, check
from clbench.streams.batches import map_batch
from strategies import register
from strategies.base import Strategy

if TYPE_CHECKING:
    from torch import nn

    from clbench.context import Context

_FISHER_KEY = 13  # which training samples estimate the Fisher
MODES = ("separate", "online")


@dataclass
class EWCLMConfig(StrategyConfig):
    """EWC through the model's loss.

    Attributes:
        ewc_lambda: λ, the weight of the quadratic penalty (which carries the paper's ½).
        mode: ``separate`` (one penalty per earlier task, the paper's) or ``online`` (one penalty whose Fisher
            decays by ``decay_factor`` per task, anchored at the latest task's end).
        decay_factor: γ of ``online`` mode, in (0, 1]; ignored by ``separate``.
        fisher_samples: training samples of the finished task the Fisher is estimated on (one backward pass
            each); null: all of them.
    """

    ewc_lambda: float = 1000.0
    mode: str = "separate"
    decay_factor: float | None = None
    fisher_samples: int | None = 256

    def validate(self) -> None:
        check(self.ewc_lambda >= 0, "strategy.ewc_lambda", f"{self.ewc_lambda}; must be >= 0")
        check(self.mode in MODES, "strategy.mode", f"'{self.mode}' is not one of {list(MODES)}")
        if self.mode == "online":
            check(self.decay_factor is not None and 0 < self.decay_factor <= 1, "strategy.decay_factor",
                  f"{self.decay_factor}; mode=online needs a decay factor in (0, 1]")
        check(self.fisher_samples is None or (isinstance(self.fisher_samples, int) and self.fisher_samples >= 1),
              "strategy.fisher_samples", f"{self.fisher_samples}; must be >= 1 or null (every training sample)")


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train, by qualified name."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def empirical_fisher(ctx: Context, params: dict[str, nn.Parameter], n: int | None, key: int) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher (1/N) Σ_n (∂ℓ_n/∂θ)² of ``params`` over N = ``n`` random samples (None: all) of
    the experience's training source, ℓ_n the model's loss of sample n alone, in eval mode; the samples drawn from
    ``ctx.generator(key)``."""
    source = ctx.train_source
    assert source is not None
    module = ctx.module
    count = len(source) if n is None else min(n, len(source))
    batch = source.take(count, generator=ctx.generator(key))
    names, tensors = list(params), list(params.values())
    fisher = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in tensors]
    training = module.training
    module.eval()
    try:
        for i in range(count):
            one = map_batch(batch, lambda v, i=i: v[i:i + 1])
            with ctx.fabric.autocast():
                loss = module.loss(one)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for f, g in zip(fisher, grads, strict=True):
                if g is not None:
                    f.add_(g.detach().to(f.dtype).square())
    finally:
        module.train(training)
    return {name: f.div_(count) for name, f in zip(names, fisher, strict=True)}


@register("ewc_lm")
class EWCLM(Strategy):
    """EWC's quadratic penalty on the trainable parameters, the empirical Fisher from the model's loss."""

    config_class = EWCLMConfig

    def __init__(self, cfg: EWCLMConfig) -> None:
        super().__init__(cfg)
        self.cfg: EWCLMConfig = cfg
        self.importance: dict[str, torch.Tensor] = {}  # A = Σ_k F_k (online: F̃)
        self.center: dict[str, torch.Tensor] = {}  # c = Σ_k F_k θ*_k / A (online: θ* of the latest task)
        self.constant = 0.0  # C = Σ_i Σ_k F_k,i (θ*_k,i − c_i)²
        self.tasks = 0
        self.last_fisher: dict[str, torch.Tensor] = {}  # F of the latest task (not in the state: inspection only)
        self._scores: dict[str, float] = {}
        self._params: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def attach(self, ctx: Context) -> None:
        """Pair each anchored parameter with its importance and centre on the training device.

        Raises:
            ConfigError: a parameter anchored by an earlier task is gone or frozen (e.g. a new adapter per task).
        """
        params = trainable(ctx.module)
        missing = sorted(set(self.importance) - set(params))
        if missing:
            raise ConfigError(f"strategy '{self.name}' anchors the parameters trained on earlier tasks, but "
                              f"{len(missing)} of them no longer train (e.g. {missing[0]}): EWC needs one shared set "
                              "of trainable parameters (one LoRA adapter, model.adapter=lora, or full fine-tuning), "
                              "not a new adapter per task")
        self.importance = {k: v.to(ctx.device) for k, v in self.importance.items()}
        self.center = {k: v.to(ctx.device) for k, v in self.center.items()}
        self._params = [(params[k], self.importance[k], self.center[k]) for k in self.importance]

    def detach(self, ctx: Context) -> None:
        self._params = []

    def penalty(self, ctx: Context, batch: Any) -> torch.Tensor | None:
        """(λ/2)·(Σ_i A_i (θ_i − c_i)² + C) = (λ/2)·Σ_k Σ_i F_k,i (θ_i − θ*_k,i)² (None on the first task)."""
        if not self._params or self.cfg.ewc_lambda == 0:
            return None
        total = torch.stack([(A * (p - c).square()).sum() for p, A, c in self._params]).sum()
        return 0.5 * self.cfg.ewc_lambda * (total + self.constant)

    @torch.no_grad()
    def _consolidate(self, fisher: dict[str, torch.Tensor], theta: dict[str, torch.Tensor]) -> None:
        """Fold task t's (F_t, θ*_t) into (A, c, C)."""
        if self.cfg.mode == "online":
            gamma = float(self.cfg.decay_factor or 1.0)
            self.importance = {k: F + gamma * self.importance[k] if k in self.importance else F.clone()
                               for k, F in fisher.items()}
            self.center, self.constant = dict(theta), 0.0
            return
        importance, center, constant = {}, {}, self.constant
        for k, F in fisher.items():
            A_old = self.importance.get(k, torch.zeros_like(F))
            c_old = self.center.get(k, theta[k])
            A = A_old + F
            c = torch.where(A > 0, (A_old * c_old + F * theta[k]) / A.clamp_min(torch.finfo(A.dtype).tiny), theta[k])
            # parallel-axis update of Σ_k F_k (θ*_k − c)²: the old sum moves with its centre, plus the new term
            constant += float((A_old.double() * (c_old - c).double().square()).sum()
                              + (F.double() * (theta[k] - c).double().square()).sum())
            importance[k], center[k] = A, c
        self.importance, self.center, self.constant = importance, center, constant

    def after_experience(self, ctx: Context) -> None:
        """F_t of the finished task, folded into the penalty with θ*_t, the trainable parameters' values now
        (skipped after the stream's last task: no task would use it)."""
        if ctx.experience == ctx.n_experiences - 1:
            self._scores = {}
            return
        params = trainable(ctx.module)
        fisher = empirical_fisher(ctx, params, self.cfg.fisher_samples, _FISHER_KEY)
        theta = {k: p.detach().clone() for k, p in params.items()}
        self._consolidate(fisher, theta)
        self.last_fisher = fisher
        self.tasks += 1
        values = torch.cat([f.flatten() for f in fisher.values()]) if fisher else torch.zeros(1)
        self._scores = {"ewc/fisher_mean": float(values.mean()), "ewc/fisher_max": float(values.max()),
                        "ewc/params": float(values.numel())}

    def diagnostics(self) -> dict[str, float]:
        return dict(self._scores)

    def state_dict(self) -> dict[str, Any]:
        """A, c (CPU), C, the task count and the last diagnostics."""
        return {"importance": {k: v.detach().cpu().clone() for k, v in self.importance.items()},
                "center": {k: v.detach().cpu().clone() for k, v in self.center.items()},
                "constant": self.constant, "tasks": self.tasks, "scores": dict(self._scores)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance, self.center = dict(state["importance"]), dict(state["center"])
        self.constant, self.tasks, self._scores = float(state["constant"]), int(state["tasks"]), dict(state["scores"])
        self._params = []
