"""The one object the loop hands to every strategy hook."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from clbench.models.base import ContinualModel
    from clbench.schedule import Schedule
    from clbench.streams import BatchSource, Stream
    from clbench.streams.batches import Batch


@dataclass(frozen=True)
class TaskEndRequest:
    """What a federated strategy's server asks the clients of a task's last round (FOT: GPSE, fot.md §2 steps
    5-6); the federated loop (:mod:`clbench.federated.loop`) carries it.

    Attributes:
        arrays: sent to every such client (FOT: the global bases U_l, for the residuals).
        after_aggregation: False: each client answers right after its local training in the last round, from its
            locally trained model, with its model upload (the code); True: in a separate query after the last
            aggregation, from the global model (fot.md §9's Flower query round).
    """

    arrays: dict[str, torch.Tensor]
    after_aggregation: bool = False


class EpochCallback(Protocol):
    """``on_epoch_end(epoch, mean_training_loss, extra)``; ``extra`` holds other per-epoch scalars to log
    (``lr``, ``valid_loss``)."""

    def __call__(self, epoch: int, loss: float, extra: dict[str, float] | None = None) -> None: ...


class Trainer(Protocol):
    """The engine's services a strategy may use (``ctx.trainer``; :class:`clbench.engine.Engine`)."""

    def stage(self, ctx: Context, loss_fn: Callable[[Batch], torch.Tensor], params: Iterable[torch.nn.Parameter],
              source: BatchSource, epochs: int, lr: float, batch_size: int | None = None,
              key: int = 0, on_epoch_end: Callable[[int, float], None] | None = None) -> list[float]:
        """Train ``params`` on ``loss_fn`` over ``source``: an extra stage (a detector, a DPO pass) with the
        engine's optimizer kind, accumulation, clipping and warm-up, calling ``on_epoch_end(epoch, loss)`` after
        each epoch; each epoch's mean loss."""
        ...

    def validation_loss(self, ctx: Context) -> float | None:
        """Mean loss of the experience's validation split (None without one)."""
        ...


@dataclass
class Context:
    """What a strategy may read. Strategies keep their own state; they never mutate the loop's fields.

    Attributes:
        model: the (Fabric-wrapped) model; ``ctx.module`` is the unwrapped one, whose layers hooks attach to.
        fabric: the Fabric instance (device, precision, collectives).
        stream: the benchmark stream and its spec.
        seed: the run seed; derive any randomness from it (see :meth:`generator`) so a resumed run repeats.
        experience: index of the current experience (0-based).
        train_source: batches of the current experience's training data.
        valid_source: batches of its validation split (None without one).
        sources: factory turning an Avalanche dataset into a batch source on the device (samples that are not
            tensors are collated by the model).
        trainer: the engine's services (an extra training stage, the validation loss).
        optimizer: the current experience's optimizer (set by the engine).
        schedule: the current experience's learning-rate schedule (set by the engine).
        epoch: index of the current epoch within the experience.
        batch_size: the training batch size (projection strategies choose their form with it).
        eval_batch_size: the evaluation batch size (also of validation losses).
        epochs: epochs per experience (for strategies that run their own loop).
        step: optimizer steps taken in the current experience (counted by the engine; refreshes and warm-up
            count in it).
    """

    model: Any
    module: ContinualModel
    fabric: Fabric
    stream: Stream
    seed: int
    batch_size: int
    sources: Any
    trainer: Trainer | None = None
    eval_batch_size: int = 1000
    epochs: int = 1
    experience: int = 0
    train_source: BatchSource | None = None
    valid_source: BatchSource | None = None
    optimizer: torch.optim.Optimizer | None = None
    schedule: Schedule | None = None
    epoch: int = 0
    step: int = 0

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def n_experiences(self) -> int:
        return self.stream.spec.n_tasks

    def eval_order(self, *keys: int) -> torch.Generator:
        """A CPU generator for the order of evaluation batches, seeded from (seed, *keys) only, so every
        evaluation of the same data visits it in the same order. Accuracy does not depend on the order, except
        for nets whose norm layers use batch statistics also in eval (GPM's BN): batches in the stream's order
        may then hold one class each, so evaluation goes in a fixed random order, as GPM's code shuffles its
        test batches."""
        g = torch.Generator()
        g.manual_seed(hash_seed(self.seed, -1, *keys))
        return g

    def generator(self, *keys: int) -> torch.Generator:
        """A CPU generator seeded from (seed, experience, *keys): reproducible across resumes."""
        g = torch.Generator()
        g.manual_seed(hash_seed(self.seed, self.experience, *keys))
        return g


def hash_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (a fixed polynomial hash, stable across processes)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
