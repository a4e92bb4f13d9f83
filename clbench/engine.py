"""The inner training loop: one experience, on Lightning Fabric (DESIGN.md: Fabric drives the loop).

Per micro-batch: loss = strategy.objective(batch) (default: model.loss(batch)) [+ strategy.penalty]; Fabric
backward of loss / accumulate. Per optimizer step (every ``engine.accumulate`` micro-batches): strategy.project →
clip the gradient norm → warm-up learning rate → optimizer step (OGPSA's official order: projection before
clipping, both before the step). The validation loss stays the model's loss.
Per epoch: the validation loss (when the stream has a validation split), the schedule's rule
(:mod:`clbench.schedule`), ``strategy.after_epoch``, then the caller's ``on_epoch_end`` (logging, checkpoint).
On several devices (:mod:`clbench.distributed`) each rank trains on its slice of every global batch and the
epoch's loss is averaged over the ranks. Nothing is logged per step: the loss is summed on the device and read
once per epoch; a non-finite epoch loss (NaN or ±inf: the run diverged) stops the run there with a
:class:`DivergenceError` (no extra device sync).

The same services train an extra stage of a strategy (an OOD detector, a DPO pass: :meth:`Engine.stage`), which
it reaches through ``ctx.trainer`` (:class:`clbench.context.Trainer`) instead of copying this loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from clbench.config import OPTIMIZER_ALIASES
from clbench.distributed import shard
from clbench.schedule import Schedule
from clbench.streams.batches import batch_len

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from clbench.config import EngineConfig
    from clbench.context import Context, EpochCallback
    from clbench.models.base import Batch
    from clbench.streams import BatchSource
    from strategies.base import Strategy

_SHUFFLE_KEY = 1  # stream of randomness for the batch order
_VALID_KEY = 2  # order of the validation batches (see Context.eval_order)
_STAGE_KEY = 5  # batch order of a strategy's extra stage
_PLAIN_PRECISION = ("32-true", "32")  # Fabric's wrappers are identities at these

LossFn = Callable[["Batch"], torch.Tensor]


class DivergenceError(RuntimeError):
    """Training gave a non-finite mean loss (NaN or ±inf) over an epoch: the run diverged.

    Attributes:
        loss: the epoch's mean loss.
        where: the epoch, e.g. ``experience 2/3, epoch 1/2``.
        lr: the learning rate the epoch trained at.
        lr_key: the config key that sets it (``engine.lr``, ``engine.first_lr``).
    """

    def __init__(self, loss: float, where: str, lr: float, lr_key: str) -> None:
        super().__init__(f"training diverged in {where}: the epoch's mean loss is {loss}; likely cause: the learning "
                         f"rate {lr:g} ({lr_key}) is too high; lower it or set engine.clip_norm")
        self.loss, self.where, self.lr, self.lr_key = loss, where, lr, lr_key

    def __reduce__(self) -> tuple[type, tuple[float, str, float, str]]:  # sent from a rank to its parent
        return type(self), (self.loss, self.where, self.lr, self.lr_key)


def epoch_place(ctx: Context, epoch: int, epochs: int) -> str:
    """``experience i/T, epoch e/E`` (1-based) of epoch ``epoch`` of ``ctx.experience``, for messages."""
    spec = getattr(ctx.stream, "spec", None)
    total = f"/{spec.n_tasks}" if spec is not None else ""
    return f"experience {ctx.experience + 1}{total}, epoch {epoch + 1}/{epochs}"


class Engine:
    """Builds each experience's optimizer and runs its epochs (and the extra stages strategies ask for)."""

    def __init__(self, cfg: EngineConfig, fabric: Fabric) -> None:
        self.cfg = cfg
        self.fabric = fabric

    def optimizer(self, params: Iterable[torch.nn.Parameter], experience: int,
                  lr: float | None = None) -> torch.optim.Optimizer:
        """A fresh ``engine.optimizer`` (GPM's code builds one per task; ``first_optimizer`` for the first experience
        when set) over ``params``, at ``lr`` (None: the experience's, ``first_lr`` for the first one when set), with
        ``weight_decay``, SGD's ``momentum`` and ``optimizer_args``."""
        cfg = self.cfg
        if lr is None:
            lr = cfg.first_lr if experience == 0 and cfg.first_lr is not None else cfg.lr
        kind = cfg.first_optimizer if experience == 0 and cfg.first_optimizer is not None else cfg.optimizer
        name = OPTIMIZER_ALIASES.get(kind.lower(), kind)
        kwargs = {"lr": lr, "weight_decay": cfg.weight_decay} | ({"momentum": cfg.momentum} if name == "SGD" else {})
        opt = getattr(torch.optim, name)(list(params), **(kwargs | dict(cfg.optimizer_args)))
        return self.fabric.setup_optimizers(opt)

    def schedule(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> Schedule:
        """The learning-rate schedule of an experience trained with ``optimizer``."""
        inner = getattr(optimizer, "optimizer", optimizer)
        cfg = self.cfg
        return Schedule(cfg.schedule, inner, module, cfg.lr_min, cfg.patience, cfg.lr_factor, warmup=cfg.warmup_epochs,
                        t_max=cfg.epochs if cfg.t_max is None else cfg.t_max)

    def _plain(self) -> bool:
        """Full precision on one device: Fabric's wrappers would only add Python work (the module wrapper walks
        the batch and the output to convert dtypes that are already right), about 100 µs a step at batch 10
        (benchmarks/loop.py), so the loop calls the module, ``backward`` and the optimizer directly. With mixed
        precision or several devices every call goes through Fabric, which then does real work (autocast,
        gradient scaling, collectives)."""
        return self.fabric.world_size == 1 and str(self.cfg.precision) in _PLAIN_PRECISION

    def fit(self, ctx: Context, strategy: Strategy, start_epoch: int, on_epoch_end: EpochCallback) -> None:
        """Train ``ctx.model`` on the strategy's training source from ``start_epoch`` to ``cfg.epochs`` (or until
        ``ctx.schedule`` stops), then restore the schedule's best weights."""
        optimizer, schedule = ctx.optimizer, ctx.schedule
        assert optimizer is not None and schedule is not None
        source = strategy.train_source(ctx)
        if len(source) == 0:
            raise ValueError(f"experience {ctx.experience} has no training samples")
        model_loss: LossFn = ctx.module.loss if self._plain() else ctx.model.loss
        loss_fn = model_loss
        if strategy.overrides("objective"):  # e.g. an unlearning method's loss on the forget set

            def loss_fn(batch: Batch) -> torch.Tensor:
                return strategy.objective(ctx, batch, model_loss)

        if strategy.overrides("penalty"):
            objective = loss_fn

            def loss_fn(batch: Batch) -> torch.Tensor:
                loss = objective(batch)
                extra = strategy.penalty(ctx, batch)
                return loss if extra is None else loss + extra

        project = (lambda: strategy.project(ctx)) if strategy.overrides("project") else None
        ctx.model.train()
        for epoch in range(start_epoch, self.cfg.epochs):
            if schedule.stopped:
                break
            ctx.epoch = epoch
            batches = source.batches(self.cfg.batch_size, shuffle=True, generator=ctx.generator(_SHUFFLE_KEY, epoch))
            loss = self._epoch(ctx, batches, loss_fn, optimizer, schedule.lr, project)  # raises if not finite
            report = schedule.step(epoch, loss, self.validation_loss(ctx))
            if strategy.overrides("after_epoch") and not report.stop:
                strategy.after_epoch(ctx, report)
            extra = {"lr": schedule.lr} | ({} if report.valid_loss is None else {"valid_loss": report.valid_loss})
            on_epoch_end(epoch, report.loss, extra)
        schedule.restore_best()

    def _epoch(self, ctx: Context, batches: Iterator[Batch], loss_fn: LossFn, optimizer: torch.optim.Optimizer,
               lr: float, project: Callable[[], None] | None, stage: tuple[int, int] | None = None) -> float:
        """One epoch of optimizer steps over ``batches``; the mean loss of its micro-batches. ``ctx.step`` counts
        the experience's optimizer steps (the warm-up's clock). ``stage``: (epoch, epochs) of a strategy's extra
        stage, for the message of a :class:`DivergenceError` (None: epoch ``ctx.epoch`` of ``engine.epochs``)."""
        cfg, fabric = self.cfg, self.fabric
        if fabric.world_size > 1:  # this rank's slice of each global batch, its loss weighted to the global mean
            batches, loss_fn = shard(batches, loss_fn, fabric.global_rank, fabric.world_size)
        inner = getattr(optimizer, "optimizer", optimizer)
        plain = self._plain()
        backward = torch.Tensor.backward if plain else fabric.backward
        step = inner.step if plain else optimizer.step
        accumulate, warmup, clip = cfg.accumulate, cfg.warmup_steps, cfg.clip_norm
        params = [p for g in inner.param_groups for p in g["params"]]
        total = torch.zeros((), device=fabric.device)
        micro = 0
        if accumulate == 1 and not warmup and clip is None:  # the hot path of the vision runs: nothing else
            for batch in batches:
                inner.zero_grad(set_to_none=True)
                loss = loss_fn(batch)
                backward(loss)
                if project is not None:
                    project()
                step()
                total += loss.detach()
                micro += 1
            ctx.step += micro
            return self._mean(ctx, total, micro, lr, stage)
        inner.zero_grad(set_to_none=True)
        pending = 0
        for batch in batches:
            loss = loss_fn(batch)
            backward(loss / accumulate if accumulate > 1 else loss)
            total += loss.detach()
            micro += 1
            pending += 1
            if pending == accumulate:
                self._step(ctx, inner, step, params, lr, project)
                pending = 0
        if pending:  # a last, partial group (its gradient is divided by accumulate too, as Hugging Face's)
            self._step(ctx, inner, step, params, lr, project)
        return self._mean(ctx, total, micro, lr, stage)

    def _mean(self, ctx: Context, total: torch.Tensor, micro: int, lr: float, stage: tuple[int, int] | None) -> float:
        """The epoch's mean micro-batch loss ``total / micro``, read from the device once.

        Raises:
            DivergenceError: the mean is NaN or ±inf; it names the experience, the epoch and the learning rate.
        """
        if self.fabric.world_size > 1:  # the mean over ranks: every rank sees the same loss, and stops alike
            total = self.fabric.all_reduce(total, reduce_op="mean")
        mean = float(total) / max(micro, 1)
        if math.isfinite(mean):
            return mean
        if stage is not None:
            where = epoch_place(ctx, *stage) + " of a strategy's extra stage"
            raise DivergenceError(mean, where, lr, "a strategy.* key of the stage")
        first = ctx.experience == 0 and self.cfg.first_lr is not None
        raise DivergenceError(mean, epoch_place(ctx, ctx.epoch, self.cfg.epochs), lr,
                              "engine.first_lr" if first else "engine.lr")

    def _step(self, ctx: Context, inner: torch.optim.Optimizer, step: Callable[[], object],
              params: list[torch.nn.Parameter], lr: float, project: Callable[[], None] | None) -> None:
        """project → clip → warm-up lr → optimizer step → zero the gradients."""
        cfg = self.cfg
        if project is not None:
            project()
        if cfg.clip_norm is not None:
            if self._plain():
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            else:
                self.fabric.clip_gradients(ctx.model, ctx.optimizer, max_norm=cfg.clip_norm)
        if cfg.warmup_steps:
            factor = min(1.0, ctx.step / cfg.warmup_steps)
            for group in inner.param_groups:
                group["lr"] = lr * factor
        step()
        inner.zero_grad(set_to_none=True)
        ctx.step += 1

    def stage(self, ctx: Context, loss_fn: LossFn, params: Iterable[torch.nn.Parameter], source: BatchSource,
              epochs: int, lr: float, batch_size: int | None = None, key: int = 0,
              on_epoch_end: Callable[[int, float], None] | None = None) -> list[float]:
        """Train ``params`` on ``loss_fn`` over ``source`` for ``epochs`` with a fresh optimizer of the engine's
        kind at ``lr`` and the engine's accumulation, clipping and warm-up (its own step clock): a strategy's
        extra stage. The batch order is seeded from (seed, experience, key, epoch). ``on_epoch_end(epoch, loss)``
        runs after each epoch (e.g. a checkpoint selection). Returns each epoch's mean loss. ``ctx.step`` is left
        as it was."""
        optimizer = self.optimizer(params, ctx.experience, lr=lr)
        saved_step, ctx.step = ctx.step, 0
        losses = []
        try:
            for epoch in range(epochs):
                order = ctx.generator(_STAGE_KEY, key, epoch)
                batches = source.batches(batch_size or self.cfg.batch_size, shuffle=True, generator=order)
                losses.append(self._epoch(ctx, batches, loss_fn, optimizer, lr, None, stage=(epoch, epochs)))
                if on_epoch_end is not None:
                    on_epoch_end(epoch, losses[-1])
        finally:
            ctx.step = saved_step
        return losses

    @torch.no_grad()
    def validation_loss(self, ctx: Context) -> float | None:
        """Mean loss over the experience's validation split in eval mode, in batches of ``ctx.eval_batch_size``
        (None without a split)."""
        if ctx.valid_source is None:
            return None
        ctx.model.eval()
        total, n = torch.zeros((), device=ctx.device), 0
        order = ctx.eval_order(_VALID_KEY, ctx.experience)
        for batch in ctx.valid_source.batches(ctx.eval_batch_size, shuffle=True, generator=order):
            size = batch_len(batch)
            total += ctx.model.loss(batch) * size
            n += size
        ctx.model.train()
        return float(total) / n
