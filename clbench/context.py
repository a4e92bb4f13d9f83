"""The one object the loop hands to every strategy hook."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from clbench.models.base import ContinualModel
    from clbench.schedule import Schedule
    from clbench.streams import BatchSource, Stream


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
        sources: factory turning an Avalanche dataset into a batch source on the device.
        optimizer: the current experience's optimizer (set by the engine).
        schedule: the current experience's learning-rate schedule (set by the engine).
        epoch: index of the current epoch within the experience.
        batch_size: the training batch size (projection strategies choose their form with it).
        eval_batch_size: the evaluation batch size (also of validation losses).
        epochs: epochs per experience (for strategies that run their own loop).
    """

    model: Any
    module: ContinualModel
    fabric: Fabric
    stream: Stream
    seed: int
    batch_size: int
    sources: Any
    eval_batch_size: int = 1000
    epochs: int = 1
    experience: int = 0
    train_source: BatchSource | None = None
    valid_source: BatchSource | None = None
    optimizer: torch.optim.Optimizer | None = None
    schedule: Schedule | None = None
    epoch: int = 0

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
