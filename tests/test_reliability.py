"""Faults a run meets, and what it does with them (README "Reliability"): a diverging loss stops the run (MLflow
FAILED, metrics kept, left out of the report); a corrupt checkpoint, an unusable MLflow store, a tracking server
that does not answer and an unknown config key each give one line naming the file, URI or key and what to do,
with a documented exit code, and leave the store and the checkpoint as they were."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from helpers import gen, run_config
from lightning.fabric import Fabric
from torch import nn

from clbench import checkpoint
from clbench.config import ConfigError, EngineConfig, StrategyConfig, TrackingConfig
from clbench.context import Context
from clbench.engine import Engine
from clbench.experiment import run
from clbench.streams.batches import TensorBatchSource
from strategies.base import Strategy

SMALL = ("strategy=gpm", "benchmark=permuted_digits", "benchmark.n_tasks=3", "engine.epochs=2")
DIVERGES_IN_TASK_2 = (*SMALL, "engine.first_lr=0.05", "engine.lr=1e6")


# ---------------------------------------------------------------------------------------------- divergence


class _Linear(nn.Module):
    """y = w·x, loss = mean (y − target)²: at a huge learning rate its weights blow up within an epoch."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d))

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return ((batch[0] @ self.w - batch[1]) ** 2).mean()


def _engine(**engine: object) -> tuple[Engine, Context, _Linear]:
    cfg = EngineConfig(epochs=3, batch_size=4, **engine)  # type: ignore[arg-type]
    fabric = Fabric(accelerator="cpu", devices=1)
    module = _Linear(5)
    x, y = torch.randn(64, 5, generator=gen(1)), torch.randn(64, generator=gen(2))
    source = TensorBatchSource(x, y, torch.zeros(64, dtype=torch.long))
    ctx = Context(model=module, module=module, fabric=fabric, stream=None, seed=0, batch_size=4,  # type: ignore[arg-type]
                  sources=None, train_source=source)
    ctx.experience = 1
    return Engine(cfg, fabric), ctx, module


@pytest.mark.parametrize("engine", [{}, {"accumulate": 2, "clip_norm": 1e30}], ids=["hot-path", "accumulate"])
def test_nonfinite_epoch_loss_stops_fit_naming_experience_epoch_and_lr(engine):
    """Before the fix the epochs ran on, reporting a NaN loss; now the first non-finite epoch raises, before
    ``on_epoch_end`` logs or checkpoints it."""
    from clbench.engine import DivergenceError

    eng, ctx, module = _engine(lr=1e12, **engine)
    ctx.optimizer = eng.optimizer(module.parameters(), 1)
    ctx.schedule = eng.schedule(ctx.optimizer, module)
    seen: list[float] = []
    with pytest.raises(DivergenceError) as info:
        eng.fit(ctx, Strategy(StrategyConfig()), 0, lambda epoch, loss, extra=None: seen.append(loss))
    message = str(info.value)
    assert "experience 2, epoch 1/3" in message and "1e+12 (engine.lr)" in message and "\n" not in message
    assert seen == []


def test_nonfinite_loss_of_an_extra_stage_names_the_stage():
    from clbench.engine import DivergenceError

    eng, ctx, module = _engine()
    with pytest.raises(DivergenceError, match=r"epoch 1/2 of a strategy's extra stage"):
        eng.stage(ctx, module.loss, module.parameters(), ctx.train_source, epochs=2, lr=1e12)


def _runs(tmp: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("clbench").experiment_id])


@pytest.fixture(scope="module")
def diverged(tmp_path_factory) -> tuple[Path, BaseException | None]:
    """GPM trains task 1 at lr 0.05, then task 2 at lr 1e6: its loss is NaN from the first epoch of task 2."""
    tmp = tmp_path_factory.mktemp("diverged")
    try:
        run(run_config(tmp, *DIVERGES_IN_TASK_2))
    except Exception as e:
        return tmp, e
    return tmp, None


def test_diverged_run_stops_with_one_line_naming_experience_epoch_and_lr(diverged):
    from clbench.engine import DivergenceError

    _, error = diverged
    assert isinstance(error, DivergenceError), error
    assert str(error) == ("training diverged in experience 2/3, epoch 1/2: the epoch's mean loss is nan; likely "
                          "cause: the learning rate 1e+06 (engine.lr) is too high; lower it or set engine.clip_norm")


def test_diverged_run_is_failed_in_mlflow_and_keeps_its_earlier_metrics(diverged):
    from mlflow.tracking import MlflowClient

    tmp, _ = diverged
    [r] = _runs(tmp)
    assert r.info.status == "FAILED"
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    assert len(client.get_metric_history(r.info.run_id, "loss")) == 2  # task 1's two epochs
    assert [m.step for m in client.get_metric_history(r.info.run_id, "acc_exp")] == [0]
    assert "acc" not in r.data.metrics  # no summary of a run that did not finish
    assert r.data.tags["error"].startswith("training diverged in experience 2/3")


def test_report_leaves_a_diverged_run_out(diverged, capsys):
    """Before the fix the diverged run was FINISHED with ACC at chance and averaged in like any other."""
    from clbench.report import collect, main

    tmp, _ = diverged
    uri = f"sqlite:///{tmp}/mlflow.db"
    assert collect(uri, "clbench") == []
    assert main(["--uri", uri]) == 1
    out = capsys.readouterr()
    assert "no finished runs" in out.out
    assert "left out 1 run(s) that did not finish (1 FAILED)" in out.err


def test_a_strategy_that_runs_its_own_loop_stops_on_divergence_too(tmp_path):
    """Avalanche's loop reports its epoch losses through on_epoch_end, which checks them."""
    from clbench.engine import DivergenceError

    with pytest.raises(DivergenceError, match=r"experience 2/3, epoch 1/2: .* \(engine.lr\)"):
        run(run_config(tmp_path, *DIVERGES_IN_TASK_2, "strategy=avalanche_naive"))
    assert [r.info.status for r in _runs(tmp_path)] == ["FAILED"]


def test_a_store_failing_while_the_run_fails_keeps_the_original_error():
    from clbench.experiment import _close_failed

    class Down:
        run_id = "r"

        def set_tags(self, tags: dict[str, str]) -> None:
            raise ConnectionError("server gone")

        def finish(self, status: str) -> None:
            raise ConnectionError("server gone")

    _close_failed(Down(), RuntimeError("the run's own error"))  # type: ignore[arg-type]  # logs, does not raise


def test_a_resumed_run_that_finishes_drops_the_error_tag(tmp_path):
    from clbench.tracking import Tracker

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "art"))
    first = Tracker(cfg, "r")
    first.set_tags({"error": "training diverged"})
    first.finish("FAILED")
    again = Tracker(cfg, "r", run_id=first.run_id)
    again.finish()
    run_ = again.client.get_run(first.run_id)
    assert run_.info.status == "FINISHED" and "error" not in run_.data.tags


# ---------------------------------------------------------------------------------------------- checkpoints


def _state() -> dict[str, object]:
    return {k: None for k in checkpoint.KEYS} | {"experience": 1, "model": {"w": torch.ones(3)}}


def _corrupt(path: Path, how: str) -> None:
    good = path.read_bytes()
    if how == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif how == "random bytes":
        path.write_bytes(torch.randint(0, 256, (5000,), generator=gen(0), dtype=torch.uint8).numpy().tobytes())
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign dict":
        torch.save({"weights": torch.ones(2)}, path)
    elif how == "a list":
        torch.save([1, 2, 3], path)
    elif how == "old format":
        torch.save(torch.load(path, weights_only=False) | {"format": checkpoint.FORMAT_VERSION - 1}, path)
    elif how == "a key missing":
        state = torch.load(path, weights_only=False)
        del state["rng"]
        torch.save(state, path)
    elif how == "a folder":
        path.unlink()
        path.mkdir()


CORRUPTIONS = {"truncated": "is a truncated or damaged torch file", "random bytes": "is not a torch file",
               "empty": "is empty", "foreign dict": "is not a clbench checkpoint (a dict without a 'format' key)",
               "a list": "is not a clbench checkpoint (a list",
               "old format": f"has format {checkpoint.FORMAT_VERSION - 1}, and this clbench reads format "
               f"{checkpoint.FORMAT_VERSION}", "a key missing": "lacks ['rng']", "a folder": "is a folder"}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_one_clear_error_naming_the_file(tmp_path, how):
    """Before the fix: an OSError, UnpicklingError, EOFError, AttributeError or a bare RuntimeError, whose
    traceback did not say what to do (only the format mismatch named the file)."""
    path = tmp_path / "run" / "last.ckpt"
    checkpoint.save(path, _state())
    _corrupt(path, how)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} {CORRUPTIONS[how]}"), message
    assert f"delete it (rm -r {path.parent}) to start this run afresh" in message and "\n" not in message
    assert (path.read_bytes() if path.is_file() else None) == before  # left as it was


def test_resume_from_a_corrupt_checkpoint_leaves_the_mlflow_run_untouched(tmp_path, monkeypatch):
    """A run killed inside task 2, its checkpoint truncated: resuming fails before anything is built or logged."""
    from mlflow.tracking import MlflowClient

    import clbench.engine

    epoch, calls = clbench.engine.Engine._epoch, []

    def cut(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # task 2, epoch 2
            raise KeyboardInterrupt
        return epoch(self, *args, **kwargs)

    monkeypatch.setattr(clbench.engine.Engine, "_epoch", cut)
    with pytest.raises(KeyboardInterrupt):
        run(run_config(tmp_path, *SMALL))
    monkeypatch.undo()
    cfg = run_config(tmp_path, *SMALL, "resume=true")
    path = checkpoint.checkpoint_path(cfg)
    assert torch.load(path, weights_only=False)["next_epoch"] == 1  # killed mid-task
    _corrupt(path, "truncated")
    damaged = path.read_bytes()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [killed] = _runs(tmp_path)
    losses = client.get_metric_history(killed.info.run_id, "loss")
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint {path} is a truncated or damaged torch file"):
        run(cfg)
    [after] = _runs(tmp_path)
    assert after.info.status == "KILLED" and after.info.end_time == killed.info.end_time
    assert after.data.metrics == killed.data.metrics and after.data.tags == killed.data.tags
    assert client.get_metric_history(killed.info.run_id, "loss") == losses
    assert path.read_bytes() == damaged


# ---------------------------------------------------------------------------------------------- tracking store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.timeout(60)
def test_refused_tracking_server_fails_at_once_naming_the_uri(tmp_path):
    """Before the fix MLflow retried for about 4 minutes (the timeout above fails it)."""
    from clbench.tracking import Tracker, TrackingError

    uri = f"http://127.0.0.1:{_free_port()}/"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=rf"tracking server {uri} did not answer \(.*refused"):
        Tracker(TrackingConfig(uri=uri), "r")
    assert time.monotonic() - start < 5


@pytest.mark.timeout(60)
def test_silent_tracking_server_fails_after_tracking_timeout(silent_server):
    from clbench.tracking import Tracker, TrackingError

    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"did not answer \(.*waited up to 1.5 s\).*raise tracking.timeout"):
        Tracker(TrackingConfig(uri=silent_server, timeout=1.5), "r")
    assert 1.4 < time.monotonic() - start < 5


def test_a_server_that_answers_passes_the_check():
    from clbench.tracking import check_store

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_store(f"http://127.0.0.1:{server.server_address[1]}", timeout=5)  # any HTTP answer: reachable
    finally:
        server.shutdown()
        server.server_close()


def _sqlite_cfg(path: Path) -> TrackingConfig:
    return TrackingConfig(uri=f"sqlite:///{path}", artifact_root=str(path.parent / "art"))


def test_corrupt_mlflow_db_is_refused_naming_the_file_and_left_as_it_is(tmp_path):
    """Before the fix: a 77-line sqlalchemy traceback ending "file is not a database"."""
    from clbench.tracking import Tracker, TrackingError

    db = tmp_path / "mlflow.db"
    db.write_bytes(torch.randint(0, 256, (200_000,), generator=gen(0), dtype=torch.uint8).numpy().tobytes())
    before = db.read_bytes()
    with pytest.raises(TrackingError, match=rf"MLflow store {db} is not a usable SQLite database \(file is not a "
                                            r"database\); it was left as it is: move it aside"):
        Tracker(_sqlite_cfg(db), "r")
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_an_sqlite_file_of_another_program_is_not_turned_into_an_mlflow_store(tmp_path):
    """Before the fix MLflow added its tables to it."""
    from clbench.tracking import Tracker, TrackingError

    db = tmp_path / "notes.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE notes (text TEXT)")
    con.close()
    before = db.read_bytes()
    with pytest.raises(TrackingError, match=rf"MLflow store {db} is an SQLite database without MLflow's tables"):
        Tracker(_sqlite_cfg(db), "r")
    assert db.read_bytes() == before


def test_a_truncated_mlflow_db_is_one_error_naming_the_file(tmp_path):
    from clbench.tracking import Tracker, TrackingError

    db = tmp_path / "mlflow.db"
    Tracker(_sqlite_cfg(db), "r").finish()
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])
    before = db.read_bytes()
    with pytest.raises(TrackingError, match=rf"MLflow store {db} (cannot be used|is not a usable SQLite database)"):
        Tracker(_sqlite_cfg(db), "r")
    assert db.read_bytes() == before


def test_report_on_an_unusable_store_is_one_line_and_code_3(tmp_path, capsys):
    from clbench.report import main

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database" * 100)
    assert main(["--uri", f"sqlite:///{db}"]) == 3
    assert main(["--uri", f"http://127.0.0.1:{_free_port()}"]) == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("clbench report: ") for line in err)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("override", "valid"), [("engine.lrr=0.1", "'lr'"), ("tracking.uriz=x", "'uri'"),
                                                 ("benchmark.n_taskz=2", "'n_tasks'"),
                                                 ("strategy.thresold=0.9", "'threshold'"),
                                                 ("model.hiden=[10]", "'hidden'")])
def test_an_unknown_key_without_plus_lists_the_valid_keys_of_its_section(tmp_path, override, valid):
    """Before the fix Hydra refused it without the list, suggesting ``+key=value`` (itself then refused)."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}'; valid keys here: \[.*{valid}"):
        run_config(tmp_path, override)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_tracking_timeout_must_be_positive_and_finite(tmp_path, value):
    with pytest.raises(ConfigError, match=r"bad value for 'tracking.timeout'"):
        run_config(tmp_path, f"tracking.timeout={value}")


# ---------------------------------------------------------------------------------------------- command line


def _cli(tmp: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    base = ("engine.progress=none", "threads=1")
    return subprocess.run([sys.executable, "-m", "clbench.cli", *args, *base], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line(out: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in out.stderr.splitlines() if " INFO " not in ln]  # MLflow's store set-up notes
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    assert lines[0].startswith("clbench: ")
    return lines[0]


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``clbench *args`` in this process (the run's modules are imported already): exit code, stdout, stderr."""
    from hydra.core.global_hydra import GlobalHydra

    from clbench import cli

    here = Path.cwd()  # an absolute store: MLflow caches its stores by URI, and a relative one would be shared
    monkeypatch.setattr(sys, "argv", ["clbench", *args, "engine.progress=none", "threads=1",
                                      f"tracking.uri=sqlite:///{here}/mlflow.db"])
    monkeypatch.setattr(cli, "_failed", [])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        GlobalHydra.instance().clear()
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_diverged_run_exits_1_with_one_line(workdir, monkeypatch, capsys):
    code, _, err = _main(monkeypatch, capsys, *SMALL, "benchmark.n_tasks=2", "engine.epochs=1", "engine.lr=1e6")
    lines = [ln for ln in err.splitlines() if " INFO " not in ln]
    assert code == 1 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("clbench: training diverged in experience 1/2, epoch 1/1")


def test_cli_sweep_goes_on_past_a_diverged_run_and_exits_1(workdir, monkeypatch, capsys):
    code, out, err = _main(monkeypatch, capsys, "-m", *SMALL, "benchmark.n_tasks=2", "engine.epochs=1",
                           "engine.lr=1e6,0.05")
    assert code == 1, err
    assert out.count("accuracy matrix R") == 1
    assert "clbench: training diverged" in err and "clbench: 1 run(s) of the sweep failed" in err
    assert sorted(r.info.status for r in _runs(workdir)) == ["FAILED", "FINISHED"]


@pytest.mark.timeout(120)
def test_cli_unreachable_tracking_server_exits_3_within_seconds(tmp_path):
    start = time.monotonic()
    out = _cli(tmp_path, *SMALL, f"tracking.uri=http://127.0.0.1:{_free_port()}/", timeout=60)
    assert out.returncode == 3 and "did not answer" in _one_line(out)
    assert time.monotonic() - start < 30  # imports included; before the fix: 257 s


def test_cli_corrupt_mlflow_db_exits_3_and_leaves_it(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"\x00garbage" * 25_000)
    out = _cli(tmp_path, *SMALL)
    assert out.returncode == 3 and f"MLflow store {db} is not a usable SQLite database" in _one_line(out)
    assert db.read_bytes() == b"\x00garbage" * 25_000


def test_cli_corrupt_checkpoint_exits_3(tmp_path):
    path = checkpoint.checkpoint_path(run_config(tmp_path, *SMALL, "checkpoint_dir=checkpoints"))  # relative
    (tmp_path / path.parent).mkdir(parents=True)
    (tmp_path / path).write_bytes(b"")
    out = _cli(tmp_path, *SMALL, "resume=true")
    assert out.returncode == 3
    assert _one_line(out) == (f"clbench: checkpoint {path} is empty (0 bytes: a save cut short, or the file was "
                              f"emptied); delete it (rm -r {path.parent}) to start this run afresh, or set "
                              "checkpoint_dir to a folder with an intact one")
    assert not (tmp_path / "mlflow.db").exists()  # nothing logged


def test_cli_unknown_key_exits_2_listing_the_valid_keys(tmp_path):
    out = _cli(tmp_path, *SMALL, "engine.lrr=0.1")
    assert out.returncode == 2
    assert _one_line(out).startswith("clbench: config error: unknown config key 'engine.lrr'; valid keys here: [")


# ---------------------------------------------------------------------------------------------- concurrency

_LOGGER = """
import sys
from clbench.config import TrackingConfig
from clbench.tracking import Tracker
t = Tracker(TrackingConfig(uri=sys.argv[1], artifact_root=sys.argv[2]), "r" + sys.argv[3])
t.log_params({"writer": sys.argv[3]})
for step in range(20):
    t.log_metrics({"x": step, "y": 2 * step}, step=step)
t.finish()
"""


def _writers(tmp: Path, n: int) -> list[subprocess.Popen]:
    """``n`` processes that each open the store ``tmp/mlflow.db`` at once and log a run of 20 steps."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-c", _LOGGER, f"sqlite:///{tmp}/mlflow.db", str(tmp / "art"), str(i)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


@pytest.mark.timeout(240)
def test_writers_started_together_on_a_fresh_store_all_log_everything(tmp_path):
    """Before the fix 7 of 8 such writers died on MLflow's schema creation racing ("duplicate column name",
    ``_alembic_tmp_experiments already exists``); 4 is enough to show it and is fast."""
    procs = _writers(tmp_path, 4)
    errors = [p.communicate(timeout=200)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(errors)
    runs = _runs(tmp_path)
    assert sorted(r.data.params["writer"] for r in runs) == ["0", "1", "2", "3"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for r in runs:
        assert r.info.status == "FINISHED"
        assert [m.value for m in client.get_metric_history(r.info.run_id, "y")] == [2.0 * s for s in range(20)]


def test_a_half_migrated_store_is_named_with_its_repair(tmp_path):
    """A migration that stopped half-way leaves ``_alembic_tmp_*`` tables (what racing runs did before the lock):
    every later run then failed deep inside MLflow. Now it is named, with a repair that works."""
    from clbench.tracking import Tracker, TrackingError, check_store

    db = tmp_path / "mlflow.db"
    Tracker(_sqlite_cfg(db), "r").finish()
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE _alembic_tmp_tags (key TEXT)")
    con.close()
    before = db.read_bytes()
    with pytest.raises(TrackingError) as info:
        check_store(f"sqlite:///{db}", 1)
    message = str(info.value)
    assert f"MLflow store {db} holds a schema migration that stopped half-way (tables _alembic_tmp_tags)" in message
    assert db.read_bytes() == before
    repair = message.split("repair it with ")[1].split(" && ")[0]  # sqlite3 <file> 'DROP TABLE ...;'
    with sqlite3.connect(db) as con:  # the same statement the message gives to the sqlite3 shell
        con.executescript(repair.split("'")[1])
    con.close()
    check_store(f"sqlite:///{db}", 1)
    Tracker(_sqlite_cfg(db), "again").finish()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eight_runs_started_together_in_a_fresh_folder_all_finish(tmp_path):
    """Issue 13's command: 8 ``clbench`` runs at once in a fresh folder (the default SQLite store); before the fix
    most died and the store could be left unusable."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "clbench.cli", *SMALL, f"seed={s}", "engine.progress=none",
                               "threads=1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for s in range(8)]
    errors = [p.communicate(timeout=800)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, "\n".join(errors)
    runs = _runs(tmp_path)
    assert sorted(r.data.tags["seed"] for r in runs) == [str(s) for s in range(8)]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert {"acc", "bwt", "fwt", "forgetting", "acc_task/2", "loss"} <= set(r.data.metrics)


# ---------------------------------------------------------------------------------------------- run lock, orphans

_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


def test_the_same_config_running_in_another_process_is_refused_before_anything_is_logged(tmp_path):
    """Before the fix both processes wrote one checkpoint file (the last writer won) and, resumed, logged the
    same steps twice."""
    from clbench.places import PlaceError

    cfg = run_config(tmp_path, *SMALL, "benchmark.n_tasks=2", "engine.epochs=1")
    folder = checkpoint.checkpoint_path(cfg).parent
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PlaceError, match=rf"another clbench process is running this config now \(it holds "
                                             rf"{folder}\); wait for it to end, or run a copy with another seed "
                                             r"or checkpoint_dir"):
            run(cfg)
        assert not (tmp_path / "mlflow.db").exists()
    finally:
        holder.kill()  # like kill -9: the lock goes with the process
        holder.wait()
    assert run(cfg).R.shape == (2, 2)


def test_a_refused_run_leaves_no_empty_checkpoint_folder(tmp_path):
    cfg = run_config(tmp_path, *SMALL, "strategy.threshold=[0.9, 0.9]")  # the MLP has 3 protected layers
    with pytest.raises(ConfigError):
        run(cfg)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_run_orphaned_before_its_first_checkpoint_is_closed_by_the_next(tmp_path, monkeypatch, capsys):
    """A process killed between MLflow creating its run and the first checkpoint left a run RUNNING for ever;
    the next run of the same config (resumed or not) now closes it as KILLED."""
    import clbench.experiment

    cfg = run_config(tmp_path, *SMALL, "benchmark.n_tasks=2", "engine.epochs=1")

    def killed(*args, **kwargs):  # the state kill -9 leaves: no checkpoint, and no chance to close the run
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save", killed)
        m.setattr(clbench.experiment, "_close_failed", lambda tracker, error: None)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
    (orphan,) = _runs(tmp_path)
    assert orphan.info.status == "RUNNING" and not checkpoint.checkpoint_path(cfg).exists()
    result = run(dataclasses.replace(cfg, resume=True))
    assert f"closed MLflow run {orphan.info.run_id} as KILLED" in capsys.readouterr().out
    status = {r.info.run_id: r.info.status for r in _runs(tmp_path)}
    assert status == {orphan.info.run_id: "KILLED", result.run_id: "FINISHED"}


def test_another_configs_running_run_is_not_closed(tmp_path):
    """Only runs of the same checkpoint folder are orphans: another seed's RUNNING run is left alone."""
    cfg = run_config(tmp_path, *SMALL, "benchmark.n_tasks=2", "engine.epochs=1")
    from clbench.tracking import Tracker

    other = Tracker(cfg.tracking, "other", run_key="0123456789abcdef")
    run(cfg)
    assert {r.info.run_id: r.info.status for r in _runs(tmp_path)}[other.run_id] == "RUNNING"


def test_the_same_configs_running_run_on_another_host_is_not_closed(tmp_path, monkeypatch):
    """Run locks are local: a live run of the same config and checkpoint path on another host sharing the
    server (its own disk) must not be taken for an orphan (it was closed as KILLED while it trained)."""
    import socket

    from clbench.tracking import Tracker, run_key

    cfg = run_config(tmp_path, *SMALL, "benchmark.n_tasks=2", "engine.epochs=1")
    folder = checkpoint.checkpoint_path(cfg).parent
    with monkeypatch.context() as m:
        m.setattr(socket, "gethostname", lambda: "node-a")
        other_key = run_key(folder)
        other = Tracker(cfg.tracking, "on node-a", run_key=other_key)
    assert run_key(folder) != other_key  # this host's key for the same folder
    run(cfg)
    assert {r.info.run_id: r.info.status for r in _runs(tmp_path)}[other.run_id] == "RUNNING"


# ---------------------------------------------------------------------------------------------- places


@pytest.mark.parametrize(("key", "value"), [
    ("checkpoint_dir", "{blocked}/checkpoints"),
    ("tracking.uri", "sqlite:///{blocked}/mlflow.db"),
    ("tracking.artifact_root", "{blocked}/art"),
])
def test_a_place_that_cannot_be_written_is_one_error_naming_it_and_its_key(tmp_path, key, value):
    """A path under a file cannot be created (as under a read-only folder); before the fix: a traceback after
    the run had started (an unwritable SQLite store: MLflow retried for minutes first)."""
    from clbench.places import PlaceError

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    cfg = run_config(tmp_path, *SMALL, f"{key}={value.format(blocked=blocked)}")
    with pytest.raises(PlaceError, match=rf"cannot write to {blocked}/\S+ \(Not a directory\); set {key} to a "
                                         "writable place"):
        run(cfg)
    if (tmp_path / "mlflow.db").exists():  # nothing logged: no experiment (its artifact folder is unwritable)
        from mlflow.tracking import MlflowClient

        assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("clbench") is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through folder permissions")
def test_a_folder_without_write_permission_is_named(tmp_path):
    from clbench.places import PlaceError, check_writable

    tmp_path.joinpath("ro").mkdir(mode=0o555)
    with pytest.raises(PlaceError, match=r"ro \(Permission denied\); set checkpoint_dir"):
        check_writable(tmp_path / "ro", "checkpoint_dir")


def _read_only_mount(folder: Path) -> list[str] | None:
    """The command prefix that runs a command in ``folder`` mounted read-only (a user and mount namespace),
    or None where this machine cannot."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {folder}"],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        return None
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o ro tmpfs {folder} && cd {folder} && exec "$@"', "sh"]


@pytest.mark.timeout(120)
def test_cli_in_a_read_only_folder_exits_3_naming_the_output_folder(tmp_path):
    """Issue 13's read-only working directory: before the fix Hydra's traceback (``Read-only file system:
    'outputs'``) and exit 1."""
    prefix = _read_only_mount(tmp_path)
    if prefix is None:
        pytest.skip("cannot mount a read-only folder here (no unshare, or user namespaces are off)")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([*prefix, sys.executable, "-m", "clbench.cli", *SMALL], env=env, capture_output=True,
                         text=True, timeout=100)
    line = _one_line(out)
    assert out.returncode == 3
    assert line.startswith(f"clbench: cannot write to {tmp_path}/outputs/") and line.endswith(
        "(Read-only file system); set hydra.run.dir to a writable place")


@pytest.mark.slow  # the in-process test of the same place is in the fast suite
def test_cli_unwritable_store_exits_3_naming_tracking_uri(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    out = _cli(tmp_path, *SMALL, f"tracking.uri=sqlite:///{blocked}/mlflow.db")
    assert out.returncode == 3
    assert _one_line(out) == (f"clbench: cannot write to {blocked}/mlflow.db (Not a directory); set tracking.uri to a "
                              "writable place")


@pytest.mark.parametrize("arg", ["seeed=1", "engin.lr=0.1"])
def test_cli_unknown_top_level_key_exits_2_listing_the_valid_keys(monkeypatch, capsys, arg):
    """Before the fix Hydra's multi-line note suggesting ``+seeed=1`` (which clbench then refused), exit 1."""
    from clbench import cli

    monkeypatch.setattr(sys, "argv", ["clbench", "strategy=naive", arg])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    key = arg.split("=")[0]
    assert capsys.readouterr().err == (f"clbench: config error: unknown config key '{key}'; valid top-level keys: "
                                       "['benchmark', 'checkpoint_dir', 'engine', 'experiment', 'federated', "
                                       "'hydra', 'model', 'resume', 'seed', 'strategy', 'threads', 'tracking']\n")


def test_a_store_that_fails_mid_run_ends_it_with_one_error_and_resume_logs_the_rest(tmp_path, monkeypatch):
    """A tracking server that goes away during task 2 (after MLflow's own retries): before the fix a traceback
    from deep inside MLflow. Now a TrackingError that says to resume; resumed, the run ends like one never
    interrupted, in the same MLflow run, with every epoch's loss logged."""
    from mlflow.tracking import MlflowClient
    from requests import ConnectionError as RequestsConnectionError

    from clbench.tracking import TrackingError

    cfg = run_config(tmp_path, *SMALL)
    whole = run(dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, experiment="whole")))
    original = MlflowClient.log_batch

    def gone(self, run_id, metrics=(), **kwargs):
        if any(m.key == "loss" and m.step == 3 for m in metrics):  # task 2, epoch 2
            raise RequestsConnectionError("Max retries exceeded: Connection refused")
        return original(self, run_id, metrics=metrics, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "log_batch", gone)
        with pytest.raises(TrackingError, match=r"MLflow store \S+ failed during run \w+ \(Max retries exceeded: "
                                                r"Connection refused\); what it logged stays: once the store works "
                                                r"again, rerun the same command with resume=true"):
            run(cfg)
    assert _runs(tmp_path)[0].info.status == "RUNNING"  # not closed through a store that failed: resume continues it
    resumed = run(dataclasses.replace(cfg, resume=True))
    assert (resumed.R == whole.R).all()
    (r,) = _runs(tmp_path)
    assert r.info.run_id == resumed.run_id and r.info.status == "FINISHED"
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(r.info.run_id, "loss")
    assert sorted({h.step for h in history}) == list(range(6))


def test_valid_overrides_pass_the_top_level_key_check():
    from clbench import cli

    cli._check_top_level_keys(["hydra/launcher=basic", "hydra.run.dir=x", "+extra=1", "~tracking", "seed=1",
                               "engine.lr=0.1", "experiment=gpm_pmnist", "-m", "--cfg", "job"])
