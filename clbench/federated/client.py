"""A client's side of a round (fot.md §2 steps 2 and 5): local training with the engine, then its report.

The client loads the global θ into the shared module, trains E local epochs with :class:`clbench.engine.Engine`
exactly as a centralized experience trains (a fresh optimizer per round, as the code; the strategy's
``penalty``/``project`` hooks apply if it has them), and answers the strategy's task-end request with
``strategy.client_report`` (FOT: the residual sketches), masked for a secure sum when the round names its
peers. The same function serves the in-process engine and Flower's ClientApp
(:mod:`clbench.flower.app`): a client's reply depends only on the message, the run's config and its
local data.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from clbench.context import Context, hash_seed
from clbench.federated.messages import FromClient, ToClient
from clbench.federated.secure_sum import PairwiseMasking

if TYPE_CHECKING:
    from clbench.engine import Engine
    from clbench.streams import BatchSource
    from strategies.fedavg import FedAvg

_CLIENT_KEY = 21  # stream of randomness of a client in a round
_MASK_KEY = 24  # master seed of each secure sum's pairwise masks (the clients', unknown to the server)


def client_context(ctx: Context, client: int, msg: ToClient, source: BatchSource, epochs: int) -> Context:
    """The client's view of the run: its own data, and randomness derived from (run seed, round, client id),
    so batch orders differ between rounds and clients and a client's private draws (FOT's G_k) are its own."""
    return dataclasses.replace(ctx, seed=hash_seed(ctx.seed, _CLIENT_KEY, msg.round, client), experience=msg.task,
                               train_source=source, valid_source=None, optimizer=None, schedule=None, epoch=0,
                               epochs=epochs)


def run_client(client: int, msg: ToClient, source: BatchSource, ctx: Context, engine: Engine,
               strategy: FedAvg) -> FromClient:
    """Client ``client``'s reply to ``msg``, computed on ``ctx.module`` (overwritten with θ, then trained).

    ``ctx`` is the run's context (its seed the run seed); the pairwise masks of a secure sum derive from
    (run seed, round), which stands in for the key agreement of the round's peers.
    """
    masking = PairwiseMasking(msg.peers, seed=hash_seed(ctx.seed, _MASK_KEY, msg.round)) if msg.peers else None
    module = ctx.module
    module.load_state_dict(msg.state)
    cctx = client_context(ctx, client, msg, source, engine.cfg.epochs)
    # The global RNG (dropout masks) is forked and seeded per (run seed, round, client): a client's draws do not
    # depend on which clients ran before it, nor on whether an earlier one forwarded a task-end report.
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cctx.seed)
        return _client_reply(client, msg, cctx, engine, strategy, masking)


def _client_reply(client: int, msg: ToClient, cctx: Context, engine: Engine, strategy: FedAvg,
                  masking: PairwiseMasking | None) -> FromClient:
    module = cctx.module
    state, loss = None, None
    if msg.train:
        cctx.optimizer = engine.optimizer(strategy.parameters_to_train(cctx), msg.task)
        cctx.schedule = engine.schedule(cctx.optimizer, module)
        losses: list[float] = []
        strategy.attach(cctx)
        try:
            engine.fit(cctx, strategy, 0, lambda epoch, epoch_loss, extra=None: losses.append(epoch_loss))
        finally:
            strategy.detach(cctx)
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        loss = losses[-1]
    report = None
    if msg.request is not None:
        with torch.no_grad():
            report = strategy.client_report(cctx, msg.request)
        if masking is not None:
            report = masking.mask(client, report)
    return FromClient(client, state, report, loss)
