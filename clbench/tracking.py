"""MLflow tracking: one run per experiment run, resumable, off the hot path.

The default store is an embedded SQLite database in the working directory (``sqlite:///mlflow.db``);
``tracking.uri=http://host:5000`` logs to a server instead. The client API is used directly (no global
"active run"), so a resumed run re-opens the same MLflow run by id.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from clbench.config import TrackingConfig

_MAX_PARAM_LEN = 6000
_BATCH = 100


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


class Tracker:
    """An MLflow run: params once, metrics per epoch / experience, artifacts at the end."""

    def __init__(self, cfg: TrackingConfig, run_name: str, run_id: str | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            local = cfg.uri.startswith(("sqlite:", "file:")) or "://" not in cfg.uri
            location = Path(cfg.artifact_root).resolve().as_uri() if local else None
            exp_id = self.client.create_experiment(cfg.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        if run_id is None:
            run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
            self.run_id = run.info.run_id
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in batches (MLflow caps batch size and value length)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_"), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + _BATCH])

    def log_artifact(self, path: str | os.PathLike[str]) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        self.client.set_terminated(self.run_id, status=status)
