"""Per-experience learning-rate schedules, usable by every strategy.

``constant``: the learning rate stays at its initial value for all ``engine.epochs`` (GPM's PMNIST protocol).

``plateau``: the patience schedule of HAT (Serra et al., 2018) that GPM's and ROGO's official code use on
CIFAR-100, 5-Datasets and miniImageNet (gpm.md §2, "LR schedule and early stopping"). After every epoch, with
the validation loss v:

    v < best:           best ← v, keep a copy of the trained state, wait ← patience
    otherwise:          wait ← wait − 1; at 0: lr ← lr / factor; stop if lr < lr_min, else wait ← patience

``cosine``: the warm-up + cosine rule of HLOP's official code (hlop.md "Hyper-parameters"): the lr of epoch e
(0-based) is lr₀·f(e) with W = ``warmup`` epochs and T_max:

    f(e) = (e + 1)/W                                  for e < W
    f(e) = ½ (1 + cos(π (e − W)/(T_max − W)))         otherwise

(the code's ``LambdaLR``; W = 5, T_max = 200 on CIFAR-100, W = 0, T_max = 100 on miniImageNet / 5-Datasets).

At the end of a ``plateau`` experience the best copy is restored, so the strategy's ``after_experience`` (GPM: the
representations) sees the best-validation weights. The "trained state" is the module's state dict plus every
tensor the optimizer trains outside the module (e.g. ROGO's mixing matrices).

Strategies see each epoch's :class:`EpochReport` and may change the learning rate with :meth:`Schedule.set_lr`
(ROGO halves or resets it after a successful subspace search).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SCHEDULES = ("constant", "plateau", "cosine")


@dataclass(frozen=True)
class EpochReport:
    """What happened at the end of an epoch.

    Attributes:
        epoch: the epoch index within the experience.
        loss: mean training loss of the epoch.
        valid_loss: mean validation loss (None without a validation split).
        improved: the validation loss reached a new best (always False under ``constant``).
        decayed: the plateau rule divided the learning rate at this epoch.
        stop: the learning rate fell below ``lr_min``: training of the experience ends here.
        lr: the learning rate for the next epoch.
    """

    epoch: int
    loss: float
    valid_loss: float | None
    improved: bool
    decayed: bool
    stop: bool
    lr: float


class Schedule:
    """The learning-rate state of one experience (see the module docstring)."""

    def __init__(self, kind: str, optimizer: torch.optim.Optimizer, module: torch.nn.Module, lr_min: float,
                 patience: int, factor: float, warmup: int = 0, t_max: int = 1) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"engine.schedule={kind!r} is invalid; valid: {list(SCHEDULES)}")
        self.kind = kind
        self.optimizer = optimizer
        self.module = module
        self.lr_min, self.patience, self.factor = lr_min, patience, factor
        self.initial_lr = self.lr = float(optimizer.param_groups[0]["lr"])
        self.best_loss = math.inf
        self.wait = patience
        self.stopped = False
        self.best: dict[str, Any] | None = None
        self.warmup, self.t_max = warmup, t_max
        if kind == "cosine":
            if not 0 <= warmup < t_max:
                raise ValueError(f"the cosine schedule needs 0 <= warmup < t_max, got {warmup}, {t_max}")
            self.set_lr(self.initial_lr * self.factor_at(0))

    def factor_at(self, epoch: int) -> float:
        """f(e) of the cosine rule (module docstring)."""
        if epoch < self.warmup:
            return (epoch + 1) / self.warmup
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - self.warmup) / (self.t_max - self.warmup)))

    def _extra(self) -> list[torch.Tensor]:
        """Trained tensors that live outside the module, in optimizer order."""
        inside = {id(p) for p in self.module.parameters()}
        return [p for g in self.optimizer.param_groups for p in g["params"] if id(p) not in inside]

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group (from the next step on)."""
        self.lr = float(lr)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self, epoch: int, loss: float, valid_loss: float | None) -> EpochReport:
        """Apply the rule to the epoch's validation loss and say what happened."""
        improved = decayed = False
        if self.kind == "plateau":
            assert valid_loss is not None, "the plateau schedule needs a validation split"
            if valid_loss < self.best_loss:
                improved, self.best_loss, self.wait = True, valid_loss, self.patience
                self.best = {"model": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
                             "extra": [p.detach().clone() for p in self._extra()]}
            else:
                self.wait -= 1
                if self.wait <= 0:
                    decayed = True
                    self.lr /= self.factor
                    if self.lr < self.lr_min:
                        self.stopped = True
                    else:
                        self.wait = self.patience
                        self.set_lr(self.lr)
        elif self.kind == "cosine":
            self.set_lr(self.initial_lr * self.factor_at(epoch + 1))
        return EpochReport(epoch, loss, valid_loss, improved, decayed, self.stopped, self.lr)

    @torch.no_grad()
    def restore_best(self) -> None:
        """Load the best-validation copy (no-op under ``constant`` or before any epoch)."""
        if self.best is None:
            return
        self.module.load_state_dict(self.best["model"])
        for p, saved in zip(self._extra(), self.best["extra"], strict=True):
            p.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "initial_lr": self.initial_lr, "best_loss": self.best_loss, "wait": self.wait,
                "stopped": self.stopped, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial_lr, self.best_loss = state["initial_lr"], state["best_loss"]
        self.wait, self.stopped, self.best = state["wait"], state["stopped"], state["best"]
        self.set_lr(state["lr"])
