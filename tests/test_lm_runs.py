"""Language models on the one loop, end to end: naive sequential fine-tuning of a LoRA (or of all weights) on a
text stream gives R of exact match, the headline scores, the other scores' matrices, MLflow keys and artifacts;
a run killed inside task 2 resumes into the same MLflow run with the same R; a sweep of two LM configs is one
report table."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from helpers import killed_and_resumed, run_config
from torch import nn

from clbench.config import ConfigError
from clbench.experiment import run
from clbench.report import collect

pytest.importorskip("peft")

FAST = ("model=causal_lm", "benchmark=keyword_topics", "benchmark.n_tasks=3", "benchmark.per_class=16",
        "benchmark.max_test_per_task=12", "engine=lm", "engine.epochs=2", "engine.lr=0.01", "engine.eval_batch_size=16",
        "model.max_new_tokens=4", "model.max_length=96")


def test_naive_lora_on_a_text_stream_end_to_end(tmp_path):
    cfg = run_config(tmp_path, "strategy=naive", *FAST)
    result = run(cfg)
    R = result.R
    assert R.shape == (3, 3) and np.isfinite(R).all() and ((R >= 0) & (R <= 100)).all()
    assert set(result.others) == {"loss", "probability", "rouge_l"} and result.others["loss"].shape == (3, 3)
    assert np.isfinite(result.others["loss"]).all()
    client = mlflow.tracking.MlflowClient(cfg.tracking.uri)
    data = client.get_run(result.run_id).data
    assert {"acc", "bwt", "fwt", "forgetting", "acc_exp", "loss_exp", "loss_task/0", "acc_task/2"} <= set(data.metrics)
    assert data.params["model.name"] == "causal_lm" and data.params["model.adapter"] == "lora"
    assert "model.hidden" not in data.params and not any(k.startswith("federated.") for k in data.params)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"accuracy_matrix.csv", "loss_matrix.csv", "accuracy_matrix.png", "config.yaml"} <= artifacts
    # only the LoRA parameters trained: the loss of the first task's test set moved after task 0
    assert result.others["loss"][0, 0] < result.others["loss"][2, 0] + 5.0


def test_full_fine_tuning_learns_each_task_and_forgets(tmp_path):
    """Sequential full fine-tuning of the tiny LM learns each keyword task as it comes (measured: exact match 100
    on the task just trained, where guessing a label word gives 25-50) and forgets the earlier ones (measured: 0
    after the last task)."""
    cfg = run_config(tmp_path, "strategy=naive", *FAST, "model.adapter=none", "benchmark.per_class=40",
                     "engine.epochs=6", "engine.lr=0.003")
    R = run(cfg).R
    assert np.diag(R).mean() >= 90.0
    assert R[-1, 0] <= R[0, 0] - 50.0 and R[-1, 1] <= R[1, 1] - 50.0


def test_lora_run_killed_inside_task_2_resumes_to_the_same_matrix(tmp_path, monkeypatch):
    cfg = run_config(tmp_path, "strategy=naive", *FAST, "benchmark.n_tasks=2")
    whole, resumed = killed_and_resumed(cfg, monkeypatch)
    client = mlflow.tracking.MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [resumed.run_id]  # the killed run, continued: no second run
    torch.testing.assert_close(torch.tensor(resumed.R), torch.tensor(whole.R), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(resumed.others["loss"]), torch.tensor(whole.others["loss"]),
                               atol=1e-6, rtol=0)


def test_a_sweep_of_two_lm_configs_is_one_report_table(tmp_path):
    for adapter in ("lora", "none"):
        run(run_config(tmp_path, "strategy=naive", *FAST, "benchmark.n_tasks=2", "engine.epochs=1",
                       f"model.adapter={adapter}"))
    cfg = run_config(tmp_path, "strategy=naive")
    rows = collect(cfg.tracking.uri, cfg.tracking.experiment)
    assert len(rows) == 2 and {r.benchmark for r in rows} == {"keyword_topics"}
    assert len({r.config for r in rows}) == 2 and all(len(r.values["acc"]) == 1 for r in rows)


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["model=causal_lm"], r"model.name=causal_lm needs a text stream.*permuted_mnist_5k"),
    (["benchmark=keyword_topics"], r"model.name=mlp needs an image / tensor stream.*keyword_topics"),
    (["model=causal_lm", "benchmark=keyword_topics", "model.lora_r=0"], r"'model.lora_r'.*>= 1"),
    (["model=causal_lm", "benchmark=keyword_topics", "model.lora_alpha=-1"], r"'model.lora_alpha'.*> 0"),
    (["model=causal_lm", "benchmark=keyword_topics", "model.lora_targets=[nope]"], r"nope.*q_proj"),
])
def test_bad_lm_input_is_refused_before_training(tmp_path, overrides, pattern):
    with pytest.raises((ConfigError, ValueError), match=pattern):
        run(run_config(tmp_path, "strategy=naive", *overrides))


def test_long_samples_are_truncated_and_counted_or_refused_before_anything_is_logged(tmp_path):
    cfg = run_config(tmp_path, "strategy=naive", *FAST, "benchmark.n_tasks=1", "engine.epochs=1",
                     "model.max_length=24")
    result = run(cfg)
    data = mlflow.tracking.MlflowClient(cfg.tracking.uri).get_run(result.run_id).data
    assert data.metrics["data/truncated_samples"] > 0  # keyword prompts have ~60 tokens
    refuse = run_config(tmp_path / "refuse", "strategy=naive", *FAST, "model.max_length=24",
                        "model.truncation=refuse")
    with pytest.raises(ConfigError, match=r"longer than model.max_length=24"):
        run(refuse)
    assert not (tmp_path / "refuse" / "mlflow.db").exists() or not mlflow.tracking.MlflowClient(
        refuse.tracking.uri).search_experiments(filter_string="name = 'clbench'")


def test_an_empty_task_is_refused_naming_it(tmp_path):
    cfg = run_config(tmp_path, "strategy=naive", *FAST, "benchmark.validation_fraction=0.99")
    with pytest.raises(ConfigError, match=r"benchmark"):
        run(cfg)


def test_a_subspace_strategy_refuses_layers_it_cannot_read(tmp_path):
    from strategies.gpm import protected_layers

    class Recurrent(nn.Module):
        def protected_layers(self):
            return {"rnn": nn.LSTM(4, 4)}

    ctx = SimpleNamespace(module=Recurrent())
    with pytest.raises(ConfigError, match=r"strategy 'gpm' protects Linear and Conv2d layers.*rnn.*LSTM"):
        protected_layers(ctx, "gpm")


def test_gpm_on_lora_keeps_both_adapter_layers_off_the_old_inputs(tmp_path, monkeypatch):
    """GPM on the LoRA branch (lora_A and lora_B as its two linear layers): every gradient step of task 2 is
    orthogonal to the basis GPM kept of that layer's task-1 inputs (to 1e-5 of the gradient), the bases of lora_B
    live in the r-dim space of A's outputs, and padding never enters a basis."""
    from strategies.gpm import GPM

    watch: dict[str, Any] = {"on": False, "steps": 0}
    original_before, original_after = GPM.before_experience, GPM.after_experience
    original_step = torch.optim.SGD.step

    def before(self, ctx):
        original_before(self, ctx)
        if ctx.experience == 1:
            layers = ctx.module.protected_layers()
            watch.update(on=True, bases={n: b.clone() for n, b in self.bases.items()},
                         params={id(layers[n].weight): n for n in layers})

    def after(self, ctx):
        watch["on"] = False
        original_after(self, ctx)

    def step(self, *args, **kwargs):
        if watch["on"]:
            watch["steps"] += 1
            for group in self.param_groups:
                for p in group["params"]:
                    name = watch["params"].get(id(p))
                    M = watch["bases"].get(name)
                    if name is not None and p.grad is not None and M is not None and M.shape[1]:
                        g = p.grad.double()
                        assert float((g @ M.double()).norm()) <= 1e-5 * float(g.norm()) + 1e-12, name
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(GPM, "before_experience", before)
    monkeypatch.setattr(GPM, "after_experience", after)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    cfg = run_config(tmp_path, "strategy=gpm", "strategy.threshold=[0.9]", *FAST, "benchmark.n_tasks=2",
                     "engine.optimizer=sgd", "engine.lr=0.5")
    run(cfg)
    bases = watch["bases"]
    assert {n.rsplit(".", 2)[-2] for n in bases} == {"lora_A", "lora_B"} and watch["steps"] > 0
    assert all(b.shape[0] == 8 for n, b in bases.items() if ".lora_B." in n)  # r = 8 inputs of B
    assert all(b.shape[1] > 0 for b in bases.values())


def test_layer_inputs_of_an_lm_hold_its_real_tokens_only():
    """The subspace core reads one column per real token of each protected layer's input: padding is left out
    (the model's input_positions), so a basis never holds pad embeddings."""
    from clbench.models.lm import LMConfig, build_lm
    from clbench.streams.text import TextSample
    from clbench.subspace import collect_layer_inputs

    model = build_lm(LMConfig(name="causal_lm")).eval()
    batch = model.collate([TextSample("short\nAnswer:", "a", 0), TextSample("a much longer prompt " * 4, "b", 0)])
    positions = model.input_positions(batch)
    assert positions is not None and not bool(positions.all())  # the short row is padded
    layers = model.protected_layers()
    with torch.no_grad():
        R = collect_layer_inputs(model, layers, lambda: model.outputs(batch), positions=positions)
    assert {r.shape[1] for r in R.values()} == {int(positions.sum())}
