"""The inner training loop: one experience, on Lightning Fabric (DESIGN.md: Fabric drives the loop).

Per batch: loss = model.loss(batch) [+ strategy.penalty]; Fabric backward; strategy.project; optimizer step.
Per epoch: the validation loss (when the stream has a validation split), the schedule's rule
(:mod:`clbench.schedule`), ``strategy.after_epoch``, then the caller's ``on_epoch_end`` (logging, checkpoint).
Nothing is logged per step: the loss is summed on the device and read once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import torch

from clbench.schedule import Schedule

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from clbench.config import EngineConfig
    from clbench.context import Context
    from strategies.base import Strategy

_SHUFFLE_KEY = 1  # stream of randomness for the batch order
_VALID_KEY = 2  # order of the validation batches (see Context.eval_order)
_PLAIN_PRECISION = ("32-true", "32")  # Fabric's wrappers are identities at these



class EpochCallback(Protocol):
    """``on_epoch_end(epoch, mean_training_loss, extra)``; ``extra`` holds other per-epoch scalars to log
    (``lr``, ``valid_loss``)."""

    def __call__(self, epoch: int, loss: float, extra: dict[str, float] | None = None) -> None: ...


class Engine:
    """Builds each experience's optimizer and runs its epochs."""

    def __init__(self, cfg: EngineConfig, fabric: Fabric) -> None:
        self.cfg = cfg
        self.fabric = fabric

    def optimizer(self, params: Iterable[torch.nn.Parameter], experience: int) -> torch.optim.Optimizer:
        """A fresh optimizer for ``experience`` (GPM's code builds one per task); the first experience
        uses ``first_lr`` when set."""
        lr = self.cfg.first_lr if experience == 0 and self.cfg.first_lr is not None else self.cfg.lr
        params = list(params)
        if self.cfg.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=self.cfg.momentum,
                                                         weight_decay=self.cfg.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=lr, weight_decay=self.cfg.weight_decay)
        return self.fabric.setup_optimizers(opt)

    def schedule(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> Schedule:
        """The learning-rate schedule of an experience trained with ``optimizer``."""
        inner = getattr(optimizer, "optimizer", optimizer)
        cfg = self.cfg
        return Schedule(cfg.schedule, inner, module, cfg.lr_min, cfg.patience, cfg.lr_factor, warmup=cfg.warmup_epochs,
                        t_max=cfg.epochs if cfg.t_max is None else cfg.t_max)

    def fit(self, ctx: Context, strategy: Strategy, start_epoch: int, on_epoch_end: EpochCallback) -> None:
        """Train ``ctx.model`` on the strategy's training source from ``start_epoch`` to ``cfg.epochs`` (or until
        ``ctx.schedule`` stops), then restore the schedule's best weights.

        Fast path: with full precision on one device, Fabric's wrappers only add Python work (the module
        wrapper walks the batch and the output to convert dtypes that are already right, and resolves
        attributes slowly), about 100 µs a step at batch 10 (benchmarks/loop.py), so the loop calls the module,
        ``loss.backward`` and the optimizer directly. With mixed precision or several devices every call goes
        through Fabric, which then does real work (autocast, gradient scaling, collectives).
        """
        model, optimizer, fabric, schedule = ctx.model, ctx.optimizer, self.fabric, ctx.schedule
        assert optimizer is not None and schedule is not None
        source = strategy.train_source(ctx)
        if len(source) == 0:
            raise ValueError(f"experience {ctx.experience} has no training samples")
        use_penalty, use_project = strategy.overrides("penalty"), strategy.overrides("project")
        use_after_epoch = strategy.overrides("after_epoch")
        inner = getattr(optimizer, "optimizer", optimizer)
        if fabric.world_size == 1 and str(self.cfg.precision) in _PLAIN_PRECISION:
            loss_fn, backward, step = ctx.module.loss, torch.Tensor.backward, inner.step
        else:
            loss_fn, backward, step = model.loss, fabric.backward, optimizer.step
        zero_grad = inner.zero_grad
        model.train()
        for epoch in range(start_epoch, self.cfg.epochs):
            if schedule.stopped:
                break
            ctx.epoch = epoch
            total = torch.zeros((), device=fabric.device)
            steps = 0
            order = ctx.generator(_SHUFFLE_KEY, epoch)
            for batch in source.batches(self.cfg.batch_size, shuffle=True, generator=order):
                zero_grad(set_to_none=True)
                loss = loss_fn(batch)
                if use_penalty:
                    extra = strategy.penalty(ctx, batch)
                    if extra is not None:
                        loss = loss + extra
                backward(loss)
                if use_project:
                    strategy.project(ctx)
                step()
                total += loss.detach()
                steps += 1
            report = schedule.step(epoch, float(total) / steps, validation_loss(ctx))
            if use_after_epoch and not report.stop:
                strategy.after_epoch(ctx, report)
            extra = {"lr": schedule.lr} | ({} if report.valid_loss is None else {"valid_loss": report.valid_loss})
            on_epoch_end(epoch, report.loss, extra)
        schedule.restore_best()


@torch.no_grad()
def validation_loss(ctx: Context) -> float | None:
    """Mean loss over the experience's validation split in eval mode, in batches of ``ctx.eval_batch_size``
    (None without a split). Shared by the engine and by strategies that own their loop."""
    if ctx.valid_source is None:
        return None
    ctx.model.eval()
    total, n = torch.zeros((), device=ctx.device), 0
    order = ctx.eval_order(_VALID_KEY, ctx.experience)
    for batch in ctx.valid_source.batches(ctx.eval_batch_size, shuffle=True, generator=order):
        total += ctx.model.loss(batch) * batch[1].shape[0]
        n += batch[1].shape[0]
    ctx.model.train()
    return float(total) / n
