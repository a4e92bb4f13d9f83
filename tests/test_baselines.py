"""The classic baselines run by Avalanche's own strategies inside clbench's loop (strategies/avalanche_baselines.py):
same metrics and MLflow layout as naive, the same loop as clbench's, exact resume, config errors."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_config

from clbench.config import ConfigError
from clbench.experiment import run

METHODS = ("ewc", "si", "lwf", "agem", "gem", "er")
# Tiny streams: multi-head (task-incremental, one head per task) and single-head (domain-incremental).
SPLIT = ("benchmark=split_digits", "benchmark.n_tasks=2", "engine.epochs=1", "engine.lr=0.05")
PERMUTED = ("benchmark=permuted_digits", "benchmark.n_tasks=2", "benchmark.max_train_per_task=500",
            "engine.epochs=2", "engine.lr=0.1")
# Small memories and a reference batch that fit the tiny streams.
SMALL_MEMORY = {"agem": ("strategy.patterns_per_exp=50", "strategy.sample_size=32"),
                "gem": ("strategy.patterns_per_exp=32",), "er": ("strategy.patterns_per_exp=50",)}


def _mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("clbench").experiment_id])
    return client, runs


@pytest.fixture(scope="module")
def naive_keys(tmp_path_factory):
    """The metric keys clbench's naive logs on the same tiny stream."""
    tmp = tmp_path_factory.mktemp("naive")
    run(run_config(tmp, "strategy=naive", *SPLIT))
    return set(_mlflow(tmp)[1][0].data.metrics)


# Every method on the multi-head stream (mixed-task batches through the MultiTaskModule); on the single-head one
# only where the path differs (LwF's distillation, the memory loaders), the rest is slow: the resume and SI tests
# below run EWC, ER and SI on single-head streams anyway.
CASES = [*(pytest.param(m, SPLIT, id=f"{m}-multi_head") for m in METHODS),
         *(pytest.param(m, PERMUTED, id=f"{m}-single_head") for m in ("lwf", "agem", "gem")),
         *(pytest.param(m, PERMUTED, id=f"{m}-single_head", marks=pytest.mark.slow) for m in ("ewc", "si", "er"))]


@pytest.mark.parametrize(("method", "stream"), CASES)
def test_baseline_runs_and_logs_what_naive_logs(tmp_path, capsys, naive_keys, method, stream):
    cfg = run_config(tmp_path, f"strategy={method}", *stream, *SMALL_MEMORY.get(method, ()))
    res = run(cfg)
    client, runs = _mlflow(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    keys = set(runs[0].data.metrics)
    assert naive_keys <= keys, naive_keys - keys
    assert {"acc", "bwt", "fwt", "forgetting", "acc_exp", "bwt_exp", "acc_task/0", "acc_task/1", "loss"} <= keys
    loss = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in loss] == list(range(2 * cfg.engine.epochs))  # one per epoch, as the engine logs
    assert all(np.isfinite(m.value) for m in loss)
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "acc_exp")] == [0, 1]
    assert np.isfinite(res.R).all() and np.diag(res.R).min() > 30.0  # it learnt (chance: 20 % / 10 %)
    if method in SMALL_MEMORY:
        assert runs[0].data.metrics["memory/samples"] > 0
    assert ">> Start of training phase" not in capsys.readouterr().out  # Avalanche's own logger stays silent


def test_avalanche_naive_equals_naive_with_full_batches(tmp_path):
    """Avalanche's Naive through the adapter and clbench's naive are the same computation. With one batch per
    epoch the batch order (the only thing the two loops draw differently) cannot matter, so R must agree: measured
    identical (max |ΔR| = 0.0) on split digits (multi-head, the MultiTaskModule path) and on 3 permuted digits
    tasks (single head), 10 epochs at lr 0.2. Allowed: one test sample (0.56 % here)."""
    args = ("benchmark=split_digits", "benchmark.n_tasks=2", "engine.epochs=10", "engine.lr=0.2",
            "engine.batch_size=4096")
    R = {s: run(run_config(tmp_path / s, f"strategy={s}", *args)).R for s in ("naive", "avalanche_naive")}
    assert R["naive"][-1].min() > 30.0  # it learnt something
    np.testing.assert_allclose(R["avalanche_naive"], R["naive"], atol=0.6)


@pytest.mark.slow
def test_avalanche_naive_matches_naive_within_seed_noise(tmp_path):
    """With mini-batches the two loops shuffle differently, so they agree only within seed noise. Measured on
    split digits (2 tasks, 2 epochs, lr 0.05, batch 10), seeds 0-7: ACC naive 87.4 ± 2.1, Avalanche 85.5 ± 4.6;
    per-seed difference (Avalanche − clbench) −1.9 ± 4.7 (max |·| 10.6). On 2 permuted digits tasks, seeds 0-5:
    −2.3 ± 4.7 (max |·| 8.8). Neither mean is significant (< 2 standard errors), and with one batch per epoch
    the two are identical (test above). The mean over two seeds has a standard deviation of ~4.7/√2 = 3.3:
    assert 10 points (3 σ)."""
    args = ("benchmark=split_digits", "benchmark.n_tasks=2", "engine.epochs=2", "engine.lr=0.05")
    acc = {s: np.mean([run(run_config(tmp_path / f"{s}{seed}", f"strategy={s}", f"seed={seed}", *args)).scores["acc"]
                       for seed in (0, 1)]) for s in ("naive", "avalanche_naive")}
    assert abs(acc["avalanche_naive"] - acc["naive"]) < 10.0, acc


def test_si_acts_on_the_cpu(tmp_path):
    """Avalanche 0.6's SI snapshots weights as views of the live parameters on the CPU, so on its own it is plain
    fine-tuning there (identical R to Avalanche's Naive, measured); clbench's fix-up must make it differ."""
    R = {s: run(run_config(tmp_path / s, f"strategy={s}", *PERMUTED)).R for s in ("avalanche_naive", "si")}
    np.testing.assert_array_equal(R["si"][0], R["avalanche_naive"][0])  # the first experience has no penalty
    assert np.abs(R["si"][1] - R["avalanche_naive"][1]).max() > 0.0


def _interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt  # stands for a kill at this point


RESUME = {  # (stream, method keys); 3 experiences, killed before the third
    "ewc": (("benchmark=permuted_digits", "benchmark.n_tasks=3", "benchmark.max_train_per_task=300"), ()),
    "er": (("benchmark=permuted_digits", "benchmark.n_tasks=3", "benchmark.max_train_per_task=300"),
           ("strategy.patterns_per_exp=50",)),
    "si": (("benchmark=permuted_digits", "benchmark.n_tasks=3", "benchmark.max_train_per_task=300"), ()),
    "lwf": (("benchmark=split_digits", "benchmark.n_tasks=5"), ()),
    "agem": (("benchmark=split_digits", "benchmark.n_tasks=5"),
             ("strategy.patterns_per_exp=50", "strategy.sample_size=32")),
    "gem": (("benchmark=split_digits", "benchmark.n_tasks=5"), ("strategy.patterns_per_exp=32",)),
}


@pytest.mark.parametrize("method", [
    "ewc", "er", *(pytest.param(m, marks=pytest.mark.slow) for m in ("si", "lwf", "agem", "gem"))])
def test_resume_after_a_kill_between_experiences_repeats_the_run(tmp_path, monkeypatch, method):
    """Killed at the start of the third experience, resumed from the checkpoint of the second: the plugin's
    accumulated state (EWC's θ*/F, ER's reservoir, SI's Ω, LwF's teacher, A-GEM's/GEM's memories) comes back
    through ``state_dict`` and the resumed run repeats the uninterrupted one exactly."""
    import strategies.avalanche_baselines as ab

    stream, keys = RESUME[method]
    args = (f"strategy={method}", *stream, "engine.epochs=2", "engine.lr=0.05", *keys)
    full = run(run_config(tmp_path / "full", *args))

    cut = tmp_path / "cut"
    original = ab.AvalancheStrategy.train_experience

    def killed_at_third(self, ctx, on_epoch_end):
        if ctx.experience == 2:
            _interrupt()
        original(self, ctx, on_epoch_end)

    monkeypatch.setattr(ab.AvalancheStrategy, "train_experience", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        run(run_config(cut, *args))
    monkeypatch.undo()
    resumed = run(run_config(cut, *args, "resume=true"))
    _, runs = _mlflow(cut)
    assert [r.info.run_id for r in runs] == [resumed.run_id] and runs[0].info.status == "FINISHED"
    np.testing.assert_allclose(resumed.R, full.R, atol=1e-6)


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["strategy=ewc", "strategy.ewc_lambda=-1"], r"'strategy\.ewc_lambda'.*>= 0"),
    (["strategy=ewc", "strategy.mode=online"], r"'strategy\.decay_factor'.*\(0, 1\]"),
    (["strategy=ewc", "strategy.mode=fisher"], r"'strategy\.mode'.*\['separate', 'online'\]"),
    (["strategy=si", "strategy.eps=0"], r"'strategy\.eps'.*> 0"),
    (["strategy=lwf", "strategy.temperature=0"], r"'strategy\.temperature'.*> 0"),
    (["strategy=agem", "strategy.patterns_per_exp=0"], r"'strategy\.patterns_per_exp'.*>= 1"),
    (["strategy=gem", "strategy.memory_strength=-0.5"], r"'strategy\.memory_strength'.*>= 0"),
    (["strategy=er", "strategy.storage=fifo"], r"'strategy\.storage'.*\['reservoir', 'balanced'\]"),
    (["strategy=er", "strategy.batch_size_mem=0"], r"'strategy\.batch_size_mem'.*>= 1"),
    (["strategy=ewc", "engine.epochs=0"], r"'engine\.epochs'"),
    (["strategy=ewc", "+strategy.lambda=1"], r"unknown config key 'strategy\.lambda'.*'ewc_lambda'"),
])
def test_bad_hyper_parameter_is_a_config_error_naming_the_key(tmp_path, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        run_config(tmp_path, *overrides)


def test_what_only_the_stream_can_refuse_fails_before_anything_is_logged(tmp_path):
    """A-GEM's reference batch takes sample_size // (stored experiences) from each: 5 tasks need >= 4."""
    with pytest.raises(ConfigError, match=r"'strategy\.sample_size'.*>= 4"):
        run(run_config(tmp_path, "strategy=agem", "strategy.sample_size=3", "benchmark=split_digits",
                       "benchmark.n_tasks=5"))
    assert not (tmp_path / "mlflow.db").exists()


def test_the_engine_schedule_drives_the_avalanche_loop(tmp_path):
    """Under ``engine.schedule=plateau`` the Avalanche loop logs the validation loss and the learning rate per
    epoch and stops an experience once the rate falls below ``lr_min``, as the engine does (measured: 2 decays by
    10 from 0.5 cross lr_min = 0.01 within 8 of the 12 epochs)."""
    res = run(run_config(tmp_path, "strategy=avalanche_naive", "benchmark=permuted_digits", "benchmark.n_tasks=2",
                         "benchmark.validation_fraction=0.1", "engine.schedule=plateau", "engine.patience=1",
                         "engine.lr_factor=10", "engine.lr_min=1e-2", "engine.epochs=12", "engine.lr=0.5"))
    client, _ = _mlflow(tmp_path)
    history = {k: client.get_metric_history(res.run_id, k) for k in ("loss", "lr", "valid_loss")}
    assert len({m.step for m in history["valid_loss"]}) == len(history["loss"]) < 2 * 12  # stopped early
    assert min(m.value for m in history["lr"]) < 1e-2
    assert np.diag(res.R).min() > 50.0


def test_a_multi_head_batch_mixing_tasks_runs_the_trunk_once():
    """ER replays earlier tasks' samples into a batch: the Avalanche wrapper of a multi-head net gives each sample its
    own head's logits from one trunk pass over the whole batch (a task with one sample does not reach batch-norm
    alone, which fails in training)."""
    import torch

    from clbench.models.alexnet import AlexNet
    from strategies.avalanche_baselines import _multi_head_class

    torch.manual_seed(0)
    net = AlexNet((3, 32, 32), (2, 3), True, 5, bias=False)
    wrapped = _multi_head_class()(net)
    wrapped.max_class_label = 3
    x, t = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 0, 0, 0, 1])
    out = wrapped.train()(x, t)  # a task with one sample
    net.eval()
    with torch.no_grad():
        h = net.features(x)
        out = wrapped(x, t)
        torch.testing.assert_close(out[t == 0, :2], net.heads[0](h[t == 0]))
        torch.testing.assert_close(out[t == 1], net.heads[1](h[t == 1]))
        assert (out[t == 0, 2:] == 0).all()
