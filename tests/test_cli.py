"""A CLI sweep leaves MLflow runs with the documented params, metrics and artifacts; report tabulates them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _clbench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "clbench.cli", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    out = _clbench("-m", "strategy=naive,gpm", "seed=0,1", "benchmark=split_digits", "engine.epochs=2",
                   "engine.lr=0.05", "threads=1", cwd=d)
    return d, out


def test_sweep_prints_matrix_and_scores(sweep):
    _, out = sweep
    assert out.stdout.count("accuracy matrix R") == 4
    assert "ACC" in out.stdout and "BWT" in out.stdout and "FWT" in out.stdout and "forgetting" in out.stdout


def test_mlflow_run_has_params_metrics_artifacts(sweep):
    from mlflow.tracking import MlflowClient

    d, _ = sweep
    client = MlflowClient(f"sqlite:///{d}/mlflow.db")
    exp = client.get_experiment_by_name("clbench")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    gpm = next(r for r in runs if r.data.params["strategy.name"] == "gpm")
    p = gpm.data.params
    for key in ("seed", "engine.lr", "engine.epochs", "benchmark.name", "strategy.threshold", "model.hidden",
                "version.torch", "version.avalanche-lib", "git_sha"):
        assert key in p, key
    assert p["engine.lr"] == "0.05" and p["benchmark.name"] == "split_digits"
    m = gpm.data.metrics
    for key in ("acc", "bwt", "fwt", "forgetting", "acc_exp", "bwt_exp", "loss", "basis_dim/hidden.0"):
        assert key in m, key
    run_id = gpm.info.run_id
    assert len(client.get_metric_history(run_id, "acc_exp")) == 5
    assert len(client.get_metric_history(run_id, "loss")) == 5 * 2  # per epoch, never per step
    dims = [h.value for h in client.get_metric_history(run_id, "basis_dim/hidden.0")]
    assert dims == sorted(dims) and dims[0] > 0  # the memory only grows
    angles = client.get_metric_history(run_id, "angle_mean/hidden.0")  # from the second task on
    smallest = client.get_metric_history(run_id, "angle_min/hidden.0")
    assert sorted(h.step for h in angles) == [1, 2, 3, 4]
    assert all(0.0 <= lo.value <= mean.value <= 90.0 for lo, mean in zip(smallest, angles, strict=True))
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"accuracy_matrix.csv", "accuracy_matrix.png", "config.yaml"} <= arts


def test_report_table(sweep):
    d, _ = sweep
    out = _clbench("report", cwd=d).stdout
    lines = [ln for ln in out.splitlines() if "split_digits" in ln]
    assert len(lines) == 2
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert cells[3] == "2"  # seeds
        assert "±" in cells[4] and "±" in cells[5]


def test_cfg_job_prints_resolved_config(tmp_path):
    out = _clbench("--cfg", "job", "strategy=naive", "engine.epochs=7", cwd=tmp_path).stdout
    assert "epochs: 7" in out and "name: naive" in out
    assert not (tmp_path / "mlflow.db").exists()
