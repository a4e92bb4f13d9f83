"""Bad configs fail before training, naming the key and what is valid."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from clbench.compose import load
from clbench.config import ConfigError

CONF = str(Path(__file__).resolve().parent.parent / "clbench" / "conf")


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_are_valid_and_typed():
    cfg = load(composed())
    assert cfg.benchmark.name == "permuted_mnist_5k"
    assert cfg.strategy.name == "gpm" and cfg.strategy.threshold == [0.95, 0.99, 0.99]
    assert cfg.engine.lr == 0.01 and cfg.engine.batch_size == 10


def test_every_key_overridable():
    cfg = load(composed("strategy=naive", "benchmark=split_digits", "seed=3", "engine.epochs=2", "engine.lr=0.05"))
    assert (cfg.strategy.name, cfg.benchmark.name, cfg.seed, cfg.engine.epochs, cfg.engine.lr) == (
        "naive", "split_digits", 3, 2, 0.05)


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["+engine.foo=1"], r"unknown config key 'engine.foo'.*valid keys here: \[.*'batch_size'"),
    (["+strategy.bogus=1"], r"unknown config key 'strategy.bogus'.*'threshold'"),
    (["engine.epochs=abc"], r"'engine.epochs'.*abc"),
    (["engine.lr=0"], r"'engine.lr'.*must be > 0"),
    (["engine.lr=-0.1"], r"'engine.lr'.*must be > 0"),
    (["engine.batch_size=0"], r"'engine.batch_size'.*>= 1"),
    (["benchmark.n_tasks=0"], r"'benchmark.n_tasks'.*>= 1"),
    (["strategy.threshold=[1.5]"], r"'strategy.threshold'.*\(0, 1\]"),
    (["strategy.threshold=[0]"], r"'strategy.threshold'.*\(0, 1\]"),
    (["strategy.rank_rule=foo"], r"'strategy.rank_rule'.*\['code', 'paper'\]"),
    (["engine.optimizer=rmsprop"], r"'engine.optimizer'.*\['adam', 'adamw', 'sgd'\] nor a torch.optim"),
    (["benchmark.name=imagenet"], r"unknown benchmark 'imagenet'.*permuted_mnist_5k"),
    (["engine.devices=0"], r"'engine.devices'.*>= 1"),
    (["engine.devices=[0]"], r"'engine.devices'.*whole number"),
    (["engine.precision=bf16-true"], r"'engine.precision'.*'bf16-mixed'"),
    (["engine.accelerator=tpu"], r"'engine.accelerator'.*'cuda'"),
    (["model.head=sideways"], r"'model.head'.*'multi'"),
    (["strategy.name=ewc_typo"], r"unknown strategy 'ewc_typo'.*gpm"),
])
def test_bad_config_names_key_and_valid_values(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load(composed(*overrides))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "clbench.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_unknown_strategy_lists_options(tmp_path):
    out = _cli("strategy=nope", cwd=tmp_path)
    assert out.returncode != 0
    assert "strategy/nope" in out.stderr and "gpm" in out.stderr and "naive" in out.stderr


def test_cli_bad_value_fails_fast_and_logs_nothing(tmp_path):
    t0 = time.perf_counter()
    out = _cli("engine.lr=-1", cwd=tmp_path)
    assert time.perf_counter() - t0 < 10.0
    assert out.returncode == 2
    assert "engine.lr" in out.stderr and "must be > 0" in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "checkpoints").exists()


def test_config_key_ignores_defaults_and_is_recomputable_from_mlflow_params(tmp_path):
    """The key of a configuration hashes its non-default settings (and the component names), so adding a key
    with a default keeps every earlier run's key; the report recomputes it from a run's params."""
    from dataclasses import asdict

    from helpers import run_config

    from clbench.config import flatten
    from clbench.fingerprint import fingerprint, fingerprint_params

    base = run_config(tmp_path, "strategy=naive")
    assert fingerprint(run_config(tmp_path, "strategy=naive", "model.dropout=0.0"), False) == fingerprint(base, False)
    assert fingerprint(run_config(tmp_path, "strategy=naive", "model.dropout=0.1"), False) != fingerprint(base, False)
    assert fingerprint(run_config(tmp_path, "strategy=ewc"), False) != fingerprint(base, False)
    assert fingerprint(run_config(tmp_path, "strategy=naive", "seed=3"), False) == fingerprint(base, False)
    assert fingerprint(run_config(tmp_path, "strategy=naive", "seed=3")) != fingerprint(base)
    params = {k: str(v) for k, v in flatten(asdict(base)).items()}
    assert fingerprint_params(params) == fingerprint(base, with_seed=False)


def test_a_run_logs_its_own_families_keys_only(tmp_path):
    """An MLP run logs the MLP's keys, not the spiking nets'; a non-federated run no federated.* keys."""
    from helpers import run_config

    from clbench.fingerprint import run_params

    mlp = run_params(run_config(tmp_path, "strategy=naive"))
    assert "model.hidden" in mlp and "model.dropout" in mlp
    assert not {"model.tau", "model.channels", "model.width", "model.time_steps"} & set(mlp)
    assert not any(k.startswith("federated.") for k in mlp)
    snn = run_params(run_config(tmp_path, "strategy=naive", "model=snn_cnn"))
    assert {"model.tau", "model.channels", "model.bn_running_stats"} <= set(snn) and "model.hidden" not in snn
    fot = run_params(run_config(tmp_path, "strategy=fot", "benchmark=permuted_digits"))
    assert "federated.clients" in fot


def test_a_method_is_named_once():
    """The registration names a strategy; no strategy or model yaml repeats it, yet the composed config has it."""
    from helpers import CONF
    from hydra import compose, initialize_config_dir

    for group in ("strategy", "model", "benchmark"):
        for path in (Path(CONF) / group).glob("*.yaml"):
            assert not any(line.startswith("name:") for line in path.read_text().splitlines()), path
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = load(compose(config_name="config", overrides=["strategy=rogo", "model=resnet18"]))
    assert (cfg.strategy.name, cfg.model.name) == ("rogo", "resnet18")


def test_a_key_of_another_family_is_refused_naming_the_valid_ones(tmp_path):
    from helpers import run_config

    with pytest.raises(ConfigError, match=r"unknown config key 'model.tau'.*'hidden'"):
        run_config(tmp_path, "+model.tau=2.0")


def test_one_number_for_a_per_layer_list_means_every_layer(tmp_path):
    """``strategy.threshold=0.97`` (gpm.yaml: "one value: all layers") is that one-element list, not a type error."""
    from helpers import run_config

    assert run_config(tmp_path, "strategy=gpm", "strategy.threshold=0.97").strategy.threshold == [0.97]
    assert run_config(tmp_path, "strategy=gpm", "strategy.samples=100").strategy.samples == [100]
    with pytest.raises(ConfigError, match=r"'strategy.threshold'.*\(0, 1\]"):
        run_config(tmp_path, "strategy=gpm", "strategy.threshold=1.5")


def test_an_entry_of_a_dict_valued_key_changes_the_config_key(tmp_path):
    """``engine.optimizer_args`` is a dict: its entries are flattened below it and still count in the key."""
    from helpers import run_config

    from clbench.fingerprint import fingerprint

    base = fingerprint(run_config(tmp_path, "strategy=naive"), False)
    assert fingerprint(run_config(tmp_path, "strategy=naive", "+engine.optimizer_args.eps=1e-6"), False) != base
    assert fingerprint(run_config(tmp_path, "strategy=naive", "engine.warmup_steps=0"), False) == base
