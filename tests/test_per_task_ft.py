"""PerTaskFT (an upper reference with task identity): one LoRA adapter per task, each task scored with its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import killed_and_resumed, run_config

from clbench.config import ConfigError
from clbench.experiment import run

FAST = ("strategy=per_task_ft", "model=causal_lm", "benchmark=keyword_topics", "benchmark.n_tasks=3",
        "benchmark.per_class=16", "benchmark.max_test_per_task=8", "engine=lm", "engine.epochs=2", "engine.lr=0.01",
        "engine.eval_batch_size=16", "model.max_new_tokens=4", "model.max_length=96")


def test_each_task_keeps_its_own_model_and_untrained_tasks_see_the_base_model(tmp_path):
    """Task j's scores never change once it is trained (BWT exactly 0, the loss too: its adapter is untouched and
    the only one active), a task not yet trained is scored with the base model (the same loss whatever was trained
    before), and training lowers each task's loss below the base model's."""
    result = run(run_config(tmp_path, *FAST))
    R, loss = result.R, result.others["loss"]
    for j in range(3):
        assert np.all(R[j:, j] == R[j, j]) and np.all(loss[j:, j] == loss[j, j])
    assert loss[0, 2] == loss[1, 2]
    assert all(loss[j, j] < loss[j - 1, j] for j in (1, 2))
    assert result.scores["bwt"] == 0.0


def test_per_task_ft_needs_lora(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy 'per_task_ft' keeps one model per task as one LoRA adapter per "
                                          r"task: it needs a language model with LoRA"):
        run(run_config(tmp_path, *FAST, "model.adapter=none"))


def test_per_task_ft_resumes_inside_task_2_with_its_adapters(tmp_path, monkeypatch):
    whole, resumed = killed_and_resumed(run_config(tmp_path, *FAST), monkeypatch, task=1)
    torch.testing.assert_close(torch.tensor(resumed.R), torch.tensor(whole.R), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(resumed.others["loss"]), torch.tensor(whole.others["loss"]),
                               atol=1e-6, rtol=0)
