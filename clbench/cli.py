"""Command line: ``clbench [overrides]`` runs one experiment (``-m`` sweeps), ``clbench report`` tabulates.

Hydra composes ``clbench/conf``; :func:`clbench.compose.load` validates it before anything is built.

A run that cannot go on prints one line ``clbench: ...`` on stderr (no traceback) and exits with:

* 1: the run diverged (:class:`~clbench.engine.DivergenceError`: a NaN or infinite epoch loss); its MLflow run is
  marked FAILED with what it logged so far. (Hydra's own errors exit 1 too.)
* 2: a config error (:class:`~clbench.config.ConfigError`) or missing data; nothing was logged.
* 3: a file or service the run needs cannot be used: a corrupt checkpoint (:class:`~clbench.checkpoint.
  CheckpointError`), an unusable MLflow store or a tracking server that does not answer
  (:class:`~clbench.tracking.TrackingError`), a place the run writes that is not writable, or the same config
  running in another process now (:class:`~clbench.places.PlaceError`); nothing was logged or overwritten.

* 4: the run was stopped by a signal (SIGTERM, SIGUSR1/2: a cluster's preemption or time-limit warning,
  :class:`~clbench.preemption.Stopped`); its checkpoint is kept and the next start of the same config continues it
  in the same MLflow run. A batch script requeues the job on this code (``docker/slurm``).

In a sweep (``-m``) a job that diverges or cannot resume is reported and the sweep goes on; the exit code is then
that of the first failed job. Each failed job leaves its code in ``clbench.exit`` in its output folder, which the
sweep's process reads at the end (:class:`SweepFailures`), so that failures in launchers that run jobs in other
processes (joblib, submitit) are counted too. A config error or an unusable store stops a sequential sweep at once.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from clbench.checkpoint import CheckpointError
from clbench.compose import load
from clbench.config import ConfigError
from clbench.engine import DivergenceError
from clbench.places import PlaceError, check_writable
from clbench.preemption import Stopped
from clbench.tracking import TrackingError

EXIT_DIVERGED, EXIT_CONFIG, EXIT_UNUSABLE, EXIT_STOPPED = 1, 2, 3, 4
EXIT_FILE = "clbench.exit"  # a failed job of a sweep writes its exit code here, in its output folder
_failed: list[int] = []  # exit codes of the failed jobs of a sweep (read by SweepFailures)


def _fail(message: str, code: int) -> NoReturn:
    """Print ``clbench: <message>`` as one line on stderr and exit with ``code``."""
    print("clbench: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(code)


def _sweeping() -> bool:
    """Whether this job is one of a ``-m`` sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class CheckOutputFolder(Callback):
    """Hydra callback (``hydra.callbacks`` in config.yaml): Hydra's output folder must be writable, else one line
    naming it and the key that moves it, instead of Hydra's traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(folder: str, key: str) -> None:
        try:
            check_writable(Path(folder), key)
        except PlaceError as e:
            _fail(str(e), EXIT_UNUSABLE)


class SweepFailures(Callback):
    """Hydra callback: at the end of a sweep, collect the exit codes its failed jobs left (:data:`EXIT_FILE`),
    wherever the launcher ran them."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        for f in sorted(Path(config.hydra.sweep.dir).rglob(EXIT_FILE), key=lambda p: p.stat().st_mtime):
            _failed.append(int(f.read_text()))


def _job_failed(message: str, code: int) -> float:
    """A job of a sweep failed: print its line, leave its code for :class:`SweepFailures`, let the sweep go on."""
    from hydra.core.hydra_config import HydraConfig

    print("clbench: " + " ".join(message.split()), file=sys.stderr)
    (Path(HydraConfig.get().runtime.output_dir) / EXIT_FILE).write_text(f"{code}\n")
    return float("nan")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _run(cfg: DictConfig) -> float:
    try:
        run_cfg = load(cfg)
    except ConfigError as e:
        _fail(f"config error: {e}", EXIT_CONFIG)
    from clbench.runner import execute

    try:
        result = execute(run_cfg)
    except ConfigError as e:
        _fail(f"config error: {e}", EXIT_CONFIG)
    except FileNotFoundError as e:  # missing data: the message names the path and benchmark.download
        _fail(str(e), EXIT_CONFIG)
    except (TrackingError, PlaceError) as e:
        _fail(str(e), EXIT_UNUSABLE)
    except (DivergenceError, CheckpointError) as e:
        code = EXIT_DIVERGED if isinstance(e, DivergenceError) else EXIT_UNUSABLE
        if not _sweeping():
            _fail(str(e), code)
        return _job_failed(str(e), code)
    except Stopped as e:
        _fail(str(e), EXIT_STOPPED)
    return result.scores["acc"]


def _check_top_level_keys(args: list[str]) -> None:
    """Refuse an override of a top-level key the config does not have (``seeed=1``), listing the valid ones;
    Hydra would refuse it too, but with a multi-line note suggesting ``+seeed=1``, which clbench then refuses.
    Keys under a section (``engine.lrr``) are checked by :func:`clbench.compose.load`."""
    from dataclasses import fields

    from clbench.config import RunConfig

    valid = sorted({f.name for f in fields(RunConfig)} | {"experiment", "hydra"})
    for arg in args:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if re.split(r"[./@]", key, maxsplit=1)[0] not in valid:  # engine.lr, hydra/launcher, benchmark@pkg
            _fail(f"config error: unknown config key '{key}'; valid top-level keys: {valid}", EXIT_CONFIG)


def main() -> None:
    """Entry point of the ``clbench`` console script."""
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from clbench.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    _check_top_level_keys(sys.argv[1:])
    _run()
    if _failed:  # jobs of a sweep that failed (each printed its line)
        print(f"clbench: {len(_failed)} run(s) of the sweep failed", file=sys.stderr)
        sys.exit(_failed[0])


if __name__ == "__main__":  # ``python -m clbench.cli``: run the imported module's main, whose ``_failed`` the
    from clbench.cli import main as imported_main  # Hydra callbacks (imported by name) fill, not this copy's

    imported_main()
