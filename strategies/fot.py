"""FOT: Federated Orthogonal Training (Bakman, Yaldiz, Ezzeldin & Avestimehr, ICLR 2024; fot.md).

FedAvg (:mod:`strategies.fedavg`) plus, per projected layer l (the net's ``protected_layers``: fot.md §2 lists
the code's, all weights but per-task heads), an orthonormal basis U_l of the global input subspace of the old
tasks, kept by the server:

* **FedProject** (fot.md §2 step 4), every round: the aggregated update of each projected weight loses its
  component in span(U_l), Δ_l ← Δ_l − Δ_l U_l U_lᵀ (:func:`clbench.federated.project_update`); biases, norm
  layers and task heads pass unprojected. No basis on task 1, so task 1 is FedAvg bit for bit.
* **GPSE** (fot.md §2 steps 5-6), at each task end: each client of the last round sends, per layer, the sketch
  Y_k = (A_k − U Uᵀ A_k) G_k of its layer inputs A_k over all its local samples of the task, with ρ_k and n_k
  (:class:`clbench.federated.ResidualSketcher`; G_k private, drawn in chunks); the server sums them (securely
  with ``federated.secure_sum``) and extends U_l by the top singular vectors of Y = Σ_k Y_k holding a fraction
  ε′ = (ρ̄ − (1 − ε_t))/ρ̄ of its energy (:func:`clbench.federated.expand_basis`), ε_t = ε + t·``threshold_increment``
  (the code's eps_inc). No raw sample or activation leaves a client: Y_k is d_l × m_l, m_l = factor·d_l.

Fidelity flags (defaults = the official code, fot.md §2 and pitfall 2; the GPSE ones are
:class:`clbench.federated.GPSEConfig`'s):
  - ``sketch``: ``gaussian`` (the CIFAR-100 / 5-Datasets / mini-ImageNet code), ``uniform`` (U[−1, 1], the PMNIST
    code) or ``gram`` (R_k R_kᵀ: exact, not in the paper).
  - ``ratio``: ``norm`` ρ_k = ‖R_k‖/‖A_k‖ (code) or ``squared`` (GPM-consistent); ``ratio_mean``: ``samples``
    (Σ n_k ρ_k / Σ n_k, code) or ``pooled``; ``always_add``: add the top direction even when ε′ ≤ 0 (code).
  - ``activation_mode``: ``train`` (the code collects after local training, dropout on) or ``eval``.
  - ``activations_from``: ``local`` (the client's locally trained model; sketches ride on its last upload, code)
    or ``global`` (a query with the aggregated model after the last round).
With ``sketch=gram ratio=squared ratio_mean=pooled always_add=false activation_mode=eval
activations_from=global`` one client reproduces centralized GPM with the paper's rank rule (fot.md §7 test 3).

Diagnostics after each task, per projected layer: ``basis_dim``, ``basis_frac`` = r_l/d_l (a layer at 1 is
frozen, fot.md pitfall 5), and the task end's ``rho`` (ρ̄) and ``eps_prime`` (ε′).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from clbench.config import ConfigError
from clbench.context import TaskEndRequest
from clbench.subspace import collect_layer_inputs
from clbench.subspace.gpse import (
    RATIO_MEANS,
    RATIOS,
    SKETCHES,
    GPSEConfig,
    ResidualSketcher,
    effective_threshold,
    expand_basis,
    mean_ratio,
    pack_sketches,
    project_update,
    sketch_shapes,
    unpack_sketches,
)
from strategies import register
from strategies.fedavg import FedAvg, FedAvgConfig
from strategies.gpm import basis_diagnostics, per_layer, protected_layers, validate_thresholds

if TYPE_CHECKING:
    from clbench.context import Context

_SKETCH_KEY = 8  # a client's private G_k, per layer


@dataclass
class FOTConfig(FedAvgConfig):
    """FOT's knobs (fot.md §2, §4; see the module docstring for the flags).

    Attributes:
        threshold: ε per projected layer, in order (one value: every layer; the code: one ε).
        threshold_increment: eps_inc, added to ε after each task.
        sketch: ``gaussian``, ``uniform`` or ``gram``.
        sketch_factor: m_l / d_l per projected layer (one value: every layer); the code: 1 for the MLP and
            AlexNet's convs, 5 for AlexNet's fc layers and every ResNet layer.
        ratio: ``norm`` or ``squared``.
        ratio_mean: ``samples`` or ``pooled``.
        always_add: add one direction when ε′ ≤ 0.
        activation_mode: the client's module mode while sketching, ``train`` or ``eval``.
        activations_from: ``local`` or ``global``.
    """

    threshold: list[float] = field(default_factory=lambda: [0.95])
    threshold_increment: float = 0.0
    sketch: str = "gaussian"
    sketch_factor: list[int] = field(default_factory=lambda: [1])
    ratio: str = "norm"
    ratio_mean: str = "samples"
    always_add: bool = True
    activation_mode: str = "train"
    activations_from: str = "local"

    def validate(self) -> None:
        validate_thresholds(self.threshold, self.threshold_increment)
        if not self.sketch_factor or any(f < 1 for f in self.sketch_factor):
            raise ConfigError(f"bad value for 'strategy.sketch_factor': {self.sketch_factor}; each must be >= 1")
        for key, valid in (("sketch", SKETCHES), ("ratio", RATIOS), ("ratio_mean", RATIO_MEANS),
                           ("activation_mode", ("train", "eval")), ("activations_from", ("local", "global"))):
            if getattr(self, key) not in valid:
                raise ConfigError(f"bad value for 'strategy.{key}': '{getattr(self, key)}'; valid: {list(valid)}")


@register("fot")
class FOT(FedAvg):
    """FedAvg + FedProject every round + GPSE at each task end."""

    config_class = FOTConfig
    cfg: FOTConfig

    def __init__(self, cfg: FOTConfig) -> None:
        super().__init__(cfg)
        self.gpse = GPSEConfig(sketch=cfg.sketch, ratio=cfg.ratio, ratio_mean=cfg.ratio_mean,
                               always_add=cfg.always_add)
        self.bases: dict[str, Tensor] = {}  # U_l per projected layer, float64 on the device
        self._scores: dict[str, float] = {}

    def setup(self, ctx: Context) -> None:
        names = list(protected_layers(ctx, self.name))
        self._thresholds = per_layer(self.cfg.threshold, names, "threshold")
        factors = per_layer(self.cfg.sketch_factor, names, "sketch_factor")
        shapes = sketch_shapes(ctx.module.state_dict(), [f"{n}.weight" for n in names],
                               {f"{n}.weight": factors[n] for n in names})
        self._sketch_dims = {n: shapes[f"{n}.weight"][1] for n in names}  # m_l

    def threshold(self, layer: str, task: int) -> float:
        """ε_t of ``layer`` at task ``task``: ε_layer + task·eps_inc, capped at 1."""
        return min(1.0, self._thresholds[layer] + task * self.cfg.threshold_increment)

    def aggregate(self, ctx: Context, update: dict[str, Tensor]) -> dict[str, Tensor]:
        """FedProject: Δ_l ← Δ_l − Δ_l U_l U_lᵀ for every projected weight (fot.md §2 step 4)."""
        return project_update(update, {f"{name}.weight": U for name, U in self.bases.items()})

    def task_end_request(self, ctx: Context) -> TaskEndRequest:
        """GPSE: send the current bases (none on task 1) for the clients' residuals."""
        return TaskEndRequest(dict(self.bases), after_aggregation=self.cfg.activations_from == "global")

    def client_report(self, ctx: Context, request: dict[str, Tensor]) -> dict[str, Tensor]:
        """Client side of GPSE (fot.md §2 step 5): per projected layer, Y_k, n_k ρ_k and n_k (or ‖R_k‖², ‖A_k‖²)
        over every local sample of the task, forwarded in batches; G_k from the client's own generator."""
        module = ctx.module
        layers = module.protected_layers()
        assert ctx.train_source is not None
        sketchers = {name: ResidualSketcher(request.get(name), self._sketch_dims[name],
                                            ctx.generator(_SKETCH_KEY, i), self.gpse)
                     for i, name in enumerate(layers)}
        was_training = module.training
        module.train(self.cfg.activation_mode == "train")
        try:
            for batch in ctx.train_source.batches(ctx.eval_batch_size, shuffle=False):
                for name, A in collect_layer_inputs(module, layers, functools.partial(module.outputs, batch)).items():
                    sketchers[name].update(A)
        finally:
            module.train(was_training)
        return pack_sketches({name: s.message() for name, s in sketchers.items()})

    def task_end(self, ctx: Context, total: dict[str, Tensor]) -> None:
        """Server side of GPSE (fot.md §2 step 6): extend each U_l from the summed sketches."""
        for name, summed in unpack_sketches(total).items():
            eps = self.threshold(name, ctx.experience)
            rho = mean_ratio(summed, self.gpse)
            self._scores[f"rho/{name}"] = rho
            self._scores[f"eps_prime/{name}"] = effective_threshold(eps, rho) if rho > 0 else float("nan")
            self.bases[name] = expand_basis(self.bases.get(name), summed, eps, self.gpse).to(ctx.device)

    def diagnostics(self) -> dict[str, float]:
        return basis_diagnostics(self.bases) | self._scores

    def state_dict(self) -> dict[str, Any]:
        """The server's state: the bases U_l and the last task end's ρ̄ and ε′ (clients keep none)."""
        return {"bases": {k: v.detach().cpu() for k, v in self.bases.items()}, "scores": dict(self._scores)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bases, self._scores = dict(state["bases"]), dict(state["scores"])

    def rebuild(self, ctx: Context) -> None:
        """The restored bases go back to the device, where :meth:`task_end` keeps them."""
        self.bases = {k: v.to(ctx.device) for k, v in self.bases.items()}
