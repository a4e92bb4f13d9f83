"""Building configs for tests the way the CLI does (Hydra compose + validation)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from clbench.compose import load
from clbench.config import RunConfig

CONF = str(Path(__file__).resolve().parent.parent / "clbench" / "conf")


def run_config(tmp: Path, *overrides: str) -> RunConfig:
    """A validated config whose MLflow store and checkpoints live in ``tmp``."""
    base = [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_root={tmp}/mlartifacts",
            f"checkpoint_dir={tmp}/checkpoints", "engine.progress=none", "threads=1"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return load(compose(config_name="config", overrides=[*base, *overrides]))


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (tests draw their data from their own generators)."""
    return torch.Generator().manual_seed(seed)
