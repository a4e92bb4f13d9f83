"""GPM: Gradient Projection Memory (Saha, Garg & Roy, ICLR 2021).

After each task, the inputs of every protected layer on n_s training samples form a representation matrix
R (conv layers: unfolded patches). Its top left-singular vectors holding a fraction ε of the energy span the
Core Gradient Space, stored as an orthonormal basis M (Eq. 5 for the first task; Eqs. 8–9 add only what the
memory misses: R̂ = R − MMᵀR and the smallest k with ‖MMᵀR‖² + ‖R̂_k‖² ≥ ε‖R‖²). On every later task each
protected weight's gradient is projected before the optimizer step: g ← g − (gM)Mᵀ (Eqs. 6–7), so W x_old
barely changes. Which layers are protected is the network's choice (``protected_layers``); per-task heads never.

Fidelity flags (defaults = the official code, which produced the published numbers):
  - ``rank_rule``: first-task rank ``code`` = #{i : cumsum(σ²)_i/Σσ² < ε} (one fewer than the paper) or
    ``paper`` = the smallest k reaching ε. Updates use the exact k under both rules, as the code does.
  - ``threshold_increment``: ε_t = ε + t·Δ for task t (0-based); the code's CIFAR setting is Δ = 0.003.
  - norm layers' affine parameters are frozen after the first task (the code zeroes their gradients), and
    BatchNorm layers are held in eval mode (a no-op for GPM's nets, whose BN keeps no running statistics; for
    a net with running statistics they would otherwise drift on later tasks).
  - ``basis_source``: R from the layers' ``activations`` (GPM) or from their weight ``gradients``,
    R = (∂L/∂W)ᵀ of one forward/backward on n_s samples in eval mode (ROGO's code on CIFAR-100 and
    miniImageNet, rogo.md §2). A GPM-vs-ROGO comparison must use the same source.

Diagnostics per protected layer after each task: the memory size and its fraction of the input space, and the
principal angles between this task's own subspace (its R at the same ε and rule, before the union) and the
previous task's: their mean and smallest, in degrees (small: the tasks share input directions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clbench.config import ConfigError, StrategyConfig
from clbench.subspace import (
    LayerProjector,
    collect_layer_inputs,
    extend_basis,
    principal_angles,
    threshold_basis,
    unsupported_layers,
)
from strategies import register
from strategies.base import Strategy

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch.utils.hooks import RemovableHandle

    from clbench.context import Context

log = logging.getLogger(__name__)

_SAMPLE_KEY = 7  # stream of randomness for choosing the representation samples

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def norm_parameters(module: nn.Module) -> set[int]:
    """ids of the affine parameters of every norm layer in ``module`` (frozen after the first task)."""
    return {id(p) for m in module.modules() if isinstance(m, _NORMS) for p in m.parameters()}


def hold_batchnorm_in_eval(module: nn.Module) -> list[RemovableHandle]:
    """Keep every BatchNorm of ``module`` in eval mode while the returned hooks are attached, so layers with
    running statistics stop updating them (the engine's ``model.train()`` each epoch would undo a one-off
    ``eval()``). Layers without running statistics normalise with the batch's either way."""
    return [m.register_forward_pre_hook(_eval_mode) for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _eval_mode(module: nn.Module, _args: tuple[Any, ...]) -> None:
    module.training = False


@dataclass
class GPMConfig(StrategyConfig):
    """GPM's knobs (gpm.md §3).

    Attributes:
        threshold: energy threshold ε per protected layer, in order (one value: every layer).
        threshold_increment: Δ added to ε per task index.
        samples: n_s, training samples forwarded per protected layer (one value: every layer).
        rank_rule: first-task rank rule, ``code`` or ``paper`` (see the module docstring).
        projection: ``auto`` (cheapest per layer), ``gradient`` (g − gMMᵀ) or ``input`` (ΔW from projected
            inputs, Linear layers only).
        basis_method: ``auto``, ``gram`` or ``svd`` (see ``clbench.subspace.top_singular``).
        freeze_norm_after_first: freeze norm layers' affine parameters after the first task.
        basis_source: ``activations`` (GPM) or ``gradients`` (ROGO's code on CIFAR-100 / miniImageNet).
    """

    threshold: list[float] = field(default_factory=lambda: [0.95, 0.99, 0.99])
    threshold_increment: float = 0.0
    samples: list[int] = field(default_factory=lambda: [300])
    rank_rule: str = "code"
    projection: str = "auto"
    basis_method: str = "auto"
    freeze_norm_after_first: bool = True
    basis_source: str = "activations"

    def validate(self) -> None:
        validate_thresholds(self.threshold, self.threshold_increment)
        if not self.samples or any(n < 1 for n in self.samples):
            raise ConfigError(f"bad value for 'strategy.samples': {self.samples}; each n_s must be >= 1")
        for key, valid in (("rank_rule", ("code", "paper")), ("projection", ("auto", "gradient", "input")),
                           ("basis_method", ("auto", "gram", "svd")),
                           ("basis_source", ("activations", "gradients"))):
            if getattr(self, key) not in valid:
                raise ConfigError(f"bad value for 'strategy.{key}': '{getattr(self, key)}'; valid: {list(valid)}")


def validate_thresholds(threshold: list[float], increment: float) -> None:
    """Refuse energy thresholds outside (0, 1] and a per-task increment outside [0, 1) (GPM, FOT)."""
    if not threshold or any(not 0.0 < e <= 1.0 for e in threshold):
        raise ConfigError(f"bad value for 'strategy.threshold': {threshold}; each ε must be in (0, 1]")
    if not 0.0 <= increment < 1.0:
        raise ConfigError(f"bad value for 'strategy.threshold_increment': {increment}; must be in [0, 1)")


def basis_diagnostics(bases: dict[str, torch.Tensor]) -> dict[str, float]:
    """``basis_dim/<layer>`` and ``basis_frac/<layer>`` (its fraction of the layer's input space) of d × k bases."""
    out: dict[str, float] = {}
    for name, basis in bases.items():
        out[f"basis_dim/{name}"] = float(basis.shape[1])
        out[f"basis_frac/{name}"] = basis.shape[1] / basis.shape[0]
    return out


def protected_layers(ctx: Context, strategy: str) -> dict[str, nn.Module]:
    """The model's protected layers, which a subspace strategy reads the inputs of.

    Raises:
        ConfigError: a layer whose inputs the subspace core cannot read (e.g. the peft LoRA layers of a language
            model), naming the strategy, the model and the layers.
    """
    layers = ctx.module.protected_layers()
    bad = unsupported_layers(layers)
    if bad:
        raise ConfigError(f"strategy '{strategy}' protects Linear and Conv2d layers; model "
                          f"{type(ctx.module).__name__} (model.name) protects {bad[:3]}{' ...' if len(bad) > 3 else ''}"
                          ", whose inputs it cannot read yet; use strategy=naive for this model")
    return layers


def per_layer(values: list[Any], names: list[str], key: str) -> dict[str, Any]:
    """Match a per-layer list to the protected layers in order; one value applies to every layer.

    A list longer than the layers is cut to its first values: GPM's PMNIST list [ε_fc1, ε_fc2, ε_head] then
    serves a multi-head variant of the same net, whose per-task heads are not protected (gpm.md §7 does so).
    """
    if len(values) == 1:
        return dict.fromkeys(names, values[0])
    if len(values) < len(names):
        raise ConfigError(f"bad value for 'strategy.{key}': {len(values)} values for {len(names)} protected "
                          f"layers {names}; give one value, or one per layer")
    if len(values) > len(names):
        log.info("strategy.%s: using the first %d of %s for layers %s", key, len(names), values, names)
    return dict(zip(names, values[: len(names)], strict=True))


@register("gpm")
class GPM(Strategy):
    """Gradient Projection Memory; the base of the projection family."""

    config_class = GPMConfig
    cfg: GPMConfig

    def __init__(self, cfg: GPMConfig) -> None:
        super().__init__(cfg)
        self.bases: dict[str, torch.Tensor] = {}
        self._projectors: list[LayerProjector] = []
        self._norm_hooks: list[RemovableHandle] = []
        self._task_bases: dict[str, torch.Tensor] = {}  # the last task's own subspace per layer (for angles)
        self._angles: dict[str, float] = {}

    def setup(self, ctx: Context) -> None:
        names = list(protected_layers(ctx, self.name))
        self._thresholds = per_layer(self.cfg.threshold, names, "threshold")
        self._samples = per_layer(self.cfg.samples, names, "samples")

    def threshold(self, layer: str, task: int) -> float:
        """ε for ``layer`` at task ``task``: ε_layer + task·Δ, capped at 1."""
        return min(1.0, self._thresholds[layer] + task * self.cfg.threshold_increment)

    def attach(self, ctx: Context) -> None:
        layers = ctx.module.protected_layers()
        self._projectors = [
            LayerProjector(layers[name], basis.to(ctx.device), form=self.cfg.projection, batch_size=ctx.batch_size)
            for name, basis in self.bases.items() if basis.shape[1] > 0
        ]
        for p in self._projectors:
            p.attach()
        if self.cfg.freeze_norm_after_first and ctx.experience > 0:
            self._norm_hooks = hold_batchnorm_in_eval(ctx.module)

    def project(self, ctx: Context) -> None:
        for p in self._projectors:
            p.project_()

    def parameters_to_train(self, ctx: Context) -> Iterator[nn.Parameter]:
        frozen: set[int] = set()
        if self.cfg.freeze_norm_after_first and ctx.experience > 0:
            frozen = norm_parameters(ctx.module)
        return (p for p in ctx.module.parameters() if p.requires_grad and id(p) not in frozen)

    def detach(self, ctx: Context) -> None:
        for p in self._projectors:
            p.detach()
        for h in self._norm_hooks:
            h.remove()
        self._projectors, self._norm_hooks = [], []

    @torch.no_grad()
    def after_experience(self, ctx: Context) -> None:
        """Representations of the experience's training samples → extend every layer's memory (Eqs. 5, 8–9)."""
        reps = self.representations(ctx)
        for name, R in reps.items():
            eps = self.threshold(name, ctx.experience)
            old = self.bases.get(name)
            own = threshold_basis(R.float(), eps, self.cfg.rank_rule, self.cfg.basis_method)  # Eq. 5 on R alone
            self.bases[name] = own if old is None else extend_basis(
                old.to(R.device), R.float(), eps, rule=self.cfg.rank_rule, method=self.cfg.basis_method)
            self._record_angles(name, own)

    def representations(self, ctx: Context) -> dict[str, torch.Tensor]:
        """R per protected layer (in × n) from n_s training samples, in eval mode (gpm.md §2 step 2)."""
        assert ctx.train_source is not None
        module = ctx.module
        layers = module.protected_layers()
        if not layers:  # e.g. a multi-head net without hidden layers: nothing to protect
            return {}
        batch = ctx.train_source.take(max(self._samples.values()), ctx.generator(_SAMPLE_KEY))
        was_training = module.training
        module.eval()
        try:
            if self.cfg.basis_source == "activations":
                return collect_layer_inputs(module, layers, lambda: module.outputs(batch), samples=self._samples,
                                            positions=module.input_positions(batch))
            with torch.enable_grad():
                names = list(layers)
                grads = torch.autograd.grad(module.loss(batch), [layers[n].weight for n in names])
            return {n: g.detach().flatten(1).T for n, g in zip(names, grads, strict=True)}
        finally:
            module.train(was_training)

    def _record_angles(self, name: str, own: torch.Tensor) -> None:
        """Principal angles (degrees) between this task's own subspace and the previous task's, per layer."""
        previous = self._task_bases.get(name)
        self._task_bases[name] = own.detach().cpu()
        if previous is None or previous.shape[1] == 0 or own.shape[1] == 0:
            return
        theta = principal_angles(previous.to(own.device), own).rad2deg()
        self._angles[f"angle_mean/{name}"] = float(theta.mean())
        self._angles[f"angle_min/{name}"] = float(theta.min())

    def diagnostics(self) -> dict[str, float]:
        return basis_diagnostics(self.bases) | self._angles

    def state_dict(self) -> dict[str, Any]:
        return {"bases": {k: v.detach().cpu() for k, v in self.bases.items()},
                "task_bases": dict(self._task_bases), "angles": dict(self._angles)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bases = dict(state["bases"])
        self._task_bases, self._angles = dict(state["task_bases"]), dict(state["angles"])
