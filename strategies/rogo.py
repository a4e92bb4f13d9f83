"""ROGO: Restricted Orthogonal Gradient Projection (Yang et al., AI Open 4, 2023; rogo.md).

ROGO is GPM (the same memory M, the same hard projection of every raw weight gradient onto span(M)^⊥) plus a
restricted relaxation of the frozen space during each task t ≥ 2. The paper's method section was not
retrievable, so everything here follows the official code (rogo.md §2, labels R1–R6 are the note's):

* (R1) effective weight W̃ = W (I − QQᵀ) + W Q S Qᵀ = W + W Q (S − I) Qᵀ, with Q ⊆ span(M) the relaxing basis
  and S a learnable r × r mixing matrix initialised to I. Implemented as a forward hook adding
  D = W Q (S − I) Qᵀ to the layer's output (a Linear or conv of the input with D).
* (R2) loss L_t(W̃) + β Σ_l ‖S_l − I‖²_F.
* (R3) ∂/∂W = G̃ Aᵀ (A = I + Q(S − I)Qᵀ), then projected with the full M. Since every row of G̃ Q(S − I)ᵀQᵀ lies
  in span(Q) ⊆ span(M), the projection removes that term entirely: P⊥(G̃ Aᵀ) = P⊥(G̃). So D is built from the
  detached W and GPM's projector (either form) is used unchanged. ∂/∂S = Qᵀ Wᵀ G̃ Q + 2β(S − I), unprojected.
* (R4) relaxing-space search: G = ∂L_t/∂W (unprojected, through W̃, n_g training samples, eval mode); U_g = the
  top left-singular vectors of Gᵀ holding ε_g of its energy (smallest such set); the directions of the still
  frozen basis F whose cosine with span(U_g) is ≥ ε_s move from F to Q (closed form of the code's greedy loop,
  :func:`clbench.subspace.split_by_alignment`). A search succeeds if any layer gained a direction.
* (R5) when to search (``search_schedule``) and what a success does to the learning rate (``on_success``):
  PMNIST ``every_epoch`` + ``halve``; CIFAR-100 ``after_decay`` (lr ≤ 5e-4) + ``reset``, ≤ 2 successes;
  miniImageNet ``no_improvement`` (lr < 1e-2) + ``reset``, ≤ 2 successes. Searching stops after a failure.
* (R6) end of task: the best-validation state (S included) is restored by the schedule, then W ← W + D is
  merged, Q, F, S are dropped, and the GPM memory is updated from the merged network.

S is kept as a K × K parameter per layer (K = dim M at the task start, the largest Q can get), of which the
top-left r × r block is used: unused entries get no gradient and stay I (the code keeps a full in × in S).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from clbench.config import ConfigError
from clbench.subspace import split_by_alignment, threshold_basis
from strategies import register
from strategies.gpm import GPM, GPMConfig, per_layer

if TYPE_CHECKING:
    from collections.abc import Iterator

    from clbench.context import Context
    from clbench.schedule import EpochReport

_SEARCH_KEY = 11  # stream of randomness for the search samples

SCHEDULES = ("every_epoch", "after_decay", "no_improvement", "never")
ON_SUCCESS = ("halve", "reset", "none")


@dataclass
class ROGOConfig(GPMConfig):
    """ROGO's knobs on top of GPM's (rogo.md §3; defaults: the PMNIST code).

    Attributes:
        grad_threshold: ε_g per protected layer: energy of the search gradient's subspace U_g.
        space_threshold: ε_s per protected layer: the smallest cosine between a relaxed direction and U_g.
        search_samples: n_g, training samples of the search's forward/backward.
        beta: β, weight of ‖S − I‖²_F.
        search_schedule: ``every_epoch`` (after each epoch), ``after_decay`` (after a plateau decay that brings
            the lr to ≤ ``search_lr``), ``no_improvement`` (after an epoch without a better validation loss while
            the lr ≤ ``search_lr``) or ``never`` (ROGO ≡ GPM). Searching stops once a search fails.
        search_lr: the lr bound of ``after_decay`` / ``no_improvement``.
        max_successes: successful searches allowed per task (0: no limit).
        on_success: what a success does to the lr of every parameter group: ``halve`` (divide by
            ``engine.lr_factor``), ``reset`` (back to the task's initial lr) or ``none``.
    """

    grad_threshold: list[float] = field(default_factory=lambda: [0.97, 0.99, 0.99])
    space_threshold: list[float] = field(default_factory=lambda: [0.9])
    search_samples: int = 125
    beta: float = 1.0
    search_schedule: str = "every_epoch"
    search_lr: float = 0.0
    max_successes: int = 0
    on_success: str = "halve"

    def validate(self) -> None:
        super().validate()
        for key in ("grad_threshold", "space_threshold"):
            values = getattr(self, key)
            if not values or any(not 0.0 < v <= 1.0 for v in values):
                raise ConfigError(f"bad value for 'strategy.{key}': {values}; each value must be in (0, 1]")
        checks = (("search_samples", self.search_samples >= 1, "must be >= 1"),
                  ("beta", self.beta >= 0, "must be >= 0"), ("search_lr", self.search_lr >= 0, "must be >= 0"),
                  ("max_successes", self.max_successes >= 0, "must be >= 0 (0: no limit)"))
        for key, ok, msg in checks:
            if not ok:
                raise ConfigError(f"bad value for 'strategy.{key}': {getattr(self, key)}; {msg}")
        for key, valid in (("search_schedule", SCHEDULES), ("on_success", ON_SUCCESS)):
            if getattr(self, key) not in valid:
                raise ConfigError(f"bad value for 'strategy.{key}': '{getattr(self, key)}'; valid: {list(valid)}")


def relaxation_delta(weight: torch.Tensor, Q: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """D = W Q (S − I) Qᵀ in W's shape, from the detached W (see the module docstring, R1 and R3)."""
    r = Q.shape[1]
    W2 = weight.detach().flatten(1)
    eye = torch.eye(r, dtype=S.dtype, device=S.device)
    return ((W2 @ Q) @ (S[:r, :r] - eye) @ Q.T).reshape(weight.shape)


@register("rogo")
class ROGO(GPM):
    """GPM with a restricted, learnable relaxation of the frozen space inside each task."""

    config_class = ROGOConfig
    cfg: ROGOConfig

    def __init__(self, cfg: ROGOConfig) -> None:
        super().__init__(cfg)
        self.relaxed: dict[str, torch.Tensor] = {}  # Q per layer (in × r)
        self.frozen: dict[str, torch.Tensor] = {}  # F per layer: the part of span(M) not relaxed yet
        self.mixing: dict[str, nn.Parameter] = {}  # S per layer (K × K, top-left r × r used)
        self.searching = False
        self.successes = 0
        self._hooks: list[Any] = []
        self._relaxed_dims: dict[str, float] = {}
        self._device = torch.device("cpu")

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self._device = ctx.device
        names = list(ctx.module.protected_layers())
        self._grad_thresholds = per_layer(self.cfg.grad_threshold, names, "grad_threshold")
        self._space_thresholds = per_layer(self.cfg.space_threshold, names, "space_threshold")

    def before_experience(self, ctx: Context) -> None:
        """A task t ≥ 2 starts with Q = ∅, F = M and S = I (rogo.md §2)."""
        super().before_experience(ctx)
        self.relaxed, self.frozen, self.mixing = {}, {}, {}
        for name, M in self.bases.items():
            if M.shape[1] > 0:
                self.relaxed[name] = M.new_zeros((M.shape[0], 0), device=ctx.device)
                self.frozen[name] = M.to(ctx.device, copy=True)
                self.mixing[name] = nn.Parameter(torch.eye(M.shape[1], dtype=M.dtype, device=ctx.device))
        self.searching = self.cfg.search_schedule != "never" and bool(self.frozen)
        self.successes = 0

    def parameters_to_train(self, ctx: Context) -> Iterator[Any]:  # type: ignore[override]
        """GPM's parameters, plus the mixing matrices in a group without weight decay (as the code)."""
        groups: list[dict[str, Any]] = [{"params": list(super().parameters_to_train(ctx))}]
        if self.mixing:
            groups.append({"params": list(self.mixing.values()), "weight_decay": 0.0})
        return iter(groups)

    def attach(self, ctx: Context) -> None:
        super().attach(ctx)
        layers = ctx.module.protected_layers()
        for name in self.mixing:
            self._hooks.append(layers[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def add_relaxation(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> Any:
            Q = self.relaxed[name]
            if Q.shape[1] == 0:
                return None
            D = relaxation_delta(layer.weight, Q, self.mixing[name])
            if isinstance(layer, nn.Linear):
                return output + F.linear(inputs[0], D)
            assert isinstance(layer, nn.Conv2d)
            return output + F.conv2d(inputs[0], D, None, layer.stride, layer.padding, layer.dilation, layer.groups)

        return add_relaxation

    def detach(self, ctx: Context) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        super().detach(ctx)

    def penalty(self, ctx: Context, batch: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """β Σ_l ‖S_l − I‖²_F over the layers with a non-empty Q (R2)."""
        terms = []
        for name, Q in self.relaxed.items():
            r = Q.shape[1]
            if r:
                S = self.mixing[name][:r, :r]
                terms.append(((S - torch.eye(r, device=S.device)) ** 2).sum())
        return self.cfg.beta * torch.stack(terms).sum() if terms else None

    def after_epoch(self, ctx: Context, report: EpochReport) -> None:
        """Search the relaxing space when the schedule says so (R5) and act on the lr after a success."""
        assert ctx.schedule is not None
        if not self._search_due(report):
            return
        if not self.search(ctx):
            self.searching = False
            return
        self.successes += 1
        if self.cfg.on_success == "halve":
            ctx.schedule.set_lr(ctx.schedule.lr / ctx.schedule.factor)
        elif self.cfg.on_success == "reset":
            ctx.schedule.set_lr(ctx.schedule.initial_lr)
        if self.cfg.max_successes and self.successes >= self.cfg.max_successes:
            self.searching = False

    def _search_due(self, report: EpochReport) -> bool:
        if not self.searching:
            return False
        schedule = self.cfg.search_schedule
        if schedule == "every_epoch":
            return True
        if schedule == "after_decay":
            return report.decayed and report.lr <= self.cfg.search_lr
        return schedule == "no_improvement" and not report.improved and report.lr <= self.cfg.search_lr

    def search_gradients(self, ctx: Context) -> dict[str, torch.Tensor]:
        """G = ∂L_t/∂W through W̃ (= G̃ Aᵀ), unprojected, on n_g training samples in eval mode (R4, step 1)."""
        assert ctx.train_source is not None
        module = ctx.module
        layers = module.protected_layers()
        names = list(self.frozen)
        batch = ctx.train_source.take(self.cfg.search_samples, ctx.generator(_SEARCH_KEY, ctx.epoch))
        for p in self._projectors:  # the input form would return projected weight gradients
            p.detach()
        was_training = module.training
        module.eval()
        try:
            grads = torch.autograd.grad(module.loss(batch), [layers[n].weight for n in names])
        finally:
            module.train(was_training)
            for p in self._projectors:
                p.attach()
        out = {}
        for name, g in zip(names, grads, strict=True):
            G = g.flatten(1)
            Q = self.relaxed[name]
            if Q.shape[1]:  # G̃ Aᵀ = G̃ + G̃ Q (S − I)ᵀ Qᵀ
                r = Q.shape[1]
                S = self.mixing[name].detach()[:r, :r]
                G = G + ((G @ Q) @ (S - torch.eye(r, device=S.device)).T) @ Q.T
            out[name] = G
        return out

    @torch.no_grad()
    def search(self, ctx: Context) -> bool:
        """One relaxing-space search (R4); True if any layer gained a direction."""
        with torch.enable_grad():
            grads = self.search_gradients(ctx)
        gained = False
        for name, G in grads.items():
            if self.frozen[name].shape[1] == 0:
                continue
            U = threshold_basis(G.T, self._grad_thresholds[name], rule="paper", method=self.cfg.basis_method)
            aligned, rest = split_by_alignment(self.frozen[name], U.to(self.frozen[name].dtype),
                                               self._space_thresholds[name])
            if aligned.shape[1]:
                self.relaxed[name] = torch.cat([self.relaxed[name], aligned], dim=1)
                self.frozen[name] = rest
                gained = True
        return gained

    @torch.no_grad()
    def after_experience(self, ctx: Context) -> None:
        """Merge W ← W + W Q (S − I) Qᵀ, drop Q, F, S (R6), then GPM's memory update on the merged network."""
        layers = ctx.module.protected_layers()
        self._relaxed_dims = {}
        for name, Q in self.relaxed.items():
            self._relaxed_dims[f"relaxed_dim/{name}"] = float(Q.shape[1])
            if Q.shape[1]:
                layers[name].weight.add_(relaxation_delta(layers[name].weight, Q, self.mixing[name]))
        if self.relaxed:
            self._relaxed_dims["search_successes"] = float(self.successes)
        self.relaxed, self.frozen, self.mixing = {}, {}, {}
        super().after_experience(ctx)

    def diagnostics(self) -> dict[str, float]:
        return super().diagnostics() | self._relaxed_dims

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "relaxed": {k: v.cpu() for k, v in self.relaxed.items()},
            "frozen": {k: v.cpu() for k, v in self.frozen.items()},
            "mixing": {k: v.detach().cpu() for k, v in self.mixing.items()},
            "searching": self.searching, "successes": self.successes, "relaxed_dims": dict(self._relaxed_dims)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        dev = self._device  # setup() ran before: resume onto the run's device
        self.relaxed = {k: v.to(dev) for k, v in state["relaxed"].items()}
        self.frozen = {k: v.to(dev) for k, v in state["frozen"].items()}
        self.mixing = {k: nn.Parameter(v.to(dev)) for k, v in state["mixing"].items()}
        self.searching, self.successes = state["searching"], state["successes"]
        self._relaxed_dims = dict(state["relaxed_dims"])
