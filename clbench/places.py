"""The folders a run writes to: checked writable before a run starts, and locked while it runs.

A run writes its checkpoints under ``checkpoint_dir``, its MLflow store (an SQLite file by default) and its
artifacts under ``tracking.artifact_root``; Hydra writes its output folder (``hydra.run.dir``). Each is checked
with :func:`check_writable` before anything is built or logged, so a read-only or missing place gives one line
naming the path and the key that moves it, instead of a traceback (or MLflow's minutes of retries) mid-run.

Two locks keep concurrent processes apart (POSIX advisory ``flock`` on the folder itself, so no lock files are
left behind; it is released when the process dies, even by ``kill -9``):

* :func:`run_lock`: one process per run key. Two runs of the same config would share one checkpoint file (the
  last writer wins) and, resumed, log the same steps twice; the second is refused with a :class:`PlaceError`.
* :func:`folder_lock`: waits for the lock, for short critical sections shared by every run, e.g. MLflow's
  creation or migration of an SQLite store's schema (which races when several runs start on a fresh store).
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PlaceError(RuntimeError):
    """A folder or file the run writes cannot be used (not writable, or held by another run of the same config);
    the message names the path, the cause and the key that moves it. Nothing was logged."""


def check_writable(path: Path, key: str, *, is_file: bool = False) -> None:
    """Check that the folder ``path`` (or, with ``is_file``, the file ``path`` and its folder) can be written:
    the folder is created if missing and a temporary file is created and removed in it.

    Args:
        path: the folder (or file) the run will write.
        key: the config key that moves it, named in the error.
        is_file: ``path`` is a file that may already exist (e.g. an SQLite store).

    Raises:
        PlaceError: naming the path, the OS error and ``key``.
    """
    folder = path.parent if is_file else path
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        if is_file and path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "file is not writable")
    except OSError as e:
        where = path.resolve() if is_file else folder.resolve()
        raise PlaceError(f"cannot write to {where} ({e.strerror or e}); set {key} to a writable place") from None


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if missing), waiting for other holders."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def run_lock(folder: Path, key: str) -> Iterator[None]:
    """Hold ``folder`` (a run's checkpoint folder, created if missing) for this process; removed on exit if it
    is still empty and this call created it (a run refused before its first checkpoint leaves nothing).

    Raises:
        PlaceError: another process holds it: the same config is running now.
    """
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PlaceError(f"another clbench process is running this config now (it holds {folder.resolve()}); "
                             f"wait for it to end, or run a copy with another seed or {key}") from None
        try:
            yield
        finally:
            if created and not any(folder.iterdir()):
                folder.rmdir()
    finally:
        os.close(fd)
