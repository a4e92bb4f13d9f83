"""O-LoRA: orthogonal subspace learning for language-model continual learning (Wang et al., Findings of EMNLP
2023; ../shared/methods/olora.md).

One LoRA adapter per task. At the start of task t a fresh pair (A_t Kaiming-uniform, B_t = 0: the function is
unchanged) joins the frozen adapters of the earlier tasks, which stay in the forward pass, so every wrapped layer
computes h = W₀x + (α/r)·Σ_{i≤t} B_i A_i x and inference needs no task id. The loss of task t is (the official
code's form, the default)

    L = L_task + λ1 · Σ_layers Σ_{i<t} Σ_jk |(A_i A_tᵀ)_jk| + λ2 · Σ_layers (‖A_t‖_F + ‖B_t‖_F),

whose first term pushes the row space of A_t (the input subspace the new update reads) away from the earlier
tasks'; ``norm=squared`` takes the paper's Σ (A_i A_tᵀ)_jk² instead (olora.md: the code and the paper differ
there). No orthogonality term on the first task. λ1 = 0 is IncLoRA (``strategy=inclora``); one LoRA trained on
every task in turn (SeqLoRA) is ``strategy=naive`` with ``model.adapter=lora``.

The adapters live in the model (:class:`clbench.models.adapters.LoraAdapters`); the penalty is the subspace core's
:class:`clbench.subspace.LayerOverlap` (:func:`~clbench.subspace.row_overlap` batched over layers); the optimizer
of each task is built over the new adapter only (the others are frozen again after peft's multi-adapter activation
unfreezes them, olora.md "Mapping onto peft").

The frozen adapters run as one: at the end of each task (and at the start of the next, if that did not happen) the
adapters trained so far are folded into the model's stacked adapter (``LoraAdapters.stack_adapters``: A's rows and
B's columns concatenated, as the official code keeps its old adapters), so task t trains with two active branches
per layer, [stack of A_1..A_{t-1}, new], instead of t. The penalty sums over rows, so it is one cross-Gram of the
stacked rows, Σ_jk |([A_1; …; A_{t-1}] A_tᵀ)_jk| = Σ_{i<t} Σ_jk |(A_i A_tᵀ)_jk|, batched over the layers of one
shape. The per-task adapters stay stored, inactive, frozen and untouched: the diagnostics read each of them, the
checkpoints hold them, and :meth:`OLoRA.rebuild` re-creates the adapters and the stack as the state lists them. One
dropout mask on the input of the stack replaces one per old adapter (the official code shares one mask too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from clbench.config import ConfigError, StrategyConfig, check
from clbench.models.adapters import STACK, LoraAdapters
from clbench.subspace import LayerOverlap, principal_angles
from clbench.subspace.overlap import NORMS
from strategies import register
from strategies.base import Strategy

if TYPE_CHECKING:
    from clbench.context import Context


def _per_task(value: Any, key: str) -> list[float]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    check(len(values) >= 1 and all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in values),
          f"strategy.{key}", f"{value}; give one value >= 0, or one per task")
    return [float(v) for v in values]


@dataclass
class OLoRAConfig(StrategyConfig):
    """O-LoRA's keys.

    Attributes:
        lambda1: λ1, the weight of the orthogonality term: one value for every task, or one per task (the long
            benchmark's order-6 schedule, olora.md); a list of another length than the stream is refused.
        lambda2: λ2, the weight of ‖A_t‖_F + ‖B_t‖_F (the code's; 0 on the standard benchmark); scalar or per task.
        norm: ``l1`` (the code: Σ|A_i A_tᵀ|) or ``squared`` (the paper: Σ (A_i A_tᵀ)²).
    """

    lambda1: Any = 0.5
    lambda2: Any = 0.0
    norm: str = "l1"

    def validate(self) -> None:
        _per_task(self.lambda1, "lambda1")
        _per_task(self.lambda2, "lambda2")
        check(self.norm in NORMS, "strategy.norm", f"'{self.norm}' is not one of {list(NORMS)}")


@register("olora")
class OLoRA(Strategy):
    """One frozen LoRA adapter per earlier task, a new one per task, their A's kept apart by the penalty."""

    config_class = OLoRAConfig

    def __init__(self, cfg: OLoRAConfig) -> None:
        super().__init__(cfg)
        self.cfg: OLoRAConfig = cfg
        self.adapters: list[str] = []
        self.stacked: list[str] = []
        self._old: dict[str, list[torch.Tensor]] = {}
        self._overlap = LayerOverlap(())
        self._new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scores: dict[str, float] = {}

    def _model(self, ctx: Context) -> LoraAdapters:
        module = ctx.module
        if not isinstance(module, LoraAdapters) or module.lora_config is None:
            raise ConfigError(f"strategy '{self.name}' trains one LoRA adapter per task: it needs a language model "
                              "with LoRA (model=causal_lm or seq2seq_lm, model.adapter=lora)")
        return module

    def setup(self, ctx: Context) -> None:
        self.adapters = self._model(ctx).adapter_names()[:1]  # the model's own adapter serves the first task
        self._lambda1 = self._schedule("lambda1", ctx.n_experiences)
        self._lambda2 = self._schedule("lambda2", ctx.n_experiences)

    def _schedule(self, key: str, T: int) -> list[float]:
        """``strategy.<key>`` as one value per task (a single value: every task).

        Raises:
            ConfigError: a list whose length is neither 1 nor the number of tasks (never cut or repeated).
        """
        values = _per_task(getattr(self.cfg, key), key)
        check(len(values) in (1, T), f"strategy.{key}", f"{len(values)} values for {T} tasks; give one value, or "
              "one per task")
        return values * T if len(values) == 1 else values

    def before_experience(self, ctx: Context) -> None:
        model = self._model(ctx)
        model.add_task_adapter(self.adapters, ctx.experience)
        self._stack(model, self.adapters[:-1])  # already stacked at the end of the last task, normally
        self._activate(model)

    def _stack(self, model: LoraAdapters, names: list[str]) -> None:
        """Make the model's stacked adapter hold the frozen adapters ``names`` (none: leave it)."""
        if names and names != self.stacked:
            model.stack_adapters(names)
            self.stacked = list(names)

    def _activate(self, model: LoraAdapters) -> None:
        """Activate the stack and the adapters outside it; the last of those (the current task's) trains."""
        rest = [a for a in self.adapters if a not in self.stacked]
        model.use_adapters(([STACK] if self.stacked else []) + rest, trainable=rest[-1:])

    def attach(self, ctx: Context) -> None:
        """The new pair (A_t, B_t) and the A's of each frozen adapter (detached; the diagnostics), per wrapped
        layer, and the penalty's operands batched over the layers of one shape: the frozen rows stacked (as the
        model's stack holds them; they do not change during the task) and the new A's."""
        model = self._model(ctx)
        factors = [model.lora_factors(a) for a in self.adapters]
        self._new = factors[-1]
        self._old = {layer: [f[layer][0].detach() for f in factors[:-1]] for layer in self._new}
        self._overlap = LayerOverlap((torch.cat(self._old[layer], 0), A) for layer, (A, _) in self._new.items()
                                     if self._old[layer])

    def orthogonality(self) -> torch.Tensor:
        """Σ_layers Σ_{i<t} ‖A_i A_tᵀ‖ (``norm``) of the current adapters: per group of layers, one batched
        cross-Gram of the stacked frozen rows with the new A's (the same sum over the rows)."""
        return self._overlap(self.cfg.norm)

    def penalty(self, ctx: Context, batch: Any) -> torch.Tensor | None:
        t = ctx.experience
        l1, l2 = self._lambda1[t], self._lambda2[t]
        terms = []
        if t > 0 and l1 > 0:
            terms.append(l1 * self.orthogonality())
        if l2 > 0:
            terms.append(l2 * torch.stack([A.norm() + B.norm() for A, B in self._new.values()]).sum())
        return sum(terms[1:], terms[0]) if terms else None

    @torch.no_grad()
    def after_experience(self, ctx: Context) -> None:
        """Diagnostics of the task's adapter: its orthogonality term, its norms and the principal angles between
        its A's row space and each earlier adapter's (degrees; min and mean over the wrapped layers). Then the
        task's adapter joins the stack (the function is unchanged, to rounding), and the stack alone is active."""
        self._diagnose(ctx.experience)
        model = self._model(ctx)
        self._stack(model, self.adapters)
        self._activate(model)

    def _diagnose(self, t: int) -> None:
        self._scores = {"olora_orth": float(self.orthogonality()) if t > 0 else 0.0,
                        "adapter_norm_A": float(sum(A.norm() for A, _ in self._new.values())),
                        "adapter_norm_B": float(sum(B.norm() for _, B in self._new.values()))}
        for i in range(t):
            angles = [principal_angles(self._old[layer][i].T.double(), A.T.double()).rad2deg()
                      for layer, (A, _) in self._new.items()]
            self._scores[f"adapter_angle_min/{i}"] = float(min(a.min() for a in angles))
            self._scores[f"adapter_angle_mean/{i}"] = float(torch.cat(angles).mean())

    def diagnostics(self) -> dict[str, float]:
        return dict(self._scores)

    def state_dict(self) -> dict[str, Any]:
        return {"adapters": list(self.adapters), "stacked": list(self.stacked), "scores": dict(self._scores)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = list(state["adapters"])
        self._saved_stacked = list(state.get("stacked", []))  # none in checkpoints from before the stack
        self._scores = dict(state["scores"])

    def rebuild(self, ctx: Context) -> None:
        """Re-create the adapters the run had added and its stack (their weights load next), and activate them as
        it had."""
        model = self._model(ctx)
        self.adapters = model.restore_adapters(self.adapters, self._saved)
        self._stack(model, self._saved_stacked)
        self._activate(model)


@dataclass
class IncLoRAConfig(OLoRAConfig):
    """IncLoRA: O-LoRA's adapters without the orthogonality term (λ1 = 0; olora.md)."""

    lambda1: Any = 0.0


@register("inclora")
class IncLoRA(OLoRA):
    """A new LoRA adapter per task, earlier ones frozen and summed, no penalty (O-LoRA with λ1 = 0)."""

    config_class = IncLoRAConfig
