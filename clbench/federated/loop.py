"""The in-process federated continual loop: rounds of sampled clients and a server (fot.md §2; DESIGN.md
"Federated training is a second outer loop").

Per task t with R_t rounds (``federated.rounds_per_task``); round g counts over the whole run::

    parts_t = the task's training samples split over the K clients (federated.partition), seeded by (seed, t)
    round g:  S = C clients among those holding a part of t, without replacement, drawn from (seed, g) alone,
                  so every method sees the same clients in the same round (the code seeds NumPy with the round
                  index, step 1)
              θ_k = local training of k ∈ S from θ (clbench.federated.client, step 2)
              θ̄ = (1/C) Σ_k θ_k over every state-dict entry (uniform, as the code, step 3)
              Δ = strategy.aggregate(θ̄ − θ);  θ ← θ + Δ          (FedAvg: Δ as is; FOT: FedProject, step 4)
    last round, if strategy.task_end_request() asks: the clients of S report (with their model upload, or in a
              query after the aggregation); the reports are summed, under pairwise masking with
              federated.secure_sum, and strategy.task_end(Σ) runs (FOT: GPSE, steps 5-6)

The loop knows no method: it samples, hands messages (:mod:`clbench.federated.messages`) to its clients
through a :class:`Clients` transport, averages, counts the bytes of the tensors it moves
(:func:`clbench.federated.comm.tensor_bytes`) and calls the strategy's server hooks. With the same seed FOT and
FedAvg see the same partitions, clients and client randomness, so FOT's first task (no bases yet) is FedAvg's
bit for bit.

Engines differ only in the transport: :class:`InProcessClients` (``federated.engine=inprocess``) runs each
client here, one after another; :class:`clbench.flower.app.FlowerClients`
(``federated.engine=flower``) sends the same messages to Flower SuperNodes, whose ClientApps run the same
:func:`clbench.federated.client.run_client`. Both give the same accuracy matrix.

Resume: the loop's position (the task and the next round in it, the run's round index) and the bytes counted so
far are :meth:`FederatedLoop.state_dict`; the global θ is ``ctx.module`` at every round end (the run's checkpoint
saves it as the model) and the strategy's server state is its own ``state_dict``. Nothing else persists across
rounds: clients keep no state (a fresh optimizer per round, their randomness and the round's sample derived from
(seed, round), the split from (seed, task)), so :meth:`FederatedLoop.train_task` from a restored round repeats the
uninterrupted run exactly. The run checkpoints after every round (``on_round_end``) and every task
(:mod:`clbench.experiment`); ``resume=true`` is refused only for ``federated.engine=flower``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor
from torch.nn import Module

from clbench.config import ConfigError, EngineConfig, FederatedConfig, rounds_per_task
from clbench.context import Context, hash_seed
from clbench.engine import Engine
from clbench.federated.client import run_client
from clbench.federated.comm import Traffic, tensor_bytes
from clbench.federated.messages import FromClient, ToClient
from clbench.federated.partition import partition
from clbench.federated.secure_sum import secure_sum

if TYPE_CHECKING:
    from clbench.streams import BatchSource
    from strategies.fedavg import FedAvg

_PARTITION_KEY = 22  # randomness of each task's split over the clients
_SAMPLE_KEY = 23  # randomness of each round's client sample

RoundCallback = Callable[[int, int, dict[str, float]], None]
"""``on_round(round_in_task, round_in_run, metrics)`` after each round's aggregation."""

RoundEndCallback = Callable[[int], None]
"""``on_round_end(next_round_in_task)`` once a round is complete (its task-end exchange included), with the global
θ in ``ctx.module`` and :meth:`FederatedLoop.state_dict` at the next round: where a checkpoint goes."""


def client_engine_config(engine_cfg: EngineConfig, cfg: FederatedConfig) -> EngineConfig:
    """The clients' engine settings: the run's, with ``local_epochs`` epochs per round."""
    return dataclasses.replace(engine_cfg, epochs=cfg.local_epochs)


def uniform_mean(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """θ̄ = (1/C) Σ_k θ_k entry by entry, summed in the given order (fot.md §2 step 3: uniform, not weighted by
    sample counts, as the code); integer entries (e.g. BatchNorm's batch counter) are floor-divided."""
    if not states:
        raise ValueError("uniform_mean: no client states")
    out: dict[str, Tensor] = {}
    for key, first in states[0].items():
        total = first.clone()
        for state in states[1:]:
            total += state[key]
        out[key] = total / len(states) if total.is_floating_point() else total.div(len(states), rounding_mode="floor")
    return out


def split_task(ctx: Context, cfg: FederatedConfig, task: int) -> list[Tensor]:
    """Task ``task``'s training-sample indices per client (``federated.partition``), seeded by (run seed, task):
    the server and every client compute the same split.

    Raises:
        ConfigError: the task cannot be split as asked (e.g. more clients than samples).
    """
    labels = torch.as_tensor(list(ctx.stream.benchmark.train_stream[task].dataset.targets))
    try:
        return partition(labels, cfg.clients, cfg.partition, hash_seed(ctx.seed, _PARTITION_KEY, task),
                         alpha=cfg.alpha)
    except ValueError as e:
        raise ConfigError(f"bad value for 'federated.clients' or 'federated.partition': task {task} has "
                          f"{labels.numel()} training samples to split over {cfg.clients} clients "
                          f"({cfg.partition}): {e}") from e


def client_source(ctx: Context, task: int, part: Tensor) -> BatchSource:
    """A client's local data of task ``task``: its part of the task's training set (see :func:`split_task`)."""
    return ctx.sources(ctx.stream.benchmark.train_stream[task].dataset.subset(part.tolist()))


class Clients(Protocol):
    """A federated engine's transport: delivers one message to each of some clients and returns their replies."""

    def exchange(self, msg: ToClient, clients: Sequence[int]) -> list[FromClient]:
        """The replies of ``clients`` (ascending ids) to ``msg``, in the same order."""
        ...


class InProcessClients:
    """Every client runs in this process on the server's module, one after another (the default engine).

    Args:
        ctx: the run's context (its module serves every client in turn).
        engine: the clients' engine (``local_epochs`` epochs).
        strategy: the run's strategy (its client hooks).
        parts: each task's sample indices per client (:func:`split_task`).
    """

    def __init__(self, ctx: Context, engine: Engine, strategy: FedAvg, parts: Sequence[Sequence[Tensor]]) -> None:
        self.ctx, self.engine, self.strategy, self.parts = ctx, engine, strategy, parts
        self._task: int = -1
        self._sources: dict[int, BatchSource] = {}

    def exchange(self, msg: ToClient, clients: Sequence[int]) -> list[FromClient]:
        if msg.task != self._task:  # a client's batch source is built once per task, when first sampled
            self._task, self._sources = msg.task, {}
        for k in clients:
            if k not in self._sources:
                self._sources[k] = client_source(self.ctx, msg.task, self.parts[msg.task][k])
        return [run_client(k, msg, self._sources[k], self.ctx, self.engine, self.strategy) for k in clients]


class FederatedLoop:
    """The server's side of a federated run.

    Args:
        cfg: the federated setting.
        engine_cfg: the clients' optimizer settings (``epochs`` is replaced by ``cfg.local_epochs``).
        ctx: the run's context; its module holds θ_0 (and serves every client in turn in-process).
        strategy: a federated strategy (:class:`strategies.fedavg.FedAvg` or a subclass), already set up.
        clients: the transport to the clients (None: :class:`InProcessClients`).

    Raises:
        ConfigError: a task cannot be split as asked (e.g. more clients than samples).
    """

    def __init__(self, cfg: FederatedConfig, engine_cfg: EngineConfig, ctx: Context, strategy: FedAvg,
                 clients: Clients | None = None) -> None:
        self.cfg, self.strategy, self.seed = cfg, strategy, ctx.seed
        self.engine = Engine(client_engine_config(engine_cfg, cfg), ctx.fabric)
        self.rounds = rounds_per_task(cfg.rounds_per_task, ctx.n_experiences)
        self.parts = [split_task(ctx, cfg, t) for t in range(ctx.n_experiences)]
        self.state = {k: v.detach().clone() for k, v in ctx.module.state_dict().items()}  # the global θ
        self.round_index = 0  # rounds completed over the run (the next round's index)
        self.task, self.next_round = 0, 0  # the task in progress and its next round
        self.traffic = Traffic(0, 0)  # bytes of the tasks completed
        self._task_traffic, self._gpse_traffic = Traffic(0, 0), Traffic(0, 0)  # of the task in progress so far
        self.clients = clients or InProcessClients(ctx, self.engine, strategy, self.parts)

    def _sample(self, holders: list[int]) -> list[int]:
        """The round's clients, ascending: C of ``holders`` (all of them when they are at most C)."""
        if len(holders) <= self.cfg.per_round:
            return holders
        gen = torch.Generator().manual_seed(hash_seed(self.seed, _SAMPLE_KEY, self.round_index))
        pick = torch.randperm(len(holders), generator=gen)[: self.cfg.per_round]
        return [holders[i] for i in sorted(pick.tolist())]

    def _exchange(self, msg: ToClient, chosen: list[int]) -> tuple[list[FromClient], Traffic, Traffic]:
        """Send ``msg`` to each chosen client and collect the replies, with the bytes moved for the model
        (θ down, θ_k up) and for the task-end exchange (request down, reports up)."""
        if self.cfg.secure_sum and msg.request is not None:
            msg = dataclasses.replace(msg, peers=tuple(chosen))
        replies = self.clients.exchange(msg, chosen)
        model = Traffic(up=sum(tensor_bytes(m.state or {}) for m in replies),
                        down=len(chosen) * tensor_bytes(msg.state))
        report = Traffic(up=sum(tensor_bytes(m.report or {}) for m in replies),
                         down=len(chosen) * tensor_bytes(msg.request or {}))
        return replies, model, report

    def _aggregate(self, ctx: Context, states: Sequence[Mapping[str, Tensor]]) -> None:
        """θ ← θ + strategy.aggregate(θ̄ − θ) (fot.md §2 steps 3-4)."""
        update = {k: v - self.state[k] for k, v in uniform_mean(states).items()}
        update = self.strategy.aggregate(ctx, update)
        self.state = {k: v + update[k] for k, v in self.state.items()}

    def train_task(self, ctx: Context, on_round: RoundCallback, start_round: int = 0,
                   on_round_end: RoundEndCallback | None = None) -> dict[str, float]:
        """Train task ``ctx.experience``: its rounds from ``start_round`` on, then the strategy's task-end exchange.
        Leaves the global θ in ``ctx.module`` and returns the task's bytes (``task_bytes_*``: everything,
        ``gpse_bytes_*``: the task-end exchange).

        ``start_round`` > 0 continues the task where a restored :meth:`load_state_dict` stands; ``start_round`` =
        the task's round count only finishes it. ``on_round_end`` runs after every round (see
        :data:`RoundEndCallback`).

        Raises:
            ValueError: ``start_round`` is not where the restored loop stands.
        """
        t = ctx.experience
        if start_round and (self.task, self.next_round) != (t, start_round):
            raise ValueError(f"cannot continue task {t} at round {start_round}: the federated loop stands at task "
                             f"{self.task}, round {self.next_round}")
        if not start_round:
            self._task_traffic, self._gpse_traffic = Traffic(0, 0), Traffic(0, 0)
        self.task, self.next_round = t, start_round
        holders = [k for k, part in enumerate(self.parts[t]) if part.numel()]
        for r in range(start_round, self.rounds[t]):
            request = self.strategy.task_end_request(ctx) if r == self.rounds[t] - 1 else None
            with_upload = None if request is None or request.after_aggregation else request.arrays
            chosen = self._sample(holders)
            replies, model, report = self._exchange(ToClient(t, self.round_index, self.state, with_upload), chosen)
            self._aggregate(ctx, [m.state for m in replies if m.state is not None])
            losses = [m.loss for m in replies if m.loss is not None]
            on_round(r, self.round_index, {"round_loss": sum(losses) / len(losses), "bytes_up": model.up + report.up,
                                           "bytes_down": model.down + report.down, "round_clients": len(chosen)})
            task, gpse = self._task_traffic + model + report, self._gpse_traffic + report
            if request is not None:
                if with_upload is None:  # a query of the aggregated model
                    query = ToClient(t, self.round_index, self.state, request.arrays, train=False)
                    replies, model, report = self._exchange(query, chosen)
                    task, gpse = task + model + report, gpse + model + report
                self.strategy.task_end(ctx, secure_sum([m.report for m in replies if m.report is not None]))
            self._task_traffic, self._gpse_traffic = task, gpse
            self.round_index += 1
            self.next_round = r + 1
            ctx.module.load_state_dict(self.state)  # θ, for a checkpoint (every client loads it first anyway)
            if on_round_end is not None:
                on_round_end(r + 1)
        ctx.module.load_state_dict(self.state)
        task, gpse = self._task_traffic, self._gpse_traffic
        self.traffic += task
        self.task, self.next_round = t + 1, 0
        self._task_traffic, self._gpse_traffic = Traffic(0, 0), Traffic(0, 0)
        return {"task_bytes_up": task.up, "task_bytes_down": task.down, "gpse_bytes_up": gpse.up,
                "gpse_bytes_down": gpse.down}

    def state_dict(self) -> dict[str, int]:
        """The loop's position and byte counts, for a checkpoint (θ is ``ctx.module``'s, the strategy's state its
        own): with them :meth:`load_state_dict` and :meth:`train_task` from ``next_round`` repeat the run."""
        return {"task": self.task, "next_round": self.next_round, "round_index": self.round_index,
                "bytes_up": self.traffic.up, "bytes_down": self.traffic.down,
                "task_bytes_up": self._task_traffic.up, "task_bytes_down": self._task_traffic.down,
                "gpse_bytes_up": self._gpse_traffic.up, "gpse_bytes_down": self._gpse_traffic.down}

    def load_state_dict(self, state: Mapping[str, int], module: Module) -> None:
        """Restore :meth:`state_dict`; the global θ is ``module``'s (load the checkpoint's weights first)."""
        self.task, self.next_round, self.round_index = state["task"], state["next_round"], state["round_index"]
        self.traffic = Traffic(state["bytes_up"], state["bytes_down"])
        self._task_traffic = Traffic(state["task_bytes_up"], state["task_bytes_down"])
        self._gpse_traffic = Traffic(state["gpse_bytes_up"], state["gpse_bytes_down"])
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def totals(self) -> dict[str, float]:
        """Bytes moved over the whole run so far (``bytes_up_total``, ``bytes_down_total``)."""
        return {"bytes_up_total": self.traffic.up, "bytes_down_total": self.traffic.down}
