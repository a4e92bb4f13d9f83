"""The patience schedule of GPM's code (HAT's rule), its early stop and best-weights restore."""

from __future__ import annotations

import pytest
import torch
from helpers import run_config

from clbench.config import ConfigError
from clbench.experiment import run
from clbench.schedule import Schedule


def _schedule(lr: float = 0.1, **kw) -> tuple[Schedule, torch.nn.Linear, torch.nn.Parameter]:
    module = torch.nn.Linear(2, 1, bias=False)
    extra = torch.nn.Parameter(torch.zeros(3))  # a trained tensor outside the module (e.g. ROGO's S)
    opt = torch.optim.SGD([{"params": module.parameters()}, {"params": [extra]}], lr=lr)
    args = {"lr_min": 0.01, "patience": 2, "factor": 3.0} | kw
    return Schedule("plateau", opt, module, **args), module, extra


def test_plateau_rule_decays_stops_and_restores_the_best_state():
    s, module, extra = _schedule()
    losses = [1.0, 0.5, 0.6, 0.7, 0.4, 0.9, 0.9, 0.9, 0.9]
    # after 0.4 (epoch 4): two bad epochs → lr 0.1/3/3 = 0.0111 (≥ 0.01, goes on); two more → 0.0037 < 0.01: stop
    expected = [  # (improved, decayed, stop, lr)
        (True, False, False, 0.1), (True, False, False, 0.1), (False, False, False, 0.1),
        (False, True, False, 0.1 / 3), (True, False, False, 0.1 / 3), (False, False, False, 0.1 / 3),
        (False, True, False, 0.1 / 9), (False, False, False, 0.1 / 9), (False, True, True, 0.1 / 27)]
    for epoch, (v, exp) in enumerate(zip(losses, expected, strict=True)):
        with torch.no_grad():
            module.weight.fill_(float(epoch))
            extra.fill_(-float(epoch))
        r = s.step(epoch, 0.0, v)
        assert (r.improved, r.decayed, r.stop) == exp[:3], epoch
        assert r.lr == pytest.approx(exp[3])
        if not r.stop:
            assert all(g["lr"] == pytest.approx(exp[3]) for g in s.optimizer.param_groups)
    assert s.stopped
    s.restore_best()  # epoch 4 had the best validation loss
    assert torch.equal(module.weight, torch.full((1, 2), 4.0))
    assert torch.equal(extra, torch.full((3,), -4.0))


def test_schedule_state_round_trips():
    s, _, _ = _schedule()
    for epoch, v in enumerate([1.0, 2.0, 2.0, 0.5]):
        s.step(epoch, 0.0, v)
    t, _, _ = _schedule()
    t.load_state_dict(s.state_dict())
    assert (t.lr, t.best_loss, t.wait, t.stopped) == (s.lr, s.best_loss, s.wait, s.stopped)
    assert t.optimizer.param_groups[1]["lr"] == pytest.approx(0.1 / 3)


def test_constant_schedule_never_changes_anything():
    module = torch.nn.Linear(2, 1)
    s = Schedule("constant", torch.optim.SGD(module.parameters(), lr=0.1), module, 0.01, 1, 2.0)
    for epoch in range(5):
        r = s.step(epoch, 1.0, float(epoch))
        assert (r.improved, r.decayed, r.stop, r.lr) == (False, False, False, 0.1)
    before = module.weight.detach().clone()
    s.restore_best()
    assert torch.equal(module.weight, before)


def test_plateau_needs_a_validation_split(tmp_path):
    with pytest.raises(ConfigError, match=r"engine\.schedule.*validation_fraction"):
        run_config(tmp_path, "engine.schedule=plateau")


def test_plateau_run_stops_early_and_logs_lr_and_validation_loss(tmp_path):
    """lr_min above the first decay: every experience stops at its first decay; the lr logged at that epoch is
    the decayed one, all others the initial one; the validation loss is logged every epoch."""
    import mlflow

    cfg = run_config(tmp_path, "strategy=gpm", "benchmark=permuted_digits", "benchmark.n_tasks=2",
                     "benchmark.validation_fraction=0.1", "engine.schedule=plateau", "engine.epochs=30",
                     "engine.patience=1", "engine.lr_min=0.03", "engine.lr=0.05")
    result = run(cfg)
    client = mlflow.tracking.MlflowClient(cfg.tracking.uri)
    lrs = client.get_metric_history(result.run_id, "lr")
    valid = client.get_metric_history(result.run_id, "valid_loss")
    assert len(lrs) == len(valid) < 2 * 30  # stopped early in both experiences
    values = [m.value for m in lrs]
    assert set(values) == {0.05, 0.025} and values.count(0.025) == 2  # the decay that stops each experience
    assert result.scores["acc"] > 50


def test_cosine_schedule_follows_the_hlop_code_lambda():
    """HLOP's LambdaLR: (e + 1)/W during W warm-up epochs, then ½(1 + cos(π (e − W)/(T_max − W)))."""
    import math

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    s = Schedule("cosine", opt, torch.nn.Linear(1, 1), 0.0, 1, 2.0, warmup=2, t_max=6)
    seen = [opt.param_groups[0]["lr"]]
    for epoch in range(6):
        seen.append(s.step(epoch, 1.0, None).lr)
    expected = [0.05, 0.1] + [0.05 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]  # epochs 0..6
    assert expected[-1] == pytest.approx(0.0, abs=1e-12)
    assert seen == pytest.approx(expected)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected[-1])
