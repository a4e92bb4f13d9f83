"""HLOP: Hebbian Learning based Orthogonal Projection (Xiao et al., ICLR 2024; hlop.md).

GPM-style protection computed by neurons. Every protected layer l gets lateral *subspace neurons* y = H x
(H ∈ R^{k×d}, x = the layer's presynaptic activity; conv layers: unfolded C_in·kh·kw patches, one row per sample
and position). While a task trains, Oja's subspace rule (Sec. 4.1, Fig. 1; hlop.md step 1)

    ΔH_new = η · mean_batch[ y_new (x − Hᵀ y)ᵀ ],   y = H x over old and new rows,

runs in every training forward pass (no gradient, before the optimizer step), so the task's new rows learn the
principal subspace of the activity left over by the frozen old rows (uncentred statistics, as GPM). At the task
end every row becomes old and frozen (step 3). On task k > 1 each protected weight's update uses the projected
trace x − H_oldᵀ H_old x (step 4a):

    G ← G (I − H_oldᵀ H_old),                    G the weight gradient reshaped to (out, d),

which for a linear (or conv) layer is the same as building ΔW from projected activities. H_oldᵀ H_old is a
projector only when the rule has converged (hlop.md "Pitfalls"): the diagnostics log its eigenvalues.

Which activity feeds the rule (``activity``, hlop.md "Which activity"): DSR → the weighted firing rate of the
layer input (``rate``), BPTT → the per-step spikes (``steps``); the projection acts on the per-step input in
both cases (the gradient form covers every step at once). A non-spiking network uses its plain inputs.

``subspace_method``: ``hebbian`` (HLOP) or ``svd``: no lateral neurons; at each task end the same number of
rows is taken exactly, as the top left-singular vectors of the residual activity R − P_old R on ``samples``
training samples (hlop.md "Offline stand-ins": the exact PCA projection of the same size), from the same
subspace core as GPM.

Fidelity flags (defaults = the official code, whose README says it produced the paper's numbers):
  - rows per task (``rows``) and Hebbian η per layer (``hebbian_lr``); 5 iterations per batch, momentum 0.9,
    element-wise clamp of ΔH at 10; new rows orthonormal among themselves only.
  - the amount of Hebbian learning per task (``hebbian_samples``, default 60,000: one epoch of a PMNIST task, the
    setting of the code's PMNIST run). Oja's rule converges at a rate set by its number of updates, not by the
    data, and the code gets it from its data: a PMNIST task is 60,000 digits, 938 batches of 64, 5 iterations
    each. When a task's training passes show the rule fewer samples, E·n < S (E epochs of n training samples,
    S = ``hebbian_samples``), p = ⌈(S − E·n) / n⌉ extra passes over the task's training data run at the task
    end, Hebbian only, before the merge: the same rule, batch size and iterations, on the activity of the
    trained network (eval mode, no gradient, one forward pass whose activity is kept), in a shuffled order per
    pass. The rule then gets about the paper's number of updates, (E + p)·⌈n/B⌉ ≈ S/B batches, and its rows
    converge (the new rows decorrelate from the old, so H_oldᵀ H_old is close to a projector). Every published
    setting already shows the rule at least S samples per task (PMNIST 60,000 × 1 epoch; CIFAR-100 5,000 × 200;
    miniImageNet 2,500 × 100; 5-Datasets more), so there p = 0 and the run is the code's; only small stand-ins
    get extra passes (permuted_mnist_5k: 4,000 × 1 → p = 14, 945 batches vs the paper's 938).
    ``hebbian_samples=0`` (or null): the code's literal loop, Hebbian steps in the training passes only.
  - after the first task (``freeze_bn``, ``freeze_thresholds``, ``freeze_1d``): BatchNorm in eval mode with its
    affine parameters frozen, spiking thresholds frozen, and every 1-D (and 0-D) parameter left out of the
    optimizer (so new heads' biases stay at 0).
  - deviations, default off: ``orthogonal_init`` (new rows start ⟂ span(H_old)) and ``orthonormalize`` (QR of H
    at each merge, so H_oldᵀ H_old is an exact projector); ``lr_normalize`` (η_l = hebbian_lr_l / E‖x‖², with
    E‖x‖² measured on the layer's first training batch, for activity on another scale than the code's).

Diagnostics per protected layer after each task: ``hlop_rows`` (rows of H), ``proj_eig_max`` / ``proj_eig_min``
(the extreme nonzero eigenvalues of H_oldᵀ H_old; a projector has them all 1), ``hhT_err`` (max |H Hᵀ − I|) and
``svd_angle_mean`` / ``svd_angle_max`` (degrees): principal angles between the task's new rows and the top
left-singular vectors of the same residual activity (an exact learner has them at 0), and ``energy_ratio``: the
residual activity's energy the new rows capture over what those exact vectors capture (≤ 1; 1 for an exact
learner). The angles alone overstate the gap when the spectrum is flat around the row count: the exact top-m
subspace is then ill-determined at its tail, while the energy ratio is not.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from clbench.config import ConfigError, StrategyConfig
from clbench.models.snn import DSRNeuron, SpikingNeuron
from clbench.subspace import (
    HebbianSubspace,
    LayerProjector,
    collect_layer_inputs,
    layer_input_matrix,
    principal_angles,
    top_singular,
)
from clbench.subspace.projection import FORMS
from strategies import register
from strategies.base import Strategy
from strategies.gpm import hold_batchnorm_in_eval, norm_parameters, per_layer, protected_layers

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from clbench.context import Context

log = logging.getLogger(__name__)

_SAMPLE_KEY = 7  # stream of randomness for the representation samples (as GPM's)
_ROWS_KEY = 13  # stream of randomness for the initial rows
_PASSES_KEY = 17  # stream of randomness for the order of the extra Hebbian passes

METHODS = ("hebbian", "svd")
ACTIVITIES = ("auto", "rate", "steps")


@dataclass
class HLOPConfig(StrategyConfig):
    """HLOP's knobs (hlop.md "Hyper-parameters"; defaults: the PMNIST code).

    Attributes:
        rows: new subspace neurons per task: ``rows[t]`` for task t (0-based; the last entry repeats), each a list
            with one count per protected layer in order, or one count for every layer (a longer list is cut, as
            GPM's per-layer lists: the PMNIST counts then serve a multi-head net without its head). Capped at
            the layer's d.
        hebbian_lr: η per protected layer (one value: every layer).
        momentum, iterations, clip: of the Hebbian rule (code: 0.9, 5 per batch on the same batch, ±10).
        subspace_method: ``hebbian`` (lateral neurons during training) or ``svd`` (exact rows at the task end).
        activity: what the rule learns from: ``rate`` (weighted rate over time, DSR), ``steps`` (every time
            step's input, BPTT) or ``auto`` (``rate`` for DSR neurons, ``steps`` otherwise).
        samples: training samples forwarded at each task end for the ``svd`` rows and the angle diagnostics.
        projection: how G (I − H_oldᵀ H_old) is formed: ``gradient`` (after backward), ``input`` (Linear layers:
            from projected inputs) or ``auto`` (the cheaper per layer; see :class:`~clbench.subspace.LayerProjector`).
        diagnose_angles: compute the principal angles to the SVD subspace after each task (one extra forward
            pass over ``samples`` samples and an SVD per layer).
        hebbian_samples: S, the samples per task the Hebbian rule sees at least (the paper's PMNIST task:
            60,000); a task whose training passes show it fewer gets ⌈(S − E·n)/n⌉ extra Hebbian-only passes over
            its training data at its end (module docstring). 0 or null: none (the code's loop as written).
        freeze_bn, freeze_thresholds, freeze_1d: after the first task, as the code (module docstring).
        orthogonal_init, orthonormalize, lr_normalize: deviations from the code (module docstring).
    """

    rows: list[list[int]] = field(default_factory=lambda: [[80, 200, 100], [70], [70], [50], [50], [50],
                                                           [30], [30], [30], [10]])
    hebbian_lr: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.01])
    momentum: float = 0.9
    iterations: int = 5
    clip: float | None = 10.0
    subspace_method: str = "hebbian"
    activity: str = "auto"
    samples: int = 300
    projection: str = "auto"
    diagnose_angles: bool = True
    hebbian_samples: int | None = 60000
    freeze_bn: bool = True
    freeze_thresholds: bool = True
    freeze_1d: bool = True
    orthogonal_init: bool = False
    orthonormalize: bool = False
    lr_normalize: bool = False

    def validate(self) -> None:
        if not self.rows or any(not r or any(n < 0 for n in r) for r in self.rows):
            raise ConfigError(f"bad value for 'strategy.rows': {self.rows}; give a non-empty list per task of "
                              "row counts >= 0 (one per protected layer, or one for all)")
        if not self.hebbian_lr or any(e <= 0 for e in self.hebbian_lr):
            raise ConfigError(f"bad value for 'strategy.hebbian_lr': {self.hebbian_lr}; each η must be > 0")
        if not 0.0 <= self.momentum < 1.0 or self.iterations < 1 or (self.clip is not None and self.clip <= 0):
            raise ConfigError("bad value for 'strategy.momentum', 'strategy.iterations' or 'strategy.clip': need "
                              f"0 <= momentum < 1, iterations >= 1, clip > 0 or null; got {self.momentum}, "
                              f"{self.iterations}, {self.clip}")
        if self.hebbian_samples is not None and self.hebbian_samples < 0:
            raise ConfigError(f"bad value for 'strategy.hebbian_samples': {self.hebbian_samples}; must be >= 0 "
                              "(0 or null: Hebbian steps in the training passes only)")
        if self.samples < 1:
            raise ConfigError(f"bad value for 'strategy.samples': {self.samples}; must be >= 1")
        for key, valid in (("subspace_method", METHODS), ("activity", ACTIVITIES), ("projection", FORMS)):
            if getattr(self, key) not in valid:
                raise ConfigError(f"bad value for 'strategy.{key}': '{getattr(self, key)}'; valid: {list(valid)}")


@register("hlop")
class HLOP(Strategy):
    """Hebbian-learned orthogonal projection; ``subspace_method=svd`` swaps in exact rows of the same size."""

    config_class = HLOPConfig
    cfg: HLOPConfig

    def __init__(self, cfg: HLOPConfig) -> None:
        super().__init__(cfg)
        self.learners: dict[str, HebbianSubspace] = {}
        self._lrs: dict[str, float] = {}  # configured η per layer
        self._rows: list[dict[str, int]] = []  # new rows per layer, per task (the last repeats)
        self._lr_scale: dict[str, float] = {}  # E‖x‖² per layer (lr_normalize)
        self._handles: list[Any] = []
        self._projectors: list[LayerProjector] = []
        self._diagnostics: dict[str, float] = {}
        self._use_rate = False

    # ---------------------------------------------------------------- set-up
    def setup(self, ctx: Context) -> None:
        layers = protected_layers(ctx, self.name)
        names = list(layers)
        self._lrs = lrs = per_layer(self.cfg.hebbian_lr, names, "hebbian_lr")
        self._rows = [per_layer(counts, names, f"rows (task {t})") for t, counts in enumerate(self.cfg.rows)]
        self.learners = {
            name: HebbianSubspace(layers[name].weight[0].numel(), lr=lrs[name], momentum=self.cfg.momentum,
                                  iterations=self.cfg.iterations, clip=self.cfg.clip, device=ctx.device)
            for name in names}
        neurons = [m for m in ctx.module.modules() if isinstance(m, SpikingNeuron)]
        if self.cfg.activity == "auto":
            self._use_rate = bool(neurons) and all(isinstance(m, DSRNeuron) for m in neurons)
        else:
            self._use_rate = self.cfg.activity == "rate"
            if self._use_rate and not hasattr(ctx.module, "rate"):
                raise ConfigError(f"strategy.activity=rate needs a spiking network; model "
                                  f"{type(ctx.module).__name__} has no firing rate; use activity=steps or auto")

    def rows_for(self, task: int) -> dict[str, int]:
        """New rows per protected layer at task ``task`` (before the cap at d)."""
        return self._rows[min(task, len(self._rows) - 1)]

    def before_experience(self, ctx: Context) -> None:
        if self.cfg.subspace_method != "hebbian":
            return
        g = ctx.generator(_ROWS_KEY)
        for name, m in self.rows_for(ctx.experience).items():
            self.learners[name].add_rows(m, generator=g, orthogonal_to_old=self.cfg.orthogonal_init)

    def activity(self, module: nn.Module, x: Tensor) -> Tensor:
        """What the Hebbian rule and the SVD rows see of a layer input: its rate over time (DSR) or itself."""
        return module.rate(x) if self._use_rate else x  # type: ignore[operator]

    # ---------------------------------------------------------------- training
    def attach(self, ctx: Context) -> None:
        module = ctx.module
        layers = module.protected_layers()
        rows = self._rows_per_sample(ctx) if any(learner.n_old for learner in self.learners.values()) else {}
        self._projectors = [
            LayerProjector(layers[name], learner.old.T, form=self.cfg.projection,
                           batch_size=ctx.batch_size * rows[name], orthonormal=False)
            for name, learner in self.learners.items() if learner.n_old]
        for p in self._projectors:
            p.attach()
        if self.cfg.subspace_method == "hebbian":
            for name, learner in self.learners.items():
                if learner.rows > learner.n_old:
                    self._handles.append(layers[name].register_forward_pre_hook(self._hebbian_hook(name, module)))
        if ctx.experience > 0 and self.cfg.freeze_bn:
            self._handles += hold_batchnorm_in_eval(module)

    def _hebbian_hook(self, name: str, module: nn.Module) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        learner = self.learners[name]

        def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
            if not (layer.training and torch.is_grad_enabled()):  # no Hebbian step in validation or evaluation
                return
            with torch.no_grad():
                X = layer_input_matrix(layer, self.activity(module, args[0])).T
                if self.cfg.lr_normalize:
                    if name not in self._lr_scale:
                        self._lr_scale[name] = float(X.float().pow(2).sum(1).mean())
                    learner.lr = self._lrs[name] / max(self._lr_scale[name], 1e-12)
                learner.step(X)

        return hook

    def _rows_per_sample(self, ctx: Context) -> dict[str, int]:
        """Rows of activity each protected layer receives per sample (T for a time-distributed Linear input, 1
        for one constant over time), from one no-grad forward of one training sample: the cost model of the
        projection's form (the input form costs ∝ rows per step)."""
        assert ctx.train_source is not None
        module = ctx.module
        layers = module.protected_layers()
        rows: dict[str, int] = {}
        batch = ctx.train_source.take(1, ctx.generator(_SAMPLE_KEY))

        def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
                rows[name] = max(1, args[0].numel() // (args[0].shape[0] * layer.weight[0].numel()))
            return hook

        handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                module.outputs(batch)
        finally:
            module.train(was_training)
            for handle in handles:
                handle.remove()
        return rows

    def project(self, ctx: Context) -> None:
        """G ← G (I − H_oldᵀ H_old) for every protected weight with old rows (hlop.md step 4a), in the gradient
        form or, for a Linear layer where it is cheaper, from projected inputs (``projection``)."""
        for p in self._projectors:
            p.project_()

    def parameters_to_train(self, ctx: Context) -> Iterator[nn.Parameter]:
        frozen: set[int] = set()
        if ctx.experience > 0:
            module = ctx.module
            if self.cfg.freeze_bn:
                frozen |= norm_parameters(module)
            if self.cfg.freeze_thresholds:
                frozen |= {id(p) for m in module.modules() if isinstance(m, SpikingNeuron) for p in m.parameters()}
            if self.cfg.freeze_1d:
                frozen |= {id(p) for p in module.parameters() if p.dim() <= 1}
        return (p for p in ctx.module.parameters() if p.requires_grad and id(p) not in frozen)

    def detach(self, ctx: Context) -> None:
        for handle in self._handles:
            handle.remove()
        for p in self._projectors:
            p.detach()
        self._handles, self._projectors = [], []

    # ---------------------------------------------------------------- task end
    @torch.no_grad()
    def after_experience(self, ctx: Context) -> None:
        """Merge the task's rows (Hebbian) or add the exact ones (SVD), and record the diagnostics."""
        self._diagnostics = {}
        if self.cfg.subspace_method == "hebbian":
            passes = self.extra_passes(ctx)
            self._diagnostics["hebbian_extra_passes"] = float(passes)
            self._hebbian_passes(ctx, passes)
        need_reps = self.cfg.subspace_method == "svd" or self.cfg.diagnose_angles
        reps = self.representations(ctx) if need_reps else {}
        counts = self.rows_for(ctx.experience)
        for name, learner in self.learners.items():
            R = reps.get(name)
            if self.cfg.subspace_method == "svd":
                assert R is not None
                new = self._residual_top(learner, R, min(counts[name], learner.dim - learner.rows))
                learner.weight = torch.cat([learner.weight, new.T.to(learner.weight)])
            elif R is not None and learner.rows > learner.n_old:
                self._compare_to_svd(name, learner, R)
            learner.merge(orthonormalize=self.cfg.orthonormalize)
            eig = learner.projector_eigenvalues()
            self._diagnostics[f"hlop_rows/{name}"] = float(learner.rows)
            self._diagnostics[f"hhT_err/{name}"] = learner.orthonormality_error()
            if eig.numel():
                self._diagnostics[f"proj_eig_max/{name}"] = float(eig.max())
                self._diagnostics[f"proj_eig_min/{name}"] = float(eig.min())
                if float(eig.max()) > 1.1:
                    log.warning("HLOP layer %s: H_oldᵀH_old has an eigenvalue %.3g > 1 (the Hebbian rows have not "
                                "converged; the projection then pushes old directions): consider more iterations "
                                "or a larger η", name, float(eig.max()))

    def extra_passes(self, ctx: Context) -> int:
        """p = ⌈(S − E·n) / n⌉ (0 when E·n ≥ S): the Hebbian-only passes over the task's n training samples that
        bring the samples the rule sees in E training epochs up to S = ``hebbian_samples``."""
        target = self.cfg.hebbian_samples or 0
        n = len(ctx.train_source) if ctx.train_source is not None else 0
        if n == 0 or target <= ctx.epochs * n:
            return 0
        return math.ceil((target - ctx.epochs * n) / n)

    @torch.no_grad()
    def _hebbian_passes(self, ctx: Context, passes: int) -> None:
        """``passes`` more epochs of Oja's subspace rule (Sec. 4.1; hlop.md steps 1, 4b),
        ΔH_new = η · mean_batch[ y_new (x − Hᵀ y)ᵀ ], y = H x over old and new rows (:meth:`HebbianSubspace.step`,
        the same iterations, clamp, η and momentum as in training), over the task's training data, in batches of
        the training batch size and a fresh shuffled order per pass; only the new rows learn. The activity is
        that of the trained network in eval mode (what evaluation sees), as the training hook reads it
        (:meth:`activity`), from one forward pass: without dropout it is the same in every pass. It is kept per
        layer with its residual X − H_oldᵀ H_old X (fixed while H_old is frozen), 2 · n × r × d floats (r rows of
        activity per sample: 1 for a DSR rate, T for per-step activity, the positions of a convolution)."""
        learning = {name: learner for name, learner in self.learners.items() if learner.rows > learner.n_old}
        if passes <= 0 or not learning:
            return
        assert ctx.train_source is not None
        module = ctx.module
        layers = module.protected_layers()
        n = len(ctx.train_source)
        chunks: dict[str, list[Tensor]] = {name: [] for name in learning}
        was_training = module.training
        module.eval()
        try:
            for batch in ctx.train_source.batches(ctx.eval_batch_size, shuffle=False):
                reps = collect_layer_inputs(module, {name: layers[name] for name in learning},
                                            lambda batch=batch: module.outputs(batch),
                                            transform=lambda _layer, a: self.activity(module, a))
                for name, R in reps.items():
                    chunks[name].append(R.T)
        finally:
            module.train(was_training)
        activity, residual = {}, {}
        for name, parts in chunks.items():
            X = torch.cat(parts)
            learner = learning[name]
            activity[name] = X.reshape(n, X.shape[0] // n, X.shape[1])  # sample-major rows (layer_input_matrix)
            residual[name] = learner.residual(X).reshape(activity[name].shape)  # H_old is frozen: formed once
        g = ctx.generator(_PASSES_KEY)
        for _ in range(passes):
            order = torch.randperm(n, generator=g).to(ctx.device)
            for start in range(0, n, ctx.batch_size):
                idx = order[start:start + ctx.batch_size]
                for name, learner in learning.items():
                    learner.step(activity[name][idx].reshape(-1, learner.dim),
                                 residual=residual[name][idx].reshape(-1, learner.dim))

    def _compare_to_svd(self, name: str, learner: HebbianSubspace, R: Tensor) -> None:
        """Principal angles between the new rows' span and the exact top subspace of the same size of the
        residual activity, and the share of the residual's energy the rows capture relative to the exact one."""
        new = learner.basis("new").to(R.device, torch.float64)
        exact = self._residual_top(learner, R, new.shape[1])
        if not (new.shape[1] and exact.shape[1]):
            return
        theta = principal_angles(new, exact).rad2deg()
        old = learner.basis("old").to(R.device, torch.float64)
        res = R.to(torch.float64) - old @ (old.T @ R.to(torch.float64))
        self._diagnostics[f"svd_angle_mean/{name}"] = float(theta.mean())
        self._diagnostics[f"svd_angle_max/{name}"] = float(theta.max())
        self._diagnostics[f"energy_ratio/{name}"] = float((new.T @ res).pow(2).sum() / (exact.T @ res).pow(2).sum())

    @staticmethod
    def _residual_top(learner: HebbianSubspace, R: Tensor, m: int) -> Tensor:
        """The top-m left singular vectors (d × m) of R − P_old R, P_old the projector onto span(H_old)."""
        old = learner.basis("old").to(R.device, torch.float64)
        res = R.to(torch.float64)
        res = res - old @ (old.T @ res)
        U, _ = top_singular(res)
        return U[:, :m]

    def representations(self, ctx: Context) -> dict[str, Tensor]:
        """The activity matrix (d × N) per protected layer on ``samples`` training samples, in eval mode, as the
        Hebbian rule sees it (:meth:`activity`)."""
        assert ctx.train_source is not None
        module = ctx.module
        batch = ctx.train_source.take(self.cfg.samples, ctx.generator(_SAMPLE_KEY))
        was_training = module.training
        module.eval()
        try:
            return collect_layer_inputs(module, module.protected_layers(), lambda: module.outputs(batch),
                                        transform=lambda _layer, a: self.activity(module, a))
        finally:
            module.train(was_training)

    def diagnostics(self) -> dict[str, float]:
        return dict(self._diagnostics)

    def state_dict(self) -> dict[str, Any]:
        return {"learners": {k: v.state_dict() for k, v in self.learners.items()}, "lr_scale": dict(self._lr_scale),
                "diagnostics": dict(self._diagnostics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, s in state["learners"].items():
            self.learners[name].load_state_dict(s)
        self._lr_scale, self._diagnostics = dict(state["lr_scale"]), dict(state["diagnostics"])

