"""Building configs for tests the way the CLI does (Hydra compose + validation)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
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


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def interrupt_in_task(task: int, epoch: int, stop: Callable[[], None] = _raise_keyboard_interrupt):
    """An ``Engine.fit`` that calls ``stop`` (default: raise KeyboardInterrupt, a kill) right after the
    checkpoint of ``epoch`` of ``task``."""
    import clbench.engine

    original = clbench.engine.Engine.fit

    def fit(self, ctx, strategy, start_epoch, on_epoch_end):
        def cut(e, loss, extra=None):
            on_epoch_end(e, loss, extra)
            if ctx.experience == task and e == epoch:
                stop()

        return original(self, ctx, strategy, start_epoch, cut)

    return fit


def killed_and_resumed(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch, task: int = 1,
                       epoch: int = 0) -> tuple[Any, Any]:
    """``cfg`` run whole (MLflow experiment ``whole``), then run again, killed after ``epoch`` of ``task``, and
    resumed with ``resume=true``: the whole run's result and the resumed one's."""
    import clbench.engine
    from clbench.experiment import run

    whole = run(dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, experiment="whole")))
    monkeypatch.setattr(clbench.engine.Engine, "fit", interrupt_in_task(task, epoch))
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.undo()
    return whole, run(dataclasses.replace(cfg, resume=True))


def clbench_process(cwd: Path, *args: str) -> subprocess.Popen:
    """``python -m clbench.cli *args`` started in ``cwd`` (created if missing) on one thread; stdout and stderr
    together, as text."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "clbench.cli", *args], cwd=cwd,
                            env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(cwd: Path, ready: Callable[[dict[str, Any]], bool], proc: subprocess.Popen | None = None,
                        timeout: float = 300) -> None:
    """Wait until the checkpoint under ``cwd/checkpoints`` satisfies ``ready`` (a file caught while it is being
    replaced is read again).

    Raises:
        AssertionError: ``proc`` ended, or ``timeout`` seconds passed, first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        found = next((cwd / "checkpoints").glob("*/last.ckpt"), None) if (cwd / "checkpoints").exists() else None
        try:
            if found is not None and ready(torch.load(found, weights_only=False)):
                return
        except (OSError, RuntimeError, EOFError):
            pass
        time.sleep(0.02)
    raise AssertionError("the run ended, or ran out of time, before its checkpoint was ready")


def fails_fast_without_data_and_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, experiment: str,
                                      first_missing: str) -> None:
    """``experiment=<experiment>`` with no data under ``tmp_path/data`` and its model not on disk (offline): one
    FileNotFoundError naming ``first_missing`` (relative to the data root) and the model, within 10 s, before
    anything is logged."""
    from clbench.experiment import run
    from clbench.models import hf_loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_loading, "_download_blocker", lambda download: "HF_HUB_OFFLINE is set")
    cfg = run_config(tmp_path, f"experiment={experiment}", f"benchmark.data_root={tmp_path}/data")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        run(cfg)
    message = str(info.value)
    assert f"{tmp_path}/data/{first_missing}" in message
    assert f"Also missing: model '{cfg.model.pretrained}' is not on disk and HF_HUB_OFFLINE is set" in message
    assert time.perf_counter() - start < 10 and not (tmp_path / "mlflow.db").exists()
