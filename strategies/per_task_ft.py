"""PerTaskFT: one model per task, each scored on its own task — an upper reference that uses task identity.

O-LoRA's table (olora.md) lists PerTaskFT beside MTL as a reference, not a continual method: a separate model is
fine-tuned on each task from the pretrained weights, and task j's test set is scored with task j's model, so no
task can interfere with another (BWT = 0 by construction) and only the task identity at test time separates it
from the continual methods. clbench keeps the separate models as separate LoRA adapters on one frozen base model:
task t trains a fresh adapter (A Kaiming-uniform, B = 0: the pretrained function) alone, the earlier ones stay as
they were; before test experience j is scored (:meth:`Strategy.evaluate_as`) only adapter j is active, and a task
not yet trained is scored with the base model alone (its model before training), which gives FWT its meaning.

The paper fine-tunes all weights of a separate T5-large per task; keeping T full copies of the model is what
this file does not do (``model.adapter=none`` is refused): the per-task LoRA adapters are the same reference for
the LoRA methods of the table, at their rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clbench.config import ConfigError
from clbench.models.adapters import LoraAdapters
from strategies import register
from strategies.base import Strategy

if TYPE_CHECKING:
    from clbench.context import Context


@register("per_task_ft")
class PerTaskFT(Strategy):
    """A LoRA adapter per task, trained alone from the base model; test experience j scored with adapter j."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.adapters: list[str] = []

    def _model(self, ctx: Context) -> LoraAdapters:
        module = ctx.module
        if not isinstance(module, LoraAdapters) or module.lora_config is None:
            raise ConfigError(f"strategy '{self.name}' keeps one model per task as one LoRA adapter per task: it "
                              "needs a language model with LoRA (model=causal_lm or seq2seq_lm, "
                              "model.adapter=lora); T full copies of the model (model.adapter=none) are not kept")
        return module

    def setup(self, ctx: Context) -> None:
        self.adapters = self._model(ctx).adapter_names()[:1]  # the model's own adapter is task 0's

    def before_experience(self, ctx: Context) -> None:
        model = self._model(ctx)
        model.add_task_adapter(self.adapters, ctx.experience)
        self._train_current(model)

    def _train_current(self, model: LoraAdapters) -> None:
        model.use_adapters(self.adapters[-1:], trainable=self.adapters[-1:])

    def evaluate_as(self, ctx: Context, task: int | None) -> None:
        model = self._model(ctx)
        if task is None:
            self._train_current(model)
        elif task < len(self.adapters):  # trained (or, before any training, task 0's fresh adapter: the base model)
            model.use_adapters([self.adapters[task]])
        else:
            model.use_adapters([])  # not trained yet: the base model is its model

    def state_dict(self) -> dict[str, Any]:
        return {"adapters": list(self.adapters)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = list(state["adapters"])

    def rebuild(self, ctx: Context) -> None:
        """Re-create the adapters the run had added (their weights load next) and train the last one."""
        model = self._model(ctx)
        self.adapters = model.restore_adapters(self.adapters, self._saved)
        self._train_current(model)
