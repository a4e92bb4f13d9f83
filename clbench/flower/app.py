"""The Flower engine (``federated.engine=flower``; fot.md §9): clbench's server and clients as a Flower app.

Flower's Message API (flwr ≥ 1.21) carries the messages of :mod:`clbench.federated.messages` unchanged; what
runs at each end is clbench's own code, so the Flower engine and the in-process one give the same accuracy
matrix (tests/test_flower.py):

* **ServerApp** (:data:`server_app`): rebuilds the run's config from the app's run config, then runs
  :func:`clbench.experiment.run` — the explicit task × round loop of :class:`clbench.federated.loop.
  FederatedLoop`, evaluation and MLflow logging — with :class:`FlowerClients` as its transport. Sampling,
  the uniform mean and the strategy's server step (FOT: FedProject, then GPSE at each task end) are the loop's
  and the strategy's, not a Flower ``Strategy``'s: Flower's strategies run a fixed number of rounds with one
  train config, have no task end, and weigh the mean by ``num-examples`` in their own summation order.
* **ClientApp** (:data:`client_app`): a SuperNode started with ``--node-config "partition-id=k
  num-partitions=K"`` is client k. For each message it builds the run's stream, model and strategy
  (:func:`clbench.experiment.setup`), takes its part k of the task (:func:`clbench.federated.loop.split_task`,
  the server's split) and answers with :func:`clbench.federated.client.run_client`. ``train`` messages run the
  local epochs (and carry the task-end request when the sketches ride on the last upload); ``query.report``
  answers a task-end request from the global model (FOT's ``activations_from=global``); ``query.hello`` tells
  the server which k a node is.

A message's content: ``state`` (θ or θ_k, an ArrayRecord), ``request`` / ``report`` (ArrayRecords, present when
sent) and ``meta`` (a ConfigRecord: task, round, train, peers; client, loss). Arrays keep their dtypes and
bits; Flower hands them over on the CPU, and each end moves them to its device.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from clbench.federated.messages import FromClient, ToClient

if TYPE_CHECKING:
    from clbench.config import FederatedConfig, RunConfig

CONFIG_KEY = "clbench-config"
"""The app's run-config entry holding the run's config (YAML of :class:`clbench.config.RunConfig`)."""
RESULT_MARKER = "CLBENCH-RESULT "
"""Prefix of the ServerApp's last log line: the run's R, initial accuracies, scores and MLflow run id as JSON."""
_TRAIN, _REPORT, _HELLO = "train", "query.report", "query.hello"


def encode_to_client(msg: ToClient) -> RecordDict:
    """Server → client message as Flower records."""
    content = RecordDict({"state": ArrayRecord(torch_state_dict=msg.state),
                          "meta": ConfigRecord({"task": msg.task, "round": msg.round, "train": msg.train,
                                                "peers": list(msg.peers)})})
    if msg.request is not None:
        content["request"] = ArrayRecord(torch_state_dict=msg.request)
    return content


def _tensors(record: ArrayRecord, device: torch.device) -> dict[str, Tensor]:
    """An ArrayRecord's arrays as tensors on ``device`` (Flower hands them over on the CPU)."""
    return {k: v.to(device) for k, v in record.to_torch_state_dict().items()}


def decode_to_client(content: RecordDict, device: torch.device) -> ToClient:
    """:func:`encode_to_client`'s message, its arrays on ``device`` (the client's)."""
    meta = content.config_records["meta"]
    request = _tensors(content.array_records["request"], device) if "request" in content else None
    return ToClient(task=int(meta["task"]), round=int(meta["round"]),
                    state=_tensors(content.array_records["state"], device), request=request,
                    train=bool(meta["train"]), peers=tuple(int(p) for p in meta["peers"]))


def encode_from_client(reply: FromClient) -> RecordDict:
    """Client → server reply as Flower records."""
    meta: dict[str, int | float] = {"client": reply.client}
    if reply.loss is not None:
        meta["loss"] = reply.loss
    content = RecordDict({"meta": ConfigRecord(meta)})
    if reply.state is not None:
        content["state"] = ArrayRecord(torch_state_dict=reply.state)
    if reply.report is not None:
        content["report"] = ArrayRecord(torch_state_dict=reply.report)
    return content


def decode_from_client(content: RecordDict, device: torch.device) -> FromClient:
    """:func:`encode_from_client`'s reply, its arrays on ``device`` (the server's)."""
    meta = content.config_records["meta"]
    arrays = content.array_records
    return FromClient(client=int(meta["client"]),
                      state=_tensors(arrays["state"], device) if "state" in arrays else None,
                      report=_tensors(arrays["report"], device) if "report" in arrays else None,
                      loss=float(meta["loss"]) if "loss" in meta else None)


def config_text(cfg: RunConfig) -> str:
    """The run's config as the YAML the app carries (:data:`CONFIG_KEY`)."""
    from dataclasses import asdict

    return yaml.safe_dump(asdict(cfg), sort_keys=False)


@functools.cache
def load_config(text: str) -> RunConfig:
    """The :class:`clbench.config.RunConfig` of :func:`config_text`'s YAML, validated again."""
    from clbench.compose import load

    return load(yaml.safe_load(text))


class FlowerClients:
    """The server's transport to Flower SuperNodes (:class:`clbench.federated.loop.Clients`).

    On construction it waits until K = ``federated.clients`` nodes are connected and asks each its partition id
    (``query.hello``); client k is then the node started with ``partition-id=k``.

    Raises:
        RuntimeError: fewer than K nodes connect within ``federated.flower_timeout`` seconds, the nodes' ids are
            not exactly 0…K−1 once each, or a client fails or does not reply within the timeout.
    """

    def __init__(self, grid: Grid, cfg: FederatedConfig) -> None:
        self.grid, self.timeout, K = grid, cfg.flower_timeout, cfg.clients
        deadline = time.monotonic() + self.timeout
        while len(nodes := sorted(grid.get_node_ids())) < K:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Flower engine: {len(nodes)} SuperNodes connected within federated."
                                   f"flower_timeout = {self.timeout} s; the run needs federated.clients = {K}")
            time.sleep(0.5)
        hello = [Message(RecordDict(), dst_node_id=n, message_type=_HELLO) for n in nodes]
        metas = {n: r.content.config_records["meta"] for n, r in self._replies(hello, "query.hello").items()}
        ids = {n: int(meta["partition-id"]) for n, meta in metas.items()}
        counts = {int(meta["num-partitions"]) for meta in metas.values() if "num-partitions" in meta}
        if sorted(ids.values()) != list(range(K)) or counts - {K}:
            raise RuntimeError(f"Flower engine: the SuperNodes' partition ids are {sorted(ids.values())} (of "
                               f"num-partitions {sorted(counts)}); the run needs each of 0…{K - 1} once "
                               f"(--node-config \"partition-id=k num-partitions={K}\")")
        self.node = {k: n for n, k in ids.items()}

    def _replies(self, messages: list[Message], what: str) -> dict[int, Message]:
        """Send ``messages`` and return the replies by sending node, raising on an error reply (a ClientApp's,
        or the SuperLink's for a node it lost) or a missing one."""
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"Flower engine: {what} failed, error reply from node "
                                   f"{reply.metadata.src_node_id}: {reply.error.reason}")
        by_node = {r.metadata.src_node_id: r for r in replies}
        missing = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in by_node]
        if missing:
            raise RuntimeError(f"Flower engine: nodes {missing} did not answer {what} within "
                               f"federated.flower_timeout = {self.timeout} s")
        return by_node

    def exchange(self, msg: ToClient, clients: Sequence[int]) -> list[FromClient]:
        content = encode_to_client(msg)
        kind = _TRAIN if msg.train else _REPORT
        replies = self._replies([Message(content, dst_node_id=self.node[k], message_type=kind) for k in clients],
                                f"{kind} (task {msg.task}, round {msg.round})")
        device = next(iter(msg.state.values())).device if msg.state else torch.device("cpu")  # the server's θ
        return [decode_from_client(replies[self.node[k]].content, device) for k in clients]


server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    from clbench.experiment import run

    cfg = load_config(str(context.run_config[CONFIG_KEY]))
    result = run(cfg, clients=FlowerClients(grid, cfg.federated))
    line = RESULT_MARKER + json.dumps({"R": result.R.tolist(), "initial": result.initial.tolist(),
                                       "scores": result.scores, "run_id": result.run_id})
    sys.stdout.write(line + "\n")  # one write: the streamed log cannot interleave another thread's output
    sys.stdout.flush()


class _Client:
    """What a ClientApp builds for the run (once per process): context, strategy and engine of the config."""

    def __init__(self, text: str) -> None:
        from clbench.engine import Engine
        from clbench.experiment import setup
        from clbench.federated.loop import client_engine_config

        self.cfg = load_config(text)
        self.ctx, self.strategy = setup(self.cfg)
        self.engine = Engine(client_engine_config(self.cfg.engine, self.cfg.federated), self.ctx.fabric)

    def reply(self, client: int, msg: ToClient) -> FromClient:
        from clbench.federated.client import run_client
        from clbench.federated.loop import client_source, split_task

        source = client_source(self.ctx, msg.task, split_task(self.ctx, self.cfg.federated, msg.task)[client])
        return run_client(client, msg, source, self.ctx, self.engine, self.strategy)  # type: ignore[arg-type]

    def decode(self, content: RecordDict) -> ToClient:
        return decode_to_client(content, self.ctx.device)


@functools.cache
def client_for(text: str) -> _Client:
    """The ClientApp's build of the run whose config is ``text`` (once per process: Flower's simulation runtime
    reuses its processes; a SuperNode starts one per message)."""
    return _Client(text)


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise RuntimeError("a clbench SuperNode needs --node-config \"partition-id=k num-partitions=K\"")
    return int(context.node_config["partition-id"])


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    client = client_for(str(context.run_config[CONFIG_KEY]))
    reply = client.reply(_partition_id(context), client.decode(msg.content))
    return Message(encode_from_client(reply), reply_to=msg)


@client_app.query("report")
def _report(msg: Message, context: Context) -> Message:
    return _train(msg, context)


@client_app.query("hello")
def _hello(msg: Message, context: Context) -> Message:
    meta = {"partition-id": _partition_id(context)}
    if "num-partitions" in context.node_config:
        meta["num-partitions"] = int(context.node_config["num-partitions"])
    return Message(RecordDict({"meta": ConfigRecord(meta)}), reply_to=msg)
