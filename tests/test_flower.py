"""The Flower engine (``federated.engine=flower``; fot.md §9; issue 6 "Tests").

Fast tests drive clbench's ServerApp transport (:class:`FlowerClients`) against a grid that calls the real
ClientApp in this process, so the whole Flower message path — records, message types, partition ids, the
ClientApp's own build of the run — is exercised without processes. The slow test starts a real SuperLink and
SuperNodes on loopback. Both check that Flower and the in-process engine give the same accuracy matrix.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import run_config

from clbench.experiment import run
from clbench.federated.messages import FromClient, ToClient
from clbench.flower import app as flower_app
from clbench.flower.app import (
    CONFIG_KEY,
    FlowerClients,
    config_text,
    decode_from_client,
    decode_to_client,
    encode_from_client,
    encode_to_client,
    load_config,
)
from clbench.flower.launch import absolute_paths, write_app
from clbench.runner import execute

TINY = ("benchmark=permuted_digits", "benchmark.n_tasks=2", "engine.lr=0.1", "engine.batch_size=16",
        "federated.clients=3", "federated.per_round=2", "federated.rounds_per_task=2")
FOT_ALL_PATHS = ("strategy=fot", "federated.secure_sum=true", "strategy.activations_from=global")


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "steps": torch.tensor(7), "u": torch.randn(5, 2, dtype=torch.float64,
                                                                                         generator=g)}


def _same(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> bool:
    if a is None or b is None:
        return a is b
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("request_arrays", [None, {}, {"fc.0": torch.eye(4, 2, dtype=torch.float64)}])
def test_messages_cross_flower_records_bit_for_bit(request_arrays: dict[str, torch.Tensor] | None) -> None:
    msg = ToClient(task=2, round=17, state=_state(), request=request_arrays, train=False, peers=(0, 3, 4))
    back = decode_to_client(encode_to_client(msg), torch.device("cpu"))
    assert (back.task, back.round, back.train, back.peers) == (2, 17, False, (0, 3, 4))
    assert _same(back.state, msg.state) and _same(back.request, msg.request)
    for reply in (FromClient(4, _state(), {"y": torch.ones(2, 2, dtype=torch.float64)}, 0.25),
                  FromClient(1, None, {"y": torch.zeros(1, dtype=torch.float64)}, None),
                  FromClient(0, _state(), None, 1.5)):
        got = decode_from_client(encode_from_client(reply), torch.device("cpu"))
        assert got.client == reply.client and got.loss == reply.loss
        assert _same(got.state, reply.state) and _same(got.report, reply.report)


def test_run_config_crosses_the_app_unchanged(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, *TINY, *FOT_ALL_PATHS, "federated.engine=flower")
    assert load_config(config_text(cfg)) == cfg


def test_written_app_is_a_valid_flower_app(tmp_path: Path) -> None:
    """The app clbench submits passes Flower's own checks (components importable) and builds into a FAB."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import validate_config

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
        import tomli as tomllib
    app = write_app(tmp_path / "app", run_config(tmp_path, *TINY, "strategy=fedavg"))
    config = tomllib.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=app)
    assert ok, errors
    assert len(build_fab_from_disk(app)) > 0
    assert load_config(config["tool"]["flwr"]["app"]["config"][CONFIG_KEY]).strategy.name == "fedavg"


def test_paths_are_made_absolute_for_flowers_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's ServerApp and ClientApps do not run in the submitting directory: relative paths become absolute,
    a tracking server's URI stays as it is."""
    monkeypatch.chdir(tmp_path)
    cfg = run_config(tmp_path, *TINY, "strategy=fedavg")
    rel = dataclasses.replace(cfg, checkpoint_dir="ckpt",
                              tracking=dataclasses.replace(cfg.tracking, uri="sqlite:///mlflow.db",
                                                           artifact_root="art"),
                              benchmark=dataclasses.replace(cfg.benchmark, data_root="data"))
    out = absolute_paths(rel)
    assert out.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db" and out.tracking.artifact_root == f"{tmp_path}/art"
    assert (out.benchmark.data_root, out.checkpoint_dir) == (f"{tmp_path}/data", f"{tmp_path}/ckpt")
    server = dataclasses.replace(rel, tracking=dataclasses.replace(rel.tracking, uri="http://mlflow:5000",
                                                                   artifact_root="s3://bucket/art"))
    assert absolute_paths(server).tracking == server.tracking


class LocalGrid:
    """A Flower grid whose SuperNodes are clbench ClientApp calls in this process.

    Args:
        partition_ids: each node's ``partition-id`` (node ids are 100, 101, …).
        run_config: the app's run config.
        fail: a node id that answers every message but ``query.hello`` with an error.
    """

    def __init__(self, partition_ids: list[int], run_config: dict[str, str], fail: int | None = None) -> None:
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": k,
                                                                                  "num-partitions": len(partition_ids)},
                                          state=RecordDict(), run_config=run_config)
                         for i, k in enumerate(partition_ids)}
        self.fail, self.types = fail, []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for m in messages:
            self.types.append(m.metadata.message_type)
            node = m.metadata.dst_node_id
            if node == self.fail and m.metadata.message_type != "query.hello":
                replies.append(Message(Error(code=0, reason="boom"), reply_to=m))
            else:
                replies.append(flower_app.client_app(message=m, context=self.contexts[node]))
        return replies[::-1]  # Flower returns replies in arrival order, not in the order sent


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's runtime sets in a ServerApp process before any message is created."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.mark.usefixtures("task_identity")
def test_flower_transport_gives_the_in_process_accuracy_matrix(tmp_path: Path) -> None:
    """FOT with a secure sum and the task-end query of the global model: every Flower message type, the
    ClientApp's own build of the run, nodes registered out of partition order — and R equal to the in-process
    engine's bit for bit."""
    cfg = run_config(tmp_path, *TINY, *FOT_ALL_PATHS)
    grid = LocalGrid([2, 0, 1], {CONFIG_KEY: config_text(cfg)})
    flower = run(cfg, clients=FlowerClients(grid, cfg.federated))  # type: ignore[arg-type]
    inprocess = run(cfg)
    np.testing.assert_array_equal(flower.R, inprocess.R)
    assert flower.R[-1].mean() > 30  # trained: chance is 10 %
    assert set(grid.types) == {"query.hello", "train", "query.report"}
    assert grid.types.count("query.report") == 2 * 2  # per task, the last round's 2 clients


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("ids", "fail", "pattern"), [
    ([0, 0, 2], None, r"partition ids are \[0, 0, 2\] \(of num-partitions \[3\]\).*each of 0…2 once"),
    ([0, 1], None, r"2 SuperNodes connected.*federated.clients = 3"),
    ([0, 1, 2], 101, r"train \(task 0, round 0\) failed, error reply from node 101: boom"),
])
def test_flower_transport_failures_name_the_cause(tmp_path: Path, ids: list[int], fail: int | None,
                                                  pattern: str) -> None:
    cfg = run_config(tmp_path, *TINY, "strategy=fedavg", "federated.per_round=3", "federated.flower_timeout=1")
    grid = LocalGrid(ids, {CONFIG_KEY: config_text(cfg)}, fail=fail)
    with pytest.raises(RuntimeError, match=pattern):
        clients = FlowerClients(grid, cfg.federated)  # type: ignore[arg-type]
        clients.exchange(ToClient(0, 0, {}), [1])


def test_client_app_needs_a_partition_id(tmp_path: Path, task_identity: None) -> None:
    cfg = run_config(tmp_path, *TINY, "strategy=fedavg")
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(),
                      run_config={CONFIG_KEY: config_text(cfg)})
    msg = Message(RecordDict({"meta": ConfigRecord({})}), dst_node_id=5, message_type="query.hello")
    with pytest.raises(Exception, match="partition-id=k num-partitions=K"):
        flower_app.client_app(message=msg, context=context)


def _flower_processes() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "flower-super|flwr-clientapp|flwr-serverapp"], capture_output=True,
                         text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_superlink_and_supernodes_give_the_in_process_accuracy_matrix(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``federated.engine=flower`` end to end: a SuperLink and 3 SuperNodes as processes on 127.0.0.1, the
    ServerApp and ClientApps in processes of their own (about 2 minutes on 2 cores), then all of them stopped."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    before = _flower_processes()
    cfg = run_config(tmp_path, *TINY, "strategy=fot", "federated.secure_sum=true", "federated.flower_timeout=300")
    flower = execute(dataclasses.replace(cfg, federated=dataclasses.replace(cfg.federated, engine="flower")))
    inprocess = run(cfg)
    np.testing.assert_array_equal(flower.R, inprocess.R)
    np.testing.assert_array_equal(flower.initial, inprocess.initial)
    assert _flower_processes() <= before  # the local federation is gone
