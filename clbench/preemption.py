"""Runs stopped by a cluster's signal continue where they stopped, in the same MLflow run.

A scheduler warns a job before it takes the node away: SLURM sends SIGTERM on preemption and, with
``--signal=USR1@120`` (or submitit's ``USR2``), a user signal before the time limit. While a run holds its
checkpoint folder (:func:`stoppable`), each of these signals stops it at once with :class:`Stopped`: the work
since the last checkpoint (at most one epoch: checkpoints are taken at every epoch end) is dropped, since it is
recomputed exactly on resume, and a ``stopped`` marker is written in the folder. The next start of the same
config then continues from the checkpoint, ``resume=true`` implied (:func:`continues`), as does a job that SLURM
itself requeued (``SLURM_RESTART_COUNT`` > 0, which also covers a node that died without a signal).

If a handler was installed before the run (submitit's, when the job was launched with Hydra's submitit launcher),
it is called after the marker is written: submitit then resubmits the same job and exits, and the resubmitted job
resumes. Without one, :class:`Stopped` reaches the command line, which exits with its own code
(:data:`clbench.cli.EXIT_STOPPED`) so that a batch script can requeue the job (``docker/slurm``).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # preemption, and the time-limit warnings
MARKER = "stopped"  # file in the checkpoint folder: this run was stopped by a signal


class Stopped(BaseException):  # like KeyboardInterrupt: no ``except Exception`` may swallow it
    """The run was stopped by ``signum``; its last checkpoint is in ``folder``."""

    def __reduce__(self) -> tuple[type, tuple[int, Path]]:  # rebuilt with its fields when sent between ranks
        return type(self), (self.signum, self.folder)

    def __init__(self, signum: int, folder: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; its last checkpoint is in {folder}, and the "
                         "next start of this config continues it in the same MLflow run (resume=true implied)")
        self.signum, self.folder = signum, folder


def requeued() -> bool:
    """Whether this process is a job that SLURM requeued (``SLURM_RESTART_COUNT`` > 0)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def continues(folder: Path) -> bool:
    """Whether a run in checkpoint folder ``folder`` must resume although ``resume=false``: an earlier process of
    it was stopped by a signal (the marker), or this is a requeued SLURM job."""
    return (folder / MARKER).exists() or requeued()


def clear(folder: Path) -> None:
    """Remove the marker once the run it marked has been continued."""
    (folder / MARKER).unlink(missing_ok=True)


@contextmanager
def stoppable(folder: Path, *, lead: bool = True, forward: Callable[[], list[int]] | None = None) -> Iterator[None]:
    """While inside, :data:`SIGNALS` raise :class:`Stopped` in the main thread (elsewhere: nothing is changed,
    since only the main thread may handle signals); the previous handlers are restored on exit.

    On :class:`Stopped` the ``lead`` process (one device, or rank 0) writes the marker in ``folder``, then calls
    the previous handler of that signal when it is a function (submitit's requeue, which exits the process);
    otherwise :class:`Stopped` propagates.

    Args:
        folder: the run's checkpoint folder.
        lead: whether this process writes the marker and hands over to the previous handler (not other ranks).
        forward: for a process that spawned the ranks (:mod:`clbench.distributed`): the signal is passed on to the
            processes this returns instead of raised, and whatever ends the body afterwards (the ranks' Stopped,
            or the error of a rank cut mid-collective) becomes :class:`Stopped`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    received: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        for s in SIGNALS:  # a second signal while stopping must not interrupt the stop
            signal.signal(s, signal.SIG_IGN)
        if forward is None:
            raise Stopped(signum, folder)
        received.append(signum)
        for pid in forward():
            os.kill(pid, signum)

    for s in SIGNALS:
        signal.signal(s, stop)
    try:
        try:
            yield
        except BaseException as error:
            if received and not isinstance(error, Stopped):
                raise Stopped(received[0], folder) from error
            raise
    except Stopped as stopped:
        if not lead:
            raise
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text(f"{signal.Signals(stopped.signum).name}\n")
        handler = previous[signal.Signals(stopped.signum)]
        if callable(handler):
            for s, h in previous.items():
                signal.signal(s, h)
            handler(stopped.signum, None)
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
