"""Save and restore the whole loop state, so a killed run (even ``kill -9``) resumes where it stopped.

A checkpoint is taken at every epoch end and every experience end. It holds the model, the optimizer of the
experience in progress and its learning-rate schedule, the strategy's state, every RNG state, the accuracy
matrix so far, the initial-model accuracies, and the MLflow run id. Files are written atomically (temp file +
rename), so a kill during a save leaves the previous checkpoint intact. The folder is keyed by a hash of the
config (minus ``resume``), so running the same command with ``resume=true`` finds it.
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

FORMAT_VERSION = 3  # 2: the schedule state; 3: the other scores and the step count


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
    """The checkpoint at ``path``, or None when there is none."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT_VERSION:
        raise RuntimeError(f"checkpoint {path} has format {state.get('format')}, expected {FORMAT_VERSION}; "
                           "delete it to start afresh")
    return state
