"""Joint training: the multitask upper bound.

At experience i the model trains on the union of the training data of experiences 0..i (Avalanche's
"Cumulative"), so the final row of R is a model trained jointly on every task; ACC of that row is the
"Multitask" upper bound of the papers' tables. Its cost grows as T(T+1)/2 experience-epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING

from clbench.config import StrategyConfig
from strategies import register
from strategies.base import Strategy

if TYPE_CHECKING:
    from clbench.context import Context
    from clbench.streams import BatchSource


@dataclass
class JointConfig(StrategyConfig):
    """Joint training has no keys of its own."""


@register("joint")
class Joint(Strategy):
    """Train on everything seen so far."""

    config_class = JointConfig

    def train_source(self, ctx: Context) -> BatchSource:
        stream = ctx.stream.benchmark.train_stream
        datasets = [stream[j].dataset for j in range(ctx.experience + 1)]
        return ctx.sources(reduce(lambda a, b: a.concat(b), datasets))
