"""MLflow tracking: one run per experiment run, resumable, off the hot path.

The default store is an embedded SQLite database in the working directory (``sqlite:///mlflow.db``);
``tracking.uri=http://host:5000`` logs to a server instead. The client API is used directly (no global
"active run"), so a resumed run re-opens the same MLflow run by id.

Before a run logs anything, :func:`check_store` checks that the store can be used, without writing to it: a
server must answer within ``tracking.timeout`` seconds, an SQLite file must be an (MLflow) SQLite database whose
schema is not half-migrated. Otherwise a :class:`TrackingError` names the URI or the file and what to do.

Several runs may start at once on one SQLite store, even a fresh one: MLflow creates (or migrates) the schema on
first use, which is not safe to do concurrently, so that first use and the experiment's creation are serialized
with a lock on the store's folder (:func:`clbench.places.folder_lock`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from clbench.config import TrackingConfig
from clbench.places import check_writable, folder_lock

_MAX_PARAM_LEN = 6000
_BATCH = 100


class TrackingError(RuntimeError):
    """The MLflow store cannot be used (a server that does not answer, a file that is not an MLflow database);
    the message names the URI or the file and what to do. Nothing was written to the store."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` tracking URI (relative to the working directory unless it starts
    with ``/``, as MLflow reads it), or None for another scheme or an in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return Path(raw) if raw and raw != ":memory:" else None


def check_store(uri: str, timeout: float) -> None:
    """Check, without writing to it, that the MLflow store at ``uri`` can be used: an ``http(s)://`` server must
    answer a request (any HTTP status) within ``timeout`` seconds; an ``sqlite:///`` file must be absent, empty,
    or an SQLite database with MLflow's tables and no half-done migration. Other schemes are left to MLflow.

    Raises:
        TrackingError: naming the URI or the file, the error, and what to do.
    """
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout)
    path = sqlite_path(uri)
    if path is not None and path.parent.is_dir():
        with folder_lock(path.parent):  # not while another run creates or migrates the schema
            _check_sqlite(path)


def _check_server(uri: str, timeout: float) -> None:
    """One GET of ``<uri>/health``: an HTTP answer of any status passes; no answer in ``timeout`` s fails."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # the server answered (an MLflow server without /health, or behind authentication)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise TrackingError(f"tracking server {uri} did not answer ({reason}; waited up to {timeout:g} s): start it, "
                            "fix tracking.uri, or raise tracking.timeout") from None


def _check_sqlite(path: Path) -> None:
    """An MLflow SQLite store's file: absent (MLflow creates it), empty, or an SQLite database whose tables are
    MLflow's; opened read-only."""
    where = path.resolve()
    if not path.exists():  # MLflow creates it (and its folder)
        return
    if path.is_dir():
        raise TrackingError(f"MLflow store {where} is a folder, not an SQLite file; fix tracking.uri")
    if path.stat().st_size == 0:
        return
    try:
        con = sqlite3.connect(f"{where.as_uri()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as e:
        raise TrackingError(f"MLflow store {where} is not a usable SQLite database ({e}); it was left as it is: move "
                            f"it aside (mv {path} {path}.bad) to start a new store, or set tracking.uri to another "
                            "one") from None
    if tables and not {"experiments", "runs"} <= tables:
        raise TrackingError(f"MLflow store {where} is an SQLite database without MLflow's tables (it has "
                            f"{sorted(tables)[:5]}); it was left as it is: set tracking.uri to another file")
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftovers:  # a schema migration that stopped half-way (e.g. runs of an older clbench racing on it)
        drops = "; ".join(f"DROP TABLE {t}" for t in leftovers)
        raise TrackingError(f"MLflow store {where} holds a schema migration that stopped half-way (tables "
                            f"{', '.join(leftovers)}); it was left as it is: back it up, then repair it with "
                            f"sqlite3 {path} '{drops};' && mlflow db upgrade sqlite:///{where}, or set tracking.uri "
                            "to another file")


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on (logged as ``version.<pkg>`` params)."""
    out = {}
    for pkg in ("clbench", "torch", "lightning", "avalanche-lib", "torchmetrics", "hydra-core", "mlflow", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def git_sha() -> str:
    """The commit of the clbench source tree (``+dirty`` with local changes), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def run_key(checkpoint_folder: Path) -> str:
    """The ``clbench.run_key`` of the run whose checkpoint folder is ``checkpoint_folder``: a hash of this host's
    name and the folder's absolute path (a run lock is local to a host)."""
    where = f"{socket.gethostname()}:{checkpoint_folder.resolve()}"
    return hashlib.sha1(where.encode()).hexdigest()[:16]


class Tracker:
    """An MLflow run: params once, metrics per epoch / experience, artifacts at the end.

    Args:
        cfg: where to log.
        run_name: the new run's name.
        run_id: the run to continue (a resumed run), or None for a new one.
        tags: the new run's tags.
        run_key: a key unique to this run's checkpoint folder on this host, set as the tag ``clbench.run_key``.
            The caller holds that folder's run lock (:func:`clbench.places.run_lock`), so any other RUNNING run with
            the same key is an orphan of a process that ended without closing it (killed before its first
            checkpoint, or a run not resumed): it is closed as KILLED. The lock is a local one, so the key
            includes the host: two hosts logging to one server with the same ``checkpoint_dir`` path on their
            own disks are told apart (:func:`run_key`).

    Raises:
        TrackingError: the store cannot be used.
        clbench.places.PlaceError: the artifact folder of a local store cannot be written.
    """

    def __init__(self, cfg: TrackingConfig, run_name: str, run_id: str | None = None,
                 tags: Mapping[str, str] | None = None, run_key: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        check_store(cfg.uri, cfg.timeout)
        self.resumed = run_id is not None
        path = sqlite_path(cfg.uri)
        self.store = f"MLflow store {path.resolve()}" if path is not None else f"MLflow store {cfg.uri}"
        try:
            with folder_lock(path.resolve().parent) if path is not None else nullcontext():
                self.client = MlflowClient(tracking_uri=cfg.uri)
                exp = self.client.get_experiment_by_name(cfg.experiment)  # creates or migrates the schema
                local = cfg.uri.startswith(("sqlite:", "file:")) or "://" not in cfg.uri
                if exp is None:
                    location = None
                    if local:
                        check_writable(Path(cfg.artifact_root), "tracking.artifact_root")
                        location = Path(cfg.artifact_root).resolve().as_uri()
                    exp_id = self.client.create_experiment(cfg.experiment, artifact_location=location)
                    exp = self.client.get_experiment(exp_id)
            if exp.artifact_location.startswith("file:"):  # fixed when the experiment was created
                check_writable(Path(unquote(urlparse(exp.artifact_location).path)),
                               f"tracking.experiment (experiment '{cfg.experiment}' keeps its artifacts there)")
            if run_key is not None:
                self._close_orphans(exp.experiment_id, run_key, keep=run_id)
            if run_id is None:
                key_tag = {} if run_key is None else {"clbench.run_key": run_key}
                run = self.client.create_run(exp.experiment_id, run_name=run_name, tags=dict(tags or {}) | key_tag)
                self.run_id = run.info.run_id
            else:
                self.run_id = run_id
                self.client.update_run(run_id, status="RUNNING")
        except _store_errors() as e:
            raise TrackingError(f"{self.store} cannot be used ({_first_line(e)}); fix or move it aside, or set "
                                "tracking.uri to another store") from e

    @contextmanager
    def _during_run(self) -> Iterator[None]:
        """A store that fails once the run is under way (e.g. a server that went away, after MLflow's own retries)
        ends the run with a :class:`TrackingError`: what was logged stays, and since metrics are logged before the
        checkpoint that covers them, ``resume=true`` logs the rest."""
        try:
            yield
        except _store_errors() as e:
            raise TrackingError(f"{self.store} failed during run {self.run_id} ({_first_line(e)}); what it logged "
                                "stays: once the store works again, rerun the same command with resume=true") from e

    def _close_orphans(self, experiment_id: str, run_key: str, keep: str | None) -> None:
        """Close as KILLED the RUNNING runs tagged ``run_key`` other than ``keep``: their processes are gone."""
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`clbench.run_key` = '{run_key}' and attributes.status = 'RUNNING'")
        for orphan in found:
            if orphan.info.run_id != keep:
                self.client.set_tag(orphan.info.run_id, "error", "orphaned: its process ended without closing "
                                                                 "it; closed by a later run of the same config")
                self.client.set_terminated(orphan.info.run_id, status="KILLED")
                print(f"closed MLflow run {orphan.info.run_id} as KILLED: an earlier process of this config ended "
                      "without closing it")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in batches (MLflow caps batch size and value length)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        with self._during_run():
            for i in range(0, len(items), _BATCH):
                self.client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_"), float(v), now, step) for k, v in metrics.items()]
        with self._during_run():
            for i in range(0, len(items), _BATCH):
                self.client.log_batch(self.run_id, metrics=items[i:i + _BATCH])

    def log_artifact(self, path: str | os.PathLike[str]) -> None:
        with self._during_run():
            self.client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        with self._during_run():
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run (``FINISHED``, ``FAILED`` or ``KILLED``); a resumed run that finishes drops the ``error``
        tag an earlier failure left."""
        with self._during_run():
            if status == "FINISHED" and self.resumed and "error" in self.client.get_run(self.run_id).data.tags:
                self.client.delete_tag(self.run_id, "error")
            self.client.set_terminated(self.run_id, status=status)


def _store_errors() -> tuple[type[BaseException], ...]:
    """What MLflow's client raises when its store fails (imported late: MLflow is slow to import)."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, SQLAlchemyError, RequestException, OSError


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
