"""Save and restore the whole loop state, so a killed run (even ``kill -9``) resumes where it stopped.

A checkpoint is taken at every epoch end (a federated run: every round end) and every experience end. It holds
the model (a federated run: the global model), the optimizer of the experience in progress and its learning-rate
schedule, the strategy's state, every RNG state, the accuracy matrix so far, the initial-model accuracies, the
MLflow run id, a federated run's loop position (:meth:`clbench.federated.loop.FederatedLoop.state_dict`;
None for the others) and the anchors of the experience in progress (DPO's and NPO's reference log-probabilities,
computed as it started: :meth:`clbench.models.base.ContinualModel.anchors`,
:meth:`strategies.base.Strategy.anchors`). Files are written atomically (temp file + rename), so a kill during a
save leaves the previous checkpoint intact. The folder is keyed by a hash of the config (minus ``resume``), so
running the same command with ``resume=true`` finds it. A checkpoint that cannot be read (truncated, overwritten,
another program's file, another format) is refused with a :class:`CheckpointError` naming the file, before anything
is built or logged.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clbench.config import RunConfig
from clbench.fingerprint import fingerprint

FORMAT_VERSION = 5  # 2: the schedule state; 3: the other scores and the step count; 4: the federated loop's;
# 5: the experience's anchors (DPO's reference log-probabilities)
KEYS = ("experience", "next_epoch", "model", "optimizer", "schedule", "strategy", "rng", "R", "initial", "others",
        "step", "run_id", "federation", "anchors")  # what :func:`save` writes besides the format


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file, what is wrong and what to do."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"checkpoint {path} {problem}; delete it (rm -r {path.parent}) to start this run afresh, "
                         "or set checkpoint_dir to a folder with an intact one")
        self.path, self.problem = path, problem

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:  # sent from a rank to its parent
        return type(self), (self.path, self.problem)


def checkpoint_path(cfg: RunConfig) -> Path:
    """``<checkpoint_dir>/<strategy>-<benchmark>-s<seed>-<hash>/last.ckpt``."""
    name = f"{cfg.strategy.name}-{cfg.benchmark.name}-s{cfg.seed}-{fingerprint(cfg)}"
    return Path(cfg.checkpoint_dir) / name / "last.ckpt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"format": FORMAT_VERSION, **state}, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when there is none.

    Raises:
        CheckpointError: the file cannot be unpickled (truncated, random bytes, empty), is not a clbench
            checkpoint (no ``format`` or a missing key) or has another :data:`FORMAT_VERSION`.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises many types: RuntimeError, UnpicklingError, EOFError, OSError...
        raise CheckpointError(path, _unreadable(path, e)) from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(path, f"is not a clbench checkpoint (a {type(state).__name__} without a 'format' key)")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(path, f"has format {state['format']!r}, and this clbench reads format {FORMAT_VERSION}")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise CheckpointError(path, f"lacks {missing} (format {FORMAT_VERSION} has them: the file was altered)")
    return state


def _unreadable(path: Path, error: Exception) -> str:
    """What is wrong with a file that :func:`torch.load` refused: empty, a damaged torch file, or another kind."""
    size = path.stat().st_size if path.is_file() else 0
    reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or ['-'])[0]}"
    if path.is_dir():
        return "is a folder, not a file"
    if size == 0:
        return "is empty (0 bytes: a save cut short, or the file was emptied)"
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format is a zip archive
    if zipped:
        return f"is a truncated or damaged torch file ({size} bytes; {reason})"
    return f"is not a torch file ({size} bytes; {reason})"
