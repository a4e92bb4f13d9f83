"""Submitting a run to Flower (``federated.engine=flower``; fot.md §9), and the local federation on loopback.

:func:`launch` writes a Flower app for the run (a ``pyproject.toml`` whose components are
:mod:`clbench.flower.app`'s ServerApp and ClientApp, and whose run config carries the run's config),
submits it with ``flwr run <app> <federation> --stream``, echoes the run's log and reads the run's result from
the ServerApp's last line (:data:`clbench.flower.app.RESULT_MARKER`).

The federation is either

* ``federated.flower_federation=null`` (default): a :class:`LocalFederation` — a SuperLink and K SuperNodes
  (``partition-id=k``) as real processes on 127.0.0.1 with free ports and a private ``FLWR_HOME``, started for
  the run and stopped after it with every process they started (Flower's ``flower-superexec``,
  ``flwr-serverapp`` and ``flwr-clientapp``, some in sessions of their own); or
* a name from ``$FLWR_HOME/config.toml``: a SuperLink somewhere else whose SuperNodes the user started (the
  README's cluster recipe). Every node needs clbench installed (the app ships no code) and, in this stand-in,
  the benchmark's data; the tracking URI must be reachable from the SuperLink's host.

Flower runs a ClientApp in a fresh process per message, so each client round pays one Python start and one
build of the stream and model (benchmarks/federated.py measures it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import psutil
import tomli_w

from clbench.flower.app import CONFIG_KEY, RESULT_MARKER, config_text

if TYPE_CHECKING:
    from clbench.config import RunConfig
    from clbench.experiment import RunResult

LOCAL_FEDERATION = "clbench-local"
_START_TIMEOUT = 60.0  # seconds for the local SuperLink to listen


def _bin(name: str) -> str:
    """A Flower executable of this environment (SuperLink spawns ``flower-superexec`` by name: the venv's
    ``bin`` is also put first on the children's PATH)."""
    return str(Path(sys.executable).parent / name)


def _env(home: Path | None) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (all held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def _wait_listening(what: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until ``proc`` listens on ``port``; raise with its log's tail if it exits or takes too long."""
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the local Flower {what} exited with code {proc.returncode}:\n{_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the local Flower {what} did not listen on 127.0.0.1:{port} within {_START_TIMEOUT} s:\n"
                       f"{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through LocalFederation.__exit__, which stops the processes


class LocalFederation:
    """A SuperLink and ``clients`` SuperNodes on 127.0.0.1, as real processes, under ``home`` (their
    ``FLWR_HOME``, config and logs). Use as a context manager; :attr:`env` is the environment for ``flwr run``.
    """

    def __init__(self, home: Path, clients: int) -> None:
        self.home, self.clients = home, clients
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = _env(home)
        self._sigterm: Any = None

    def _start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.home,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> LocalFederation:
        if threading.current_thread() is threading.main_thread():  # a SIGTERM must still stop the federation
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            port, *node_ports = _free_ports(1 + self.clients)
            (self.home / "config.toml").write_text(tomli_w.dumps(
                {"superlink": {LOCAL_FEDERATION: {"address": f"127.0.0.1:{port}", "insecure": True}}}))
            log = self.home / "superlink.log"
            link = self._start([_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                                "--port", str(port)], log)
            _wait_listening("SuperLink", port, link, log)
            nodes = []
            for k, node_port in enumerate(node_ports):
                log = self.home / f"supernode-{k}.log"
                nodes.append((node_port, log, self._start(
                    [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--port",
                     str(node_port), "--node-config", f"partition-id={k} num-partitions={self.clients}"], log)))
            for k, (node_port, log, proc) in enumerate(nodes):
                _wait_listening(f"SuperNode {k}", node_port, proc, log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    def stop(self) -> None:
        """Terminate the processes started and every descendant of theirs (SIGTERM, then SIGKILL after 10 s)."""
        family: list[psutil.Process] = []
        for proc in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(proc.pid)
                family += [root, *root.children(recursive=True)]
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(family, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        for proc in self.procs:
            proc.wait()  # reap
        self.procs.clear()

    def logs(self) -> str:
        """The last lines of the SuperLink's and each SuperNode's log."""
        return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(self.home.glob("*.log")))


def write_app(directory: Path, cfg: RunConfig) -> Path:
    """The Flower app of a run: a ``pyproject.toml`` naming clbench's ServerApp and ClientApp, with the run's
    config as its run config (:data:`clbench.flower.app.CONFIG_KEY`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(tomli_w.dumps({
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "clbench-run", "version": "1.0.0", "description": "a clbench run on Flower",
                    "license": "MIT", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "clbench",
                                  "components": {"serverapp": "clbench.flower.app:server_app",
                                                 "clientapp": "clbench.flower.app:client_app"},
                                  "config": {CONFIG_KEY: config_text(cfg)}}}},
    }))
    return directory


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its relative paths made absolute: Flower's processes do not run in this directory (on a
    remote federation the paths are this host's: use a tracking server there)."""

    def store(uri: str) -> str:
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            return prefix + str(Path(uri[len(prefix):]).resolve())
        return uri if ":" in uri else str(Path(uri).resolve())  # a URI as it is; a plain path (a file store)

    t = cfg.tracking
    tracking = dataclasses.replace(t, uri=store(t.uri), artifact_root=store(t.artifact_root))
    benchmark = dataclasses.replace(cfg.benchmark, data_root=str(Path(cfg.benchmark.data_root).resolve()))
    return dataclasses.replace(cfg, tracking=tracking, benchmark=benchmark,
                               checkpoint_dir=str(Path(cfg.checkpoint_dir).resolve()))


def submit(app: Path, federation: str, env: dict[str, str], echo: IO[str] | None = None) -> dict[str, object]:
    """``flwr run <app> <federation> --stream``: echo its output (to ``echo``, default the current
    ``sys.stdout``) and return the ServerApp's result.

    Raises:
        RuntimeError: ``flwr run`` failed or the run ended without a result (the ServerApp raised).
    """
    proc = subprocess.Popen([_bin("flwr"), "run", str(app), federation, "--stream"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=app)
    assert proc.stdout is not None
    echo = echo or sys.stdout
    result, lines = None, []
    try:
        for line in proc.stdout:
            if (at := line.find(RESULT_MARKER)) >= 0:
                result, _ = json.JSONDecoder().raw_decode(line[at + len(RESULT_MARKER):])
                line = line[:at] + "\n" if at else ""
            echo.write(line)
            lines = [*lines[-39:], line.rstrip()]
    finally:
        if proc.poll() is None and result is None:  # interrupted, or the stream broke: stop the submission
            proc.kill()
        code = proc.wait()
    if code != 0 or result is None:
        raise RuntimeError(f"the Flower run on federation '{federation}' ended without a result (flwr run exit "
                           f"code {code}); its last lines:\n" + "\n".join(lines))
    return result


def launch(cfg: RunConfig) -> RunResult:
    """Run ``cfg`` on Flower: on a :class:`LocalFederation` of ``federated.clients`` SuperNodes, or on the
    federation ``federated.flower_federation``; return what the ServerApp's run produced.

    Raises:
        ConfigError: what the stream, the model, the strategy or the split of a task refuses, before any Flower
            process starts.
    """
    from clbench.experiment import RunResult, setup
    from clbench.federated.loop import split_task

    ctx, _ = setup(cfg)
    for task in range(ctx.n_experiences):  # a task that cannot be split is a config error here, before Flower
        split_task(ctx, cfg.federated, task)
    cfg = absolute_paths(cfg)
    with tempfile.TemporaryDirectory(prefix="clbench-flower-") as tmp:
        app = write_app(Path(tmp) / "app", cfg)
        if cfg.federated.flower_federation is not None:
            result = submit(app, cfg.federated.flower_federation, _env(None))
        else:
            with LocalFederation(Path(tmp) / "flwr", cfg.federated.clients) as local:
                try:
                    result = submit(app, LOCAL_FEDERATION, local.env)
                except RuntimeError as e:
                    raise RuntimeError(f"{e}\nThe local federation's logs:\n{local.logs()}") from None
    return RunResult(R=np.array(result["R"]), initial=np.array(result["initial"]),
                     scores=dict(result["scores"]), run_id=str(result["run_id"]))  # type: ignore[call-overload]
