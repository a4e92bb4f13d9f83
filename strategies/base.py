"""The strategy interface shared by every method, from an MLP to a federated server or a LoRA-adapted LM.

Call order for experience i (see ``clbench.experiment``)::

    setup(ctx)                              once, before the first experience
    before_experience(ctx)                  state changes for experience i (new heads, rows, bases)
    attach(ctx)                             runtime hooks that follow from the state (projectors, forward hooks)
    per batch: loss = objective(ctx, batch, model.loss) + penalty(ctx, batch); backward; project(ctx);
      optimizer.step()                      (objective's default: model.loss(batch))
      per epoch: validation loss (if any); ctx.schedule.step; after_epoch(ctx, report)
      (or, for a strategy that owns its whole loop, train_experience(ctx, on_epoch_end) instead of the engine)
    detach(ctx)                             remove the runtime hooks
    after_experience(ctx)                   e.g. new bases from the layer inputs
    evaluation on every test experience     evaluate_as(ctx, j) before test experience j, evaluate_as(ctx, None) after;
                                            scored_source(ctx, j, source): the source it is scored on

A resumed run restores ``load_state_dict``, then ``rebuild`` (what the strategy added to the model during the
run, e.g. one adapter per task, re-created from that state), then the saved weights; in the middle of
experience i it calls ``attach`` again and never repeats ``before_experience``. So ``before_experience`` holds
the state changes, ``rebuild`` and ``attach`` only what can be re-created from the state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from clbench.config import StrategyConfig

if TYPE_CHECKING:
    from clbench.context import Context, EpochCallback
    from clbench.schedule import EpochReport
    from clbench.streams import BatchSource
    from clbench.streams.batches import Batch


class Strategy:
    """Base class: every hook is a no-op, so naive fine-tuning is ``Strategy`` itself."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    federated: ClassVar[bool] = False  # True: trained by clbench.federated.loop (see strategies.fedavg.FedAvg)

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Return the model to train (adapters wrap it here); called once, before Fabric sets it up."""
        return model

    def setup(self, ctx: Context) -> None:
        """Called once, before the first experience."""

    def before_experience(self, ctx: Context) -> None:
        """State changes at the start of experience ``ctx.experience`` (not repeated on resume)."""

    def attach(self, ctx: Context) -> None:
        """Install runtime hooks that follow from the state; called again after a resume."""

    def train_source(self, ctx: Context) -> BatchSource:
        """The data of this experience's training; the current experience's by default."""
        assert ctx.train_source is not None
        return ctx.train_source

    def anchors(self, ctx: Context, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-sample tensors the strategy's loss needs from the model *as the experience starts* (first
        dimension the batch's), beside the model's own (:meth:`clbench.models.base.ContinualModel.anchors`): the
        loop computes them once then, over the experience's training (and validation) batches in eval mode
        without gradients, adds them to its batches under these keys and keeps them in the checkpoint (a resumed
        experience reads them). NPO: π_ref's sequence log-probabilities. Default: none."""
        return {}

    def objective(self, ctx: Context, batch: Batch, loss: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch, a scalar with a graph; ``loss`` is the engine's model loss (Fabric-aware:
        the wrapped model's under mixed precision or several devices). Default: ``loss(batch)``. Only called if
        overridden; :meth:`penalty` is still added after it, and the epoch loss the run logs is their sum.
        Unlearning methods define their objective on the forget set here (gradient ascent: ``-loss(batch)``); the
        validation loss stays the model's."""
        return loss(batch)

    def penalty(self, ctx: Context, batch: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """A regulariser added to the model's loss (None: nothing). Only called if overridden."""
        return None

    def project(self, ctx: Context) -> None:
        """Reshape the gradients in place, after backward (and any all-reduce), before the optimizer step.
        Only called if overridden."""

    def parameters_to_train(self, ctx: Context) -> Iterator[torch.nn.Parameter]:
        """Parameters the experience's optimizer updates; all trainable ones by default."""
        return (p for p in ctx.module.parameters() if p.requires_grad)

    def after_epoch(self, ctx: Context, report: EpochReport) -> None:
        """Called after each epoch the schedule does not stop, before the epoch's checkpoint; may change the
        learning rate through ``ctx.schedule.set_lr``. Only called if overridden."""

    def train_experience(self, ctx: Context, on_epoch_end: EpochCallback) -> None:
        """Train experience ``ctx.experience`` with the strategy's own loop (e.g. an Avalanche strategy), calling
        ``on_epoch_end(epoch, mean_loss, extra)`` after each epoch. Only called if overridden; the engine's loop (and
        with it ``objective``, ``penalty`` and ``project``) is then not used, ``ctx.optimizer`` is still this
        experience's fresh optimizer, and a resumed run restarts the interrupted experience from its beginning."""
        raise NotImplementedError

    def detach(self, ctx: Context) -> None:
        """Remove what :meth:`attach` installed."""

    def after_experience(self, ctx: Context) -> None:
        """Called after training on experience ``ctx.experience``, before its evaluation."""

    def evaluate_as(self, ctx: Context, task: int | None) -> None:
        """Called before test experience ``task`` is scored, and with None once every one is. Methods score without
        task identity, so this does nothing; an oracle reference that keeps one model per task (``per_task_ft``)
        switches to task ``task``'s model here and back to the training state on None."""

    def scored_source(self, ctx: Context, task: int, source: BatchSource) -> BatchSource:
        """The source test experience ``task`` is scored on, called after :meth:`evaluate_as`: ``source`` itself
        by default. A method whose inference needs per-input fields adds them here (O3: each test sample's adapter
        weight w(x) from its OOD detectors, :data:`clbench.models.adapters.GATE`)."""
        return source

    def diagnostics(self) -> dict[str, float]:
        """Scalars logged after each experience (e.g. basis size per layer)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume; tensors are fine."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def rebuild(self, ctx: Context) -> None:
        """On resume, after :meth:`load_state_dict` and before the saved weights load into ``ctx.module``:
        re-create the parameters and modules the strategy added to the model during the run (adapters), as its
        state describes, so the weights find them."""

    @classmethod
    def overrides(cls, hook: str) -> bool:
        """Whether this class overrides ``hook`` (the loop skips no-op hot-path hooks)."""
        return getattr(cls, hook) is not getattr(Strategy, hook)
