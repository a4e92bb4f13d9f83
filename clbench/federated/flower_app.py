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
bits.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

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


def decode_to_client(content: RecordDict) -> ToClient:
    meta = content.config_records["meta"]
    request = content.array_records["request"].to_torch_state_dict() if "request" in content else None
    return ToClient(task=int(meta["task"]), round=int(meta["round"]),
                    state=content.array_records["state"].to_torch_state_dict(), request=request,
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


def decode_from_client(content: RecordDict) -> FromClient:
    meta = content.config_records["meta"]
    arrays = content.array_records
    return FromClient(client=int(meta["client"]),
                      state=arrays["state"].to_torch_state_dict() if "state" in arrays else None,
                      report=arrays["report"].to_torch_state_dict() if "report" in arrays else None,
                      loss=float(meta["loss"]) if "loss" in meta else None)


def config_text(cfg: RunConfig) -> str:
    """The run's config as the YAML the app carries (:data:`CONFIG_KEY`)."""
    from dataclasses import asdict

    return yaml.safe_dump(asdict(cfg), sort_keys=False)


@functools.cache
def load_config(text: str) -> RunConfig:
    """The :class:`clbench.config.RunConfig` of :func:`config_text`'s YAML, validated again."""
    from clbench.config import load

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
        ids = {n: int(r.content.config_records["meta"]["partition-id"])
               for n, r in self._replies(hello, "query.hello").items()}
        if sorted(ids.values()) != list(range(K)):
            raise RuntimeError(f"Flower engine: the SuperNodes' partition ids are {sorted(ids.values())}; the run "
                               f"needs each of 0…{K - 1} once (--node-config \"partition-id=k num-partitions={K}\")")
        self.node = {k: n for n, k in ids.items()}

    def _replies(self, messages: list[Message], what: str) -> dict[int, Message]:
        """Send ``messages`` and return the replies by sending node, raising on a failure or a missing one."""
        replies = {r.metadata.src_node_id: r for r in self.grid.send_and_receive(messages, timeout=self.timeout)}
        missing = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in replies]
        if missing:
            raise RuntimeError(f"Flower engine: nodes {missing} did not answer {what} within "
                               f"federated.flower_timeout = {self.timeout} s")
        for node, reply in replies.items():
            if reply.has_error():
                raise RuntimeError(f"Flower engine: node {node} failed on {what}: {reply.error.reason}")
        return replies

    def exchange(self, msg: ToClient, clients: Sequence[int]) -> list[FromClient]:
        content = encode_to_client(msg)
        kind = _TRAIN if msg.train else _REPORT
        replies = self._replies([Message(content, dst_node_id=self.node[k], message_type=kind) for k in clients],
                                f"{kind} (task {msg.task}, round {msg.round})")
        return [decode_from_client(replies[self.node[k]].content) for k in clients]


server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    from clbench.experiment import run

    cfg = load_config(str(context.run_config[CONFIG_KEY]))
    result = run(cfg, clients=FlowerClients(grid, cfg.federated))
    print(RESULT_MARKER + json.dumps({"R": result.R.tolist(), "initial": result.initial.tolist(),
                                      "scores": result.scores, "run_id": result.run_id}), flush=True)


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


@functools.cache
def _client(text: str) -> _Client:
    return _Client(text)


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise RuntimeError("a clbench SuperNode needs --node-config \"partition-id=k num-partitions=K\"")
    return int(context.node_config["partition-id"])


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    reply = _client(str(context.run_config[CONFIG_KEY])).reply(_partition_id(context), decode_to_client(msg.content))
    return Message(encode_from_client(reply), reply_to=msg)


@client_app.query("report")
def _report(msg: Message, context: Context) -> Message:
    return _train(msg, context)


@client_app.query("hello")
def _hello(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"meta": ConfigRecord({"partition-id": _partition_id(context)})}), reply_to=msg)
