"""Federated runs resume after a kill like every other run (issue 14): the in-process loop is checkpointed at every
round end and every task end, and ``resume=true`` continues the same MLflow run with the uninterrupted run's
accuracy matrix and every metric at the same step.

Small runs on permuted digits: 2 tasks of 3 rounds, 2 of 3 clients per round. The uninterrupted runs are made once
per module; each test kills a run with a KeyboardInterrupt right after one of its checkpoints (a ``kill -9`` there
leaves the same file: checkpoints are written atomically) and resumes it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import clbench_process, run_config, wait_for_checkpoint
from mlflow.tracking import MlflowClient

from clbench import checkpoint
from clbench.config import RunConfig
from clbench.experiment import RunResult, run
from clbench.federated.loop import FederatedLoop

ROUNDS = 3
TINY = ("benchmark=permuted_digits", "benchmark.n_tasks=2", "engine.lr=0.1", "engine.batch_size=10",
        "federated.clients=3", "federated.per_round=2", f"federated.rounds_per_task={ROUNDS}")


def config(tmp: Path, strategy: str, *more: str) -> RunConfig:
    return run_config(tmp, f"strategy={strategy}", *TINY, *more)


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[RunResult, Path]]:
    """The uninterrupted runs of FedAvg and FOT: result and tracking folder."""
    out = {}
    for strategy in ("fedavg", "fot"):
        tmp = tmp_path_factory.mktemp(f"whole-{strategy}")
        out[strategy] = run(config(tmp, strategy)), tmp
    return out


def _interrupt() -> None:
    raise KeyboardInterrupt


def interrupt_after_round(task: int, rnd: int) -> Callable:
    """A ``FederatedLoop.train_task`` that raises KeyboardInterrupt (a kill) right after the checkpoint of round
    ``rnd`` of ``task``, or, with ``rnd`` = -1, when ``task`` starts (right after the previous task's checkpoint)."""
    original = FederatedLoop.train_task

    def train_task(self, ctx, on_round, start_round=0, on_round_end=None):
        if ctx.experience == task and rnd < 0:
            _interrupt()

        def cut(next_round: int) -> None:
            on_round_end(next_round)
            if ctx.experience == task and next_round == rnd + 1:
                _interrupt()

        return original(self, ctx, on_round, start_round, cut)

    return train_task


def histories(tmp: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of an MLflow run: name → [(step, value)] in step order."""
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    names = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in names}


def kill_and_resume(tmp: Path, strategy: str, monkeypatch: pytest.MonkeyPatch, task: int, rnd: int,
                    expect: tuple[int, int]) -> tuple[RunResult, str]:
    """Run ``strategy`` killed after round ``rnd`` of ``task`` (see :func:`interrupt_after_round`), check that its
    checkpoint stands at ``expect`` = (experience, next round), resume it: the resumed result and the killed run's
    MLflow id."""
    cfg = config(tmp, strategy)
    monkeypatch.setattr(FederatedLoop, "train_task", interrupt_after_round(task, rnd))
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.undo()
    state = checkpoint.load(checkpoint.checkpoint_path(cfg))
    assert state is not None
    assert (state["experience"], state["federation"]["next_round"]) == expect
    client = MlflowClient(cfg.tracking.uri)
    (killed,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert killed.info.status == "KILLED" and killed.info.run_id == state["run_id"]
    resumed = run(dataclasses.replace(cfg, resume=True))
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    return resumed, killed.info.run_id


@pytest.mark.parametrize(("strategy", "task", "rnd", "expect"), [
    ("fedavg", 1, 0, (1, 1)),  # mid-task: after the first round of task 2
    ("fot", 1, 1, (1, 2)),  # mid-task, with task 1's bases
    ("fot", 0, ROUNDS - 1, (0, ROUNDS)),  # after task 1's last round (its GPSE done), before its evaluation
    ("fot", 1, -1, (1, 0)),  # between tasks: after task 1's end checkpoint
])
def test_a_killed_federated_run_resumes_into_the_same_run_with_the_same_results(
        tmp_path, monkeypatch, whole, strategy, task, rnd, expect):
    full, full_tmp = whole[strategy]
    resumed, killed_id = kill_and_resume(tmp_path, strategy, monkeypatch, task, rnd, expect)
    assert resumed.run_id == killed_id
    np.testing.assert_array_equal(resumed.R, full.R)
    np.testing.assert_array_equal(resumed.initial, full.initial)
    got, want = histories(tmp_path, resumed.run_id), histories(full_tmp, full.run_id)
    assert [s for s, _ in got["round_loss"]] == list(range(2 * ROUNDS))  # every round once, at its step
    assert got == want  # every metric (round losses and bytes, per-task scores, FOT's basis sizes, totals)


def test_fot_bases_survive_the_checkpoint(tmp_path, monkeypatch):
    """The checkpoint after task 1 holds FOT's bases; loaded back they are the same tensors."""
    from strategies.fot import FOT

    cfg = config(tmp_path, "fot")
    monkeypatch.setattr(FederatedLoop, "train_task", interrupt_after_round(1, -1))
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    state = checkpoint.load(checkpoint.checkpoint_path(cfg))
    assert state is not None
    bases = state["strategy"]["bases"]
    assert bases and all(U.ndim == 2 and U.shape[1] >= 1 for U in bases.values())
    fot = FOT(cfg.strategy)
    fot.load_state_dict(state["strategy"])
    assert fot.state_dict()["bases"].keys() == bases.keys()
    assert all(torch.equal(fot.state_dict()["bases"][k], U) for k, U in bases.items())


def test_every_round_is_checkpointed_unless_turned_off(tmp_path, monkeypatch):
    """``engine.checkpoint_every_epoch=false`` keeps only the task-end checkpoints (a kill loses the task)."""
    cfg = config(tmp_path, "fedavg", "engine.checkpoint_every_epoch=false")
    monkeypatch.setattr(FederatedLoop, "train_task", interrupt_after_round(1, 1))
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    state = checkpoint.load(checkpoint.checkpoint_path(cfg))
    assert state is not None and (state["experience"], state["federation"]["next_round"]) == (1, 0)


def test_continuing_at_a_round_the_loop_does_not_stand_at_is_refused(tmp_path):
    from clbench.experiment import setup

    cfg = config(tmp_path, "fedavg")
    ctx, strategy = setup(cfg)
    loop = FederatedLoop(cfg.federated, cfg.engine, ctx, strategy)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stands at task 0, round 0"):
        loop.train_task(ctx, lambda *a: None, start_round=2)


@pytest.mark.slow
def test_a_fot_cli_run_killed_9_mid_task_resumes_with_the_uninterrupted_result(tmp_path):
    """``kill -9`` of the CLI once its checkpoint is past round 1 of task 2; the same command with resume=true
    continues the same MLflow run and prints the uninterrupted run's accuracy matrix and ACC."""
    args = ["strategy=fot", *TINY[:-1], "federated.rounds_per_task=[2,30]", "threads=1", "engine.progress=none"]
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_out = clbench_process(full_dir, *args).communicate(timeout=600)[0]

    cut = clbench_process(cut_dir, *args)
    wait_for_checkpoint(cut_dir, lambda state: state["experience"] == 1 and state["federation"]["next_round"] >= 1,
                        cut)
    os.kill(cut.pid, signal.SIGKILL)
    cut.wait(timeout=60)
    assert cut.returncode == -signal.SIGKILL, "run finished before it could be killed"

    resumed = clbench_process(cut_dir, *args, "resume=true")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "Resuming" in out

    def result(text: str) -> tuple[str, str]:
        """The printed matrix and the ACC line."""
        matrix = text[text.index("after\\on"):]
        return matrix[: matrix.index("ACC")], re.search(r"ACC [-\d.]+", text).group(0)  # type: ignore[union-attr]

    assert result(out) == result(full_out)
    client = MlflowClient(f"sqlite:///{cut_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("clbench").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the killed run, continued
