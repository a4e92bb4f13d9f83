"""FedAvg in FOT's continual protocol: the federated baseline, and the base class of federated strategies.

The server averages the sampled clients' models uniformly and applies the mean update as is (McMahan et al.
2017, with the uniform weights of FOT's code; fot.md §2 steps 1-3, §4 "FedAvg baseline = same command with
``normal`` instead of ``orth``"): no projection, so old tasks are forgotten as the global model drifts.

Federated hooks, called by :mod:`clbench.federated.loop` (besides ``setup``, once, and the engine's hooks on
each client's local training)::

    per round, server:         update = aggregate(ctx, θ̄ − θ);  θ ← θ + update
    last round of a task:      request = task_end_request(ctx)            (None: no task-end exchange)
      each client of the round:  report = client_report(client ctx, request.arrays)
      server:                    task_end(ctx, Σ reports)

``ctx`` is the server's context (``ctx.experience`` = the task) except in ``client_report``, which gets the
client's: ``ctx.module`` holds the client's model and ``ctx.train_source`` its local data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from clbench.config import StrategyConfig
from strategies import register
from strategies.base import Strategy

if TYPE_CHECKING:
    from clbench.context import Context, TaskEndRequest


@dataclass
class FedAvgConfig(StrategyConfig):
    """FedAvg has no keys of its own (the federated setting is ``federated.*``)."""


@register("fedavg")
class FedAvg(Strategy):
    """Uniform FedAvg: every hook passes through."""

    config_class = FedAvgConfig
    federated = True

    def aggregate(self, ctx: Context, update: dict[str, Tensor]) -> dict[str, Tensor]:
        """The update applied to the global model, from the mean client update Δ = θ̄ − θ (all state entries)."""
        return update

    def task_end_request(self, ctx: Context) -> TaskEndRequest | None:
        """What to ask the clients of the task's last round at its end (None: nothing)."""
        return None

    def client_report(self, ctx: Context, request: dict[str, Tensor]) -> dict[str, Tensor]:
        """A client's answer to the request's arrays; only called when :meth:`task_end_request` asks."""
        raise NotImplementedError

    def task_end(self, ctx: Context, total: dict[str, Tensor]) -> None:
        """The server's step with the sum of the clients' reports; only called when :meth:`task_end_request`
        asks."""
        raise NotImplementedError
