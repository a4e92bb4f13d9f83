"""What the server and the clients of a federated run send each other (fot.md §2-3).

The loop (:mod:`clbench.federated.loop`) moves these and nothing else: a client's reply holds its model θ_k,
the strategy's report (FOT: per-layer sketches d_l × m_l and scalars) and its training loss, never a tensor
with one entry per local sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from clbench.context import TaskEndRequest

__all__ = ["FromClient", "TaskEndRequest", "ToClient"]


@dataclass(frozen=True)
class ToClient:
    """Server → client.

    Attributes:
        task: the task index t.
        round: the round's index over the whole run (tasks one after another).
        state: the global model θ (every state-dict entry).
        request: the strategy's task-end request arrays (None: no report wanted).
        train: run the local epochs (False: a query that only answers ``request`` from θ).
        peers: the clients whose reports the server sums securely (each masks its report for a pairwise-masked
            sum among them, :class:`clbench.federated.secure_sum.PairwiseMasking`); empty: reports go unmasked.
    """

    task: int
    round: int
    state: dict[str, Tensor]
    request: dict[str, Tensor] | None = None
    train: bool = True
    peers: tuple[int, ...] = ()


@dataclass(frozen=True)
class FromClient:
    """Client → server.

    Attributes:
        client: the client's id in 0…K−1.
        state: θ_k after local training (None for a query).
        report: the answer to the request, masked when the round sums securely (None: none asked).
        loss: the mean training loss of its last local epoch (None for a query).
    """

    client: int
    state: dict[str, Tensor] | None
    report: dict[str, Tensor] | None
    loss: float | None
