"""Cluster jobs: a run stopped by a scheduler's signal continues where it stopped, in the same MLflow run, with the
R of an uninterrupted run; sweeps on launchers that run jobs in other processes (joblib, submitit) lose nothing."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import clbench_process, interrupt_in_task, run_config, wait_for_checkpoint
from omegaconf import OmegaConf

from clbench import cli, preemption

SMALL = ("strategy=gpm", "benchmark=permuted_digits", "benchmark.n_tasks=3", "engine.epochs=2")


def _client(tmp: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp}/mlflow.db")


def _runs(tmp: Path, experiment: str = "clbench") -> list:
    client = _client(tmp)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def _history(tmp: Path, run_id: str, key: str) -> dict[int, float]:
    """The metric's value at each step (a step logged twice, before and after a stop, holds the same value)."""
    return {m.step: m.value for m in _client(tmp).get_metric_history(run_id, key)}


# ------------------------------------------------------------------------------------------ signal handling


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_stops_the_run_and_the_next_start_continues_it_in_the_same_run(tmp_path, monkeypatch, signum):
    import clbench.engine
    from clbench.experiment import run

    cfg = run_config(tmp_path, *SMALL)
    whole = run(dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, experiment="whole")))
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    monkeypatch.setattr(clbench.engine.Engine, "fit", interrupt_in_task(1, 0, lambda: signal.raise_signal(signum)))
    with pytest.raises(preemption.Stopped, match=signal.Signals(signum).name):
        run(cfg)
    monkeypatch.undo()
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before  # the run's handlers are gone
    (stopped,) = _runs(tmp_path)
    assert stopped.info.status == "KILLED" and "next start" in stopped.data.tags["clbench.stopped"]
    folder = next((tmp_path / "checkpoints").iterdir())
    assert (folder / preemption.MARKER).read_text() == f"{signal.Signals(signum).name}\n"

    resumed = run(cfg)  # resume=false: the marker implies it
    assert resumed.run_id == stopped.info.run_id and not (folder / preemption.MARKER).exists()
    np.testing.assert_array_equal(resumed.R, whole.R)
    (done,) = _runs(tmp_path)
    assert done.info.status == "FINISHED"
    (reference,) = _runs(tmp_path, "whole")
    assert _history(tmp_path, done.info.run_id, "loss") == _history(tmp_path, reference.info.run_id, "loss")


def test_the_handler_found_before_the_run_is_called_after_the_marker_is_written(tmp_path):
    """submitit's handler (requeue, then exit) runs once the marker says how the next start must begin."""
    seen = []

    def requeue(signum, frame):
        seen.append((signum, (tmp_path / preemption.MARKER).exists()))
        raise SystemExit(144)  # what submitit's local executor exits with to be requeued

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(SystemExit) as exit_, preemption.stoppable(tmp_path):
            signal.raise_signal(signal.SIGUSR2)
        assert exit_.value.code == 144 and seen == [(signal.SIGUSR2, True)]
        assert signal.getsignal(signal.SIGUSR2) is requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_run_outside_the_main_thread_keeps_the_signals_as_they_are(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        with preemption.stoppable(tmp_path):
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [before]


@pytest.mark.parametrize(("count", "expected"), [(None, False), ("0", False), ("2", True), ("x", False)])
def test_a_requeued_slurm_job_continues_its_run(tmp_path, monkeypatch, count, expected):
    if count is None:
        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    else:
        monkeypatch.setenv("SLURM_RESTART_COUNT", count)
    assert preemption.continues(tmp_path) is expected


def test_sweep_failures_are_read_from_the_jobs_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_failed", [])
    for job, code in ((3, 1), (0, 3)):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / cli.EXIT_FILE).write_text(f"{code}\n")
        time.sleep(0.01)
    cli.SweepFailures().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert cli._failed == [1, 3]  # in the order they failed


# ------------------------------------------------------------------------------------- launchers (slow)


def _clbench(tmp: Path, *args: str) -> subprocess.Popen:
    return clbench_process(tmp, *args, "engine.progress=none", "threads=1")


def _finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    out = proc.communicate(timeout=timeout)[0]
    return proc.returncode, out


def _complete(tmp: Path, runs: list, n_tasks: int, epochs: int) -> None:
    """Every run FINISHED with every epoch's loss, every experience's scores and the summary."""
    for r in runs:
        assert r.info.status == "FINISHED", r.info
        assert sorted(_history(tmp, r.info.run_id, "loss")) == list(range(n_tasks * epochs))
        assert sorted(_history(tmp, r.info.run_id, "acc_exp")) == list(range(n_tasks))
        assert {"acc", "bwt", "fwt", "forgetting"} <= set(r.data.metrics)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_parallel_sweep_of_8_into_the_default_sqlite_store_loses_nothing(tmp_path, launcher):
    extra = ("hydra.launcher.n_jobs=8",) if launcher == "joblib" else ()
    code, out = _finish(_clbench(tmp_path, "-m", *SMALL, "seed=0,1,2,3,4,5,6,7", f"hydra/launcher={launcher}", *extra))
    assert code == 0, out
    runs = _runs(tmp_path)
    assert sorted(int(r.data.params["seed"]) for r in runs) == list(range(8))
    _complete(tmp_path, runs, 3, 2)


@pytest.mark.slow
def test_a_failed_job_of_a_joblib_sweep_sets_the_exit_code(tmp_path):
    code, out = _finish(_clbench(tmp_path, "-m", *SMALL, "benchmark.n_tasks=2", "engine.epochs=1",
                                 "engine.lr=1e6,0.05", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"))
    assert code == 1 and "1 run(s) of the sweep failed" in out, out


def _stop_when_checkpointed(tmp: Path, pattern: str, signum: int) -> None:
    """Send ``signum`` to the process whose command line matches ``pattern`` once the run has trained one
    experience (its checkpoint's ``experience`` is 1)."""
    wait_for_checkpoint(tmp, lambda state: state["experience"] >= 1)
    pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    os.kill(int(pids[0]), signum)


@pytest.mark.slow
def test_a_submitit_job_signalled_mid_run_requeues_and_resumes_into_the_same_run(tmp_path):
    """submitit's local executor stands in for SLURM: its preemption signal (USR2) stops the run, submitit
    requeues the job, and the requeued job continues the MLflow run to the R of an uninterrupted run."""
    args = (*SMALL, "benchmark.n_tasks=4", "engine.epochs=4")
    whole = tmp_path / "whole"
    whole.mkdir()
    code, out = _finish(_clbench(whole, *args))
    assert code == 0, out
    job = tmp_path / "job"
    job.mkdir()
    proc = _clbench(job, "-m", *args, "hydra/launcher=submitit_local")
    _stop_when_checkpointed(job, f"submitit.core._submit {job}", signal.SIGUSR2)
    code, out = _finish(proc)
    assert code == 0, out
    log = "".join(p.read_text() for p in job.glob("multirun/*/*/.submitit/*/*_log.out"))
    assert "Requeued job" in log and "continuing it (resume=true implied)" in log, log
    (run,) = _runs(job)
    (reference,) = _runs(whole)
    _complete(job, [run], 4, 4)
    for j in range(4):
        assert _history(job, run.info.run_id, f"acc_task/{j}") == _history(whole, reference.info.run_id,
                                                                             f"acc_task/{j}")
    assert _history(job, run.info.run_id, "loss") == _history(whole, reference.info.run_id, "loss")


@pytest.mark.slow
def test_a_plain_run_stopped_by_sigterm_exits_4_and_the_same_command_finishes_it(tmp_path):
    args = (*SMALL, "benchmark.n_tasks=4", "engine.epochs=4")
    proc = _clbench(tmp_path, *args)
    _stop_when_checkpointed(tmp_path, f"clbench.cli {' '.join(args)}", signal.SIGTERM)
    code, out = _finish(proc)
    lines = [ln for ln in out.splitlines() if ln.startswith("clbench: ")]
    assert code == cli.EXIT_STOPPED and lines and "stopped by SIGTERM" in lines[0], out
    code, out = _finish(_clbench(tmp_path, *args))
    assert code == 0 and "continuing it" in out, out
    (run,) = _runs(tmp_path)
    _complete(tmp_path, [run], 4, 4)


def test_the_slurm_launcher_asks_for_the_signal_the_devices_and_the_array_limit(tmp_path):
    """``hydra/launcher=slurm`` with stand-ins for ``sbatch`` and ``srun``: the batch script submitit writes asks
    for the preemption warning, one task and one GPU per device, and the sweep as a throttled array."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/sbatch.sh\necho "Submitted batch job 4242"\n')
    (bin_ / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "clbench.cli", "-m", "hydra/launcher=slurm", "engine.devices=2",
                             "hydra.launcher.partition=gpu", "hydra.launcher.array_parallelism=3", "seed=0,1,2,3"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # submitit then waits for the job through sacct, which is not here
        deadline = time.monotonic() + 120
        while not (tmp_path / "sbatch.sh").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    lines = set((tmp_path / "sbatch.sh").read_text().splitlines())
    assert {"#SBATCH --signal=USR2@120", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
            "#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --time=240",
            "#SBATCH --job-name=clbench"} <= lines, lines
