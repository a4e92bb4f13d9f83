"""The papers' experiments (clbench/conf/experiment/): each composes into the paper's setting and, without its
data, fails at once with the missing-data error, before anything is logged."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CONF, run_config

from clbench.experiment import run

ALL = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))
EXPERIMENTS = [e for e in ALL if not e.startswith(("olora_", "ogpsa_", "o3_"))]  # the vision papers' (O-LoRA's:
# tests/test_lm.py; OGPSA's: tests/test_alignment_real.py; O3's: tests/test_unlearning_real.py)


def test_every_paper_experiment_is_there():
    vision = [f"{m}_{b}" for m in ("gpm", "rogo", "hlop", "fot") for b in ("pmnist", "cifar100", "5datasets",
                                                                          "miniimagenet")]
    olora = ["olora_t5", *(f"olora_t5_order{k}" for k in range(1, 7))]  # the shared T5 setting and its 6 orders
    ogpsa = ["ogpsa_qwen_sft", "ogpsa_qwen_dpo", "ogpsa_qwen_sft_dpo", "ogpsa_llama_sft_dpo"]
    o3 = ["o3_facts", "o3_scienceqa", "o3_tofu"]  # the offline stand-in, then the code's two settings
    assert sorted(vision + olora + ogpsa + o3) == ALL


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_fails_fast_without_its_data(name, tmp_path):
    cfg = run_config(tmp_path, f"experiment={name}", f"benchmark.data_root={tmp_path}/data")
    method, _, bench = name.partition("_")
    assert cfg.strategy.name == method
    nets = {"pmnist": "mlp", "cifar100": "alexnet"}
    if method == "hlop":
        nets = {"pmnist": "snn_mlp", "cifar100": "snn_cnn"}
    assert cfg.model.name == nets.get(bench, "resnet18" if method != "hlop" else "snn_resnet18")
    start = time.time()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data")):
        run(cfg)
    assert time.time() - start < 30
    assert not (tmp_path / "mlflow.db").exists()  # nothing logged


def test_experiment_settings_are_the_papers(tmp_path):
    cifar = run_config(tmp_path, "experiment=gpm_cifar100")
    assert (cifar.engine.batch_size, cifar.engine.lr, cifar.engine.lr_min, cifar.engine.patience) == (64, 0.01,
                                                                                                      1e-5, 6)
    assert cifar.strategy.samples == [24, 100, 100, 125, 125] and cifar.strategy.threshold_increment == 0.003
    rogo = run_config(tmp_path, "experiment=rogo_cifar100")
    assert (rogo.strategy.basis_source, rogo.strategy.search_schedule, rogo.strategy.on_success) == (
        "gradients", "after_decay", "reset")
    five = run_config(tmp_path, "experiment=gpm_5datasets")
    assert len(five.strategy.samples) == 20 and five.engine.lr_factor == 3.0
    # a command-line override still wins over the experiment
    assert run_config(tmp_path, "experiment=gpm_pmnist", "engine.epochs=1").engine.epochs == 1


def test_cli_names_the_missing_data_and_exits_2(tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "clbench.cli", "experiment=gpm_cifar100",
                          f"benchmark.data_root={tmp_path}/data"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert str(tmp_path / "data") in out.stdout + out.stderr
    assert "download" in out.stdout + out.stderr


@pytest.mark.parametrize(("bench", "shape", "tasks"), [
    ("pmnist", (784,), 10), ("cifar100", (3, 32, 32), 10), ("miniimagenet", (3, 84, 84), 20),
    ("5datasets", (3, 32, 32), 5)])
def test_hlop_row_counts_fit_the_networks_protected_layers(bench, shape, tasks, tmp_path):
    """hlop.md "Hyper-parameters": one count per protected layer (ResNet: 20 convs in the code's order) for
    every task, and the first task's counts as the code's."""
    from clbench.models import build_model
    from clbench.streams import StreamSpec

    cfg = run_config(tmp_path, f"experiment=hlop_{bench}")
    multi = bench != "pmnist"
    spec = StreamSpec(bench, tasks, shape, (10,) * tasks, 10 * tasks if multi else 10, multi)
    layers = build_model(cfg.model, spec).protected_layers()
    for t in range(tasks):
        assert len(cfg.strategy.rows[min(t, len(cfg.strategy.rows) - 1)]) in (1, len(layers)), (bench, t)
    first = {"pmnist": [80, 200, 100], "cifar100": [6, 100, 200]}.get(bench)
    if first:
        assert cfg.strategy.rows[0] == first
    if bench == "miniimagenet":
        assert cfg.model.stem_stride == 2 and cfg.benchmark.stream_seed == 2022 and len(cfg.strategy.rows) == 7
        assert cfg.strategy.rows[-1] == [0, 2, 2, 2, 2, 2, 4, 0, 4, 4, 4, 8, 0, 8, 8, 8, 16, 0, 16, 16]
