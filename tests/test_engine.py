"""The engine's services: optimizer by name, warm-up, accumulation, clipping after projection, extra stages;
and a resumed run that re-creates what a strategy added to the model before the weights load."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import gen, interrupt_in_task, killed_and_resumed, run_config
from lightning.fabric import Fabric
from torch import nn

import clbench.engine
from clbench.config import EngineConfig, StrategyConfig
from clbench.context import Context
from clbench.engine import Engine
from clbench.experiment import run
from clbench.streams.batches import TensorBatchSource
from strategies import register
from strategies.base import Strategy


class _Linear(nn.Module):
    """y = w·x, loss = mean (y − target)²: gradients known in closed form."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d))

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return ((x @ self.w - y) ** 2).mean()


def _ctx(module: nn.Module, source: TensorBatchSource, fabric: Fabric) -> Context:
    return Context(model=module, module=module, fabric=fabric, stream=None, seed=0, batch_size=4,  # type: ignore[arg-type]
                   sources=None, train_source=source)


def _fit(cfg: EngineConfig, strategy: Strategy, n: int = 16, d: int = 5) -> tuple[_Linear, Context, list[float]]:
    torch.manual_seed(0)
    x, y = torch.randn(n, d, generator=gen(1)), torch.randn(n, generator=gen(2))
    fabric = Fabric(accelerator="cpu", devices=1, precision=cfg.precision)  # type: ignore[arg-type]
    module = _Linear(d)
    ctx = _ctx(module, TensorBatchSource(x, y, torch.zeros(n, dtype=torch.long)), fabric)
    engine = Engine(cfg, fabric)
    ctx.optimizer = engine.optimizer(module.parameters(), 0)
    ctx.schedule = engine.schedule(ctx.optimizer, module)
    losses: list[float] = []
    engine.fit(ctx, strategy, 0, lambda epoch, loss, extra=None: losses.append(loss))
    return module, ctx, losses


class _Scale(Strategy):
    """Multiplies every gradient by 10 in ``project`` and records the norm it leaves."""

    def __init__(self) -> None:
        super().__init__(StrategyConfig())
        self.seen: list[float] = []

    def project(self, ctx: Context) -> None:
        for p in ctx.module.parameters():
            p.grad.mul_(10.0)
        self.seen.append(float(torch.cat([p.grad.flatten() for p in ctx.module.parameters()]).norm()))


def test_step_order_is_project_then_clip_then_step():
    """The clip sees the projected gradient (OGPSA's order): the step is exactly clip_norm · lr long, although
    the projected gradient is far longer; clipping first would have let project() scale it back up."""
    cfg = EngineConfig(epochs=1, batch_size=16, lr=1.0, clip_norm=0.5)
    strategy = _Scale()
    module, _, _ = _fit(cfg, strategy)
    assert strategy.seen[0] > 10 * 0.5
    assert float(module.w.detach().norm()) == pytest.approx(0.5 * 1.0, rel=1e-6)


def test_accumulation_equals_one_larger_batch():
    big, ctx_big, _ = _fit(EngineConfig(epochs=2, batch_size=8, lr=0.1), Strategy(StrategyConfig()))
    acc, ctx_acc, _ = _fit(EngineConfig(epochs=2, batch_size=4, accumulate=2, lr=0.1), Strategy(StrategyConfig()))
    torch.testing.assert_close(acc.w.detach(), big.w.detach(), rtol=1e-6, atol=1e-7)
    assert ctx_big.step == ctx_acc.step == 4  # optimizer steps, not micro-batches


def test_a_partial_last_group_still_steps():
    _, ctx, _ = _fit(EngineConfig(epochs=1, batch_size=4, accumulate=3, lr=0.1), Strategy(StrategyConfig()))
    assert ctx.step == 2  # 4 micro-batches: a group of 3, then one of 1


def test_linear_warmup_scales_each_step(monkeypatch):
    """Step s (from 0) of an experience uses lr · min(1, s / warmup_steps), as Hugging Face's linear warm-up."""
    lrs: list[float] = []
    original = torch.optim.SGD.step

    def spy(self: torch.optim.SGD, *args: Any, **kwargs: Any) -> Any:
        lrs.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    _fit(EngineConfig(epochs=2, batch_size=4, lr=0.2, warmup_steps=4), Strategy(StrategyConfig()))
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2, 0.2])


@pytest.mark.parametrize(("name", "cls"), [("adamw", torch.optim.AdamW), ("RMSprop", torch.optim.RMSprop),
                                           ("sgd", torch.optim.SGD)])
def test_optimizer_by_name_with_its_arguments(name, cls):
    fabric = Fabric(accelerator="cpu", devices=1)
    cfg = EngineConfig(optimizer=name, weight_decay=0.01, optimizer_args={"eps": 1e-5} if name != "sgd" else {})
    opt = Engine(cfg, fabric).optimizer([nn.Parameter(torch.zeros(2))], 0)
    inner = getattr(opt, "optimizer", opt)
    assert type(inner) is cls and inner.param_groups[0]["weight_decay"] == 0.01
    if name != "sgd":
        assert inner.param_groups[0]["eps"] == 1e-5


def test_stage_trains_its_own_parameters_and_keeps_the_step_clock():
    torch.manual_seed(0)
    fabric = Fabric(accelerator="cpu", devices=1)
    x = torch.randn(32, 3, generator=gen(3))
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    head = _Linear(3)
    ctx = _ctx(head, TensorBatchSource(x, y), fabric)
    ctx.step = 7
    losses = Engine(EngineConfig(batch_size=8), fabric).stage(ctx, head.loss, head.parameters(),
                                                              TensorBatchSource(x, y), epochs=20, lr=0.1)
    assert len(losses) == 20 and losses[-1] < 0.01 * losses[0]
    assert ctx.step == 7


# --------------------------------------------------------------------- structure created during a run


@dataclass
class _AdapterConfig(StrategyConfig):
    """A test strategy: one extra trainable bias on the MLP's output per task (stands for a LoRA adapter)."""


@register("_test_adapters")
class _Adapters(Strategy):
    """Adds ``adapter_<t>`` (a bias added to the logits) at the start of task t and trains only it after task
    0; its state is the number of adapters, which :meth:`rebuild` re-creates on resume."""

    config_class = _AdapterConfig

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.count = 0
        self._hook: Any = None

    def _add(self, ctx: Context) -> None:
        out = ctx.module.head.out_features
        ctx.module.register_parameter(f"adapter_{self.count}", nn.Parameter(torch.zeros(out, device=ctx.device)))
        self.count += 1

    def before_experience(self, ctx: Context) -> None:
        self._add(ctx)

    def attach(self, ctx: Context) -> None:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            return out + sum(getattr(ctx.module, f"adapter_{i}") for i in range(self.count))

        self._hook = ctx.module.head.register_forward_hook(hook)

    def detach(self, ctx: Context) -> None:
        self._hook.remove()

    def parameters_to_train(self, ctx: Context):
        return iter([getattr(ctx.module, f"adapter_{self.count - 1}")] if ctx.experience else ctx.module.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = 0
        self._target = state["count"]

    def rebuild(self, ctx: Context) -> None:
        while self.count < self._target:
            self._add(ctx)


def test_resume_re_creates_adapters_before_the_weights_load(tmp_path, monkeypatch):
    """Killed inside task 2 with two adapters in the model, the resumed run re-creates them from the strategy's
    state, then loads the weights: the same R as an uninterrupted run (to 1e-6), in the same MLflow run."""
    base = run_config(tmp_path, "strategy=naive", "benchmark=permuted_digits", "benchmark.n_tasks=3",
                      "engine.epochs=2", "engine.lr=0.05")
    cfg = dataclasses.replace(base, strategy=_AdapterConfig(name="_test_adapters"))
    whole, resumed = killed_and_resumed(cfg, monkeypatch)
    assert whole.run_id != resumed.run_id
    torch.testing.assert_close(torch.tensor(resumed.R), torch.tensor(whole.R), atol=1e-6, rtol=0)


def test_without_rebuild_the_saved_adapters_cannot_load(tmp_path, monkeypatch):
    """The guard of the test above: a strategy that forgets to re-create its adapters fails to resume."""
    base = run_config(tmp_path, "strategy=naive", "benchmark=permuted_digits", "benchmark.n_tasks=2",
                      "engine.epochs=2")
    cfg = dataclasses.replace(base, strategy=_AdapterConfig(name="_test_adapters"))
    monkeypatch.setattr(clbench.engine.Engine, "fit", interrupt_in_task(1, 0))
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.undo()
    monkeypatch.setattr(_Adapters, "rebuild", lambda self, ctx: None)
    with pytest.raises(RuntimeError, match="adapter_0"):
        run(dataclasses.replace(cfg, resume=True))
