"""``tracking=server``: runs log to a team's MLflow server instead of the SQLite file.

The fast test checks what ``tracking=server`` composes to. The slow one stands up the stack a team would run, from
the binaries on this machine (no containers): a throwaway PostgreSQL cluster as the backend store, ``mlflow server``
on it with proxied artifacts, and 8 ``clbench`` runs started together against it; every run must arrive whole (the
same metrics, steps and artifacts as a run into an SQLite store) and ``clbench report`` must read them back.
"""

from __future__ import annotations

import csv
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from clbench.compose import load

CONF = str(Path(__file__).resolve().parent.parent / "clbench" / "conf")
SMALL = ("strategy=gpm", "benchmark=split_digits", "engine.epochs=2", "engine.lr=0.05")
SEEDS = range(8)


# ---------------------------------------------------------------------------------------------- tracking=server


def _tracking_uri(*overrides: str) -> str:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return load(compose(config_name="config", overrides=list(overrides))).tracking.uri


def test_tracking_server_takes_the_uri_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team.example:8080")
    assert _tracking_uri("tracking=server") == "http://mlflow.team.example:8080"
    assert _tracking_uri("tracking=server", "tracking.uri=http://other:5000") == "http://other:5000"
    assert _tracking_uri() == "sqlite:///mlflow.db"  # the default store does not read the variable
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert _tracking_uri("tracking=server") == "http://localhost:5000"


# ---------------------------------------------------------------------------------------------- the server stack


def _postgres_bindir() -> Path | None:
    """The folder of PostgreSQL's server binaries (initdb, pg_ctl, createdb): pg_ctl's on PATH (links followed),
    or Debian's /usr/lib/postgresql/<version>/bin (the newest)."""
    found = shutil.which("pg_ctl")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p).parent for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True,
                                                  key=lambda p: int(Path(p).parts[-3]))]
    tools = ("initdb", "pg_ctl", "createdb")
    return next((d for d in candidates if all(os.access(d / t, os.X_OK) for t in tools)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``<url>/health`` until it answers 200; fail with the server's log if it exits or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"mlflow server did not answer {url}/health within {timeout:g} s:\n{log.read_text()[-4000:]}")


def _stop_group(proc: subprocess.Popen) -> None:
    """End the server's whole process group (``mlflow server`` starts uvicorn, whose workers outlive a killed
    parent): SIGTERM, then SIGKILL what is left after 15 s."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, so that the group check below sees only live members
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@dataclass
class Server:
    uri: str
    artifacts: Path
    start_s: float


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[Server]:
    """A PostgreSQL 15 cluster in a fresh folder, ``mlflow server`` on it (proxied artifacts in tmp, one worker),
    both torn down after the module, whatever happened."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    as_pg: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run initdb and the server as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and runuser is missing (needed to run PostgreSQL as 'postgres')")
        as_pg = ["runuser", "-u", "postgres", "--"]
    # a short path of its own: the postgres user must reach it (pytest's tmp is root-only) and the unix socket's
    # path must stay under ~100 characters
    pgdir = Path(tempfile.mkdtemp(prefix="clbench-pg-"))
    if as_pg:
        shutil.chown(pgdir, user="postgres")
    tmp = tmp_path_factory.mktemp("server")
    pg_port, port = _free_port(), _free_port()
    server: subprocess.Popen | None = None
    pg_started = False

    def pg(tool: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([*as_pg, str(bindir / tool), *args], capture_output=True, text=True, check=True,
                              timeout=kwargs.pop("timeout", 120), **kwargs)

    try:
        t0 = time.monotonic()
        pg("initdb", "-D", str(pgdir / "data"), "-U", "clbench", "--auth=trust", "-E", "UTF8", "--no-sync")
        pg("pg_ctl", "-D", str(pgdir / "data"), "-l", str(pgdir / "postgres.log"), "-w", "-t", "60", "-o",
           f"-c listen_addresses=127.0.0.1 -p {pg_port} -c unix_socket_directories={pgdir} -c fsync=off", "start")
        pg_started = True
        pg("createdb", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "clbench", "mlflow")
        t_pg = time.monotonic() - t0
        log = tmp / "mlflow-server.log"
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(log, "w") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server",
                 "--backend-store-uri", f"postgresql+psycopg2://clbench@127.0.0.1:{pg_port}/mlflow",
                 "--serve-artifacts", "--artifacts-destination", str(tmp / "artifacts"),
                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        _wait_healthy(uri, server, log, timeout=180)
        start_s = time.monotonic() - t0
        print(f"\nPostgreSQL up in {t_pg:.1f} s; PostgreSQL + mlflow server answering /health in {start_s:.1f} s")
        yield Server(uri, tmp / "artifacts", start_s)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"{' '.join(e.cmd)} failed ({e.returncode}): {e.stdout}{e.stderr}")
    finally:
        if server is not None:
            _stop_group(server)
        if pg_started:
            subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(pgdir / "data"), "-m", "immediate", "-w",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(pgdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- runs into it


def _clbench(tmp: Path, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``clbench SMALL *args`` started in ``tmp`` (checkpoints and Hydra's folder there too), not waited for."""
    base = (*SMALL, f"checkpoint_dir={tmp}/checkpoints", f"hydra.run.dir={tmp}/hydra/{name}",
            "engine.progress=none", "threads=1")
    env = (env or dict(os.environ)) | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "clbench.cli", *base, *args], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for ``procs`` (all of them within ``timeout`` s), each of which must exit 0; none outlives the call."""
    deadline = time.monotonic() + timeout
    try:
        outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [f"exit {p.returncode}:\n{err[-3000:]}" for p, (_, err) in zip(procs, outs, strict=True)
              if p.returncode != 0]
    assert not failed, "\n".join(failed)


def _histories(client, run) -> dict[str, list[int]]:
    """Each metric of ``run`` and the steps it was logged at."""
    return {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}


def _matrix(client, run_id: str, dst: Path) -> list[list[str]]:
    dst.mkdir(parents=True)
    path = client.download_artifacts(run_id, "accuracy_matrix.csv", str(dst))
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_eight_parallel_runs_into_an_mlflow_server_on_postgresql_arrive_whole(mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    uri = mlflow_server.uri
    # the reference: one run into an SQLite store, as a laptop would log it
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    t0 = time.monotonic()
    _finish([_clbench(ref_dir, "ref", "seed=0", f"tracking.uri=sqlite:///{ref_dir}/mlflow.db",
                      f"tracking.artifact_root={ref_dir}/mlartifacts")], timeout=600)
    single_s = time.monotonic() - t0
    local = MlflowClient(f"sqlite:///{ref_dir}/mlflow.db")
    (ref,) = local.search_runs([local.get_experiment_by_name("clbench").experiment_id])
    ref_metrics = _histories(local, ref)
    ref_artifacts = {a.path for a in local.list_artifacts(ref.info.run_id)}
    ref_matrix = _matrix(local, ref.info.run_id, tmp_path / "ref-matrix")
    assert {"acc", "bwt", "fwt", "forgetting", "loss", "acc_exp", "basis_dim/hidden.0"} <= set(ref_metrics)

    # 8 runs started together: half name the server through tracking=server and $MLFLOW_TRACKING_URI, half
    # through tracking.uri (with the variable unset, so the override alone decides)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    by_env = os.environ | {"MLFLOW_TRACKING_URI": uri}
    no_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    t0 = time.monotonic()
    procs = [_clbench(runs_dir, f"s{s}", f"seed={s}", "tracking=server", env=by_env) if s % 2 == 0 else
             _clbench(runs_dir, f"s{s}", f"seed={s}", f"tracking.uri={uri}", env=no_env) for s in SEEDS]
    _finish(procs, timeout=1200)
    parallel_s = time.monotonic() - t0
    print(f"\none run into SQLite: {single_s:.1f} s; 8 runs in parallel into the server: {parallel_s:.1f} s; "
          f"server start {mlflow_server.start_s:.1f} s")

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("clbench").experiment_id])
    assert sorted(int(r.data.params["seed"]) for r in runs) == list(SEEDS)
    for r in runs:
        seed = r.data.params["seed"]
        assert r.info.status == "FINISHED", seed
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), r.info.artifact_uri  # proxied by the server
        assert set(r.data.params) == set(ref.data.params), seed
        assert _histories(client, r) == ref_metrics, seed  # every metric, at every step
        assert {a.path for a in client.list_artifacts(r.info.run_id)} == ref_artifacts, seed
        matrix = _matrix(client, r.info.run_id, tmp_path / f"matrix-{seed}")
        assert len(matrix) == len(ref_matrix) and all(len(x) == len(ref_matrix[0]) for x in matrix), seed
        if seed == "0":  # the store does not change the result
            assert matrix == ref_matrix
        stored = mlflow_server.artifacts / r.info.experiment_id / r.info.run_id / "artifacts" / "accuracy_matrix.csv"
        assert stored.is_file(), stored  # in the server's --artifacts-destination

    out = subprocess.run([sys.executable, "-m", "clbench.cli", "report", "--uri", uri], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "left out" not in out.stderr, out.stderr
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in out.stdout.splitlines() if "split_digits" in ln]
    assert len(rows) == 1, out.stdout  # the 8 seeds of one configuration
    assert rows[0][:2] == ["split_digits", "gpm"] and rows[0][3] == "8", out.stdout
    assert all("±" in c for c in rows[0][4:]), out.stdout
