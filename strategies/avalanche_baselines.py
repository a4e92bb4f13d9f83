"""The classic baselines, run by Avalanche's own strategies on clbench's streams, metrics and MLflow layout.

Each registered strategy owns its experience's loop (:meth:`strategies.base.Strategy.train_experience`): it
drives an Avalanche 0.6 ``SupervisedTemplate`` strategy, built once, around clbench's model. The algorithms are
Avalanche's; this module adapts the model, hands over each experience's fresh optimizer, ends every epoch as the
engine does (validation loss, learning-rate schedule, ``on_epoch_end``), and carries what the method's plugin
accumulates across experiences through clbench's checkpoints. Evaluation stays clbench's own; Avalanche's
evaluator has no metric and no logger.

Methods (Avalanche class or plugin; what it does; source):

- ``ewc``: ``EWC`` (``EWCPlugin``). L + λ Σ_{k<t} Σ_i F_k,i (θ_i − θ*_k,i)² (Kirkpatrick et al., PNAS 2017,
  Eq. 3). Avalanche has no ½, and its F is the mean over mini-batches of the squared mini-batch gradient.
- ``si``: ``SynapticIntelligencePlugin`` in a plain template (which is what ``SynapticIntelligence`` is).
  L + (λ/2) Σ_i Ω_i (θ_i − θ*_i)², Ω_i = Σ_k ω_k,i / (Δ_k,i² + ξ), ω = −Σ_steps g·Δθ (Zenke et al., ICML 2017,
  Eqs. 4-5). Avalanche clips Ω at 1e-3; its CPU aliasing bug is fixed here (:func:`_si_plugin_class`).
- ``lwf``: ``LwF`` (``LwFPlugin``). L + α·KL(softmax(y_old/T) ‖ softmax(y/T)) over the previous model's units
  of earlier tasks (Li & Hoiem, TPAMI 2017).
- ``agem``: ``AGEM`` (``AGEMPlugin``). g ← g − (gᵀg_ref / g_refᵀg_ref)·g_ref when gᵀg_ref < 0, g_ref the
  gradient on a memory sample (Chaudhry et al., ICLR 2019, Eq. 11).
- ``gem``: ``GEM`` (``GEMPlugin``). g ← the closest g̃ with ⟨g̃, g_k⟩ ≥ 0 for every past task's memory
  gradient g_k, a QP with margin γ (Lopez-Paz & Ranzato, NeurIPS 2017, Eqs. 10-13).
- ``er``: ``ReplayPlugin`` in a plain template (which is what ``Replay`` is). Every batch = the current batch ∪
  a memory batch (Chaudhry et al., 2019, "On tiny episodic memories"); the memory is a reservoir (ER_Res) or
  balanced over experiences, and is written after each experience (not during it, as ER_Res's is).
- ``avalanche_naive``: ``Naive``. Plain SGD through the same glue: the cross-check of clbench's own loop.

The model adapter: a multi-head clbench classifier is wrapped in an Avalanche ``MultiTaskModule`` (Avalanche
then splits every batch by task label and calls ``forward_single_task``; LwF distils every known head); a
single-head one in a plain module called as ``model(x)``, as Avalanche calls any model without task labels.

Avalanche is imported inside functions only: importing it costs ~10 s, and config checks need none of it.

Avalanche trains with cross-entropy on a classifier's logits, so these refuse any other model; the language models'
versions of EWC, LwF and replay, which go through the model's own loss, are ``ewc_lm``, ``lwf_lm`` and
``replay_lm`` (``strategies/ewc_lm.py``, ``lwf_lm.py``, ``replay_lm.py``), named in the refusal.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from clbench.config import ConfigError, StrategyConfig
from strategies import register
from strategies.base import Strategy

if TYPE_CHECKING:
    from collections.abc import Iterator

    from clbench.context import Context, EpochCallback

# ------------------------------------------------------------------------------------------------ configs


@dataclass
class AvalancheConfig(StrategyConfig):
    """Keys shared by every Avalanche baseline (Avalanche's loop runs the engine's epochs and batch size)."""



def _check(cond: bool, key: str, value: Any, valid: str) -> None:
    if not cond:
        raise ConfigError(f"bad value for 'strategy.{key}': {value}; {valid}")


@dataclass
class EWCConfig(AvalancheConfig):
    """EWC (Avalanche ``EWCPlugin``).

    Attributes:
        ewc_lambda: λ, the weight of the quadratic penalty.
        mode: ``separate`` (one penalty per previous experience, the paper's) or ``online`` (one penalty whose
            importances decay by ``decay_factor`` per experience, Schwarz et al. 2018).
        decay_factor: importance decay of ``online`` mode, in (0, 1]; ignored by ``separate``.
    """

    ewc_lambda: float = 100.0
    mode: str = "separate"
    decay_factor: float | None = None

    def validate(self) -> None:
        super().validate()
        _check(self.ewc_lambda >= 0, "ewc_lambda", self.ewc_lambda, "must be >= 0")
        _check(self.mode in ("separate", "online"), "mode", repr(self.mode), "valid: ['separate', 'online']")
        if self.mode == "online":
            _check(self.decay_factor is not None and 0 < self.decay_factor <= 1, "decay_factor", self.decay_factor,
                   "mode=online needs a decay factor in (0, 1]")


@dataclass
class SIConfig(AvalancheConfig):
    """Synaptic Intelligence (Avalanche ``SynapticIntelligencePlugin``).

    Attributes:
        si_lambda: c, the weight of the surrogate loss (Avalanche multiplies it by ½).
        eps: ξ, the damping term of Ω's denominator.
    """

    si_lambda: float = 300.0
    eps: float = 1e-7

    def validate(self) -> None:
        super().validate()
        _check(self.si_lambda >= 0, "si_lambda", self.si_lambda, "must be >= 0")
        _check(self.eps > 0, "eps", self.eps, "must be > 0")


@dataclass
class LwFConfig(AvalancheConfig):
    """Learning without Forgetting (Avalanche ``LwFPlugin``).

    Attributes:
        alpha: weight of the distillation loss.
        temperature: softmax temperature T of the distillation.
    """

    alpha: float = 1.0
    temperature: float = 2.0

    def validate(self) -> None:
        super().validate()
        _check(self.alpha >= 0, "alpha", self.alpha, "must be >= 0")
        _check(self.temperature > 0, "temperature", self.temperature, "must be > 0")


@dataclass
class AGEMConfig(AvalancheConfig):
    """A-GEM (Avalanche ``AGEMPlugin``).

    Attributes:
        patterns_per_exp: samples of each experience kept in the memory (a random subset).
        sample_size: memory samples of one reference gradient, split evenly over the stored experiences (so it
            must be at least the number of experiences minus one).
    """

    patterns_per_exp: int = 250
    sample_size: int = 256

    def validate(self) -> None:
        super().validate()
        _check(self.patterns_per_exp >= 1, "patterns_per_exp", self.patterns_per_exp, "must be >= 1")
        _check(self.sample_size >= 1, "sample_size", self.sample_size, "must be >= 1")


@dataclass
class GEMConfig(AvalancheConfig):
    """GEM (Avalanche ``GEMPlugin``).

    Attributes:
        patterns_per_exp: samples of each experience kept in the memory (the first ones of a shuffled pass).
        memory_strength: γ, the margin added to the QP's constraints (favours backward transfer).
    """

    patterns_per_exp: int = 256
    memory_strength: float = 0.5

    def validate(self) -> None:
        super().validate()
        _check(self.patterns_per_exp >= 1, "patterns_per_exp", self.patterns_per_exp, "must be >= 1")
        _check(self.memory_strength >= 0, "memory_strength", self.memory_strength, "must be >= 0")


@dataclass
class ERConfig(AvalancheConfig):
    """Experience replay (Avalanche ``ReplayPlugin``).

    Attributes:
        patterns_per_exp: memory per experience; the memory holds ``patterns_per_exp × n_experiences`` samples.
        batch_size_mem: memory samples appended to every batch (null: the training batch size).
        storage: ``reservoir`` (one reservoir over every sample seen, ER_Res; Avalanche's
            ``ReservoirSamplingBuffer``) or ``balanced`` (the memory split evenly over the experiences seen so
            far; Avalanche's ``ExperienceBalancedBuffer``, the default of its ``Replay``).
    """

    patterns_per_exp: int = 250
    batch_size_mem: int | None = None
    storage: str = "reservoir"

    def validate(self) -> None:
        super().validate()
        _check(self.patterns_per_exp >= 1, "patterns_per_exp", self.patterns_per_exp, "must be >= 1")
        _check(self.batch_size_mem is None or self.batch_size_mem >= 1, "batch_size_mem", self.batch_size_mem,
               "must be >= 1 or null (the training batch size)")
        _check(self.storage in ("reservoir", "balanced"), "storage", repr(self.storage),
               "valid: ['reservoir', 'balanced']")


# -------------------------------------------------------------------------------------- Avalanche glue


class _SingleHead(nn.Module):
    """Avalanche's task-free path ``model(x)`` for a single-head classifier (which ignores its task labels)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the shared head; the task labels the clbench model asks for are zeros, unused."""
        return self.net(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))


@functools.cache
def _multi_head_class() -> type[nn.Module]:
    """An Avalanche ``MultiTaskModule`` around a multi-head classifier (built on first use: it imports Avalanche).

    Avalanche's ``forward(x, task_labels)`` splits the batch by task, calls :meth:`forward_single_task` per task
    and pads the logits to ``max_class_label`` columns; ``forward(x, None)`` returns every known task's logits.
    """
    from avalanche.models import MultiTaskModule

    class MultiHead(MultiTaskModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
            """Logits of head ``task_label``."""
            t = torch.full((x.shape[0],), int(task_label), dtype=torch.long, device=x.device)
            return self.net(x, t)

        def forward(self, x: torch.Tensor, task_labels: Any) -> Any:
            """Avalanche's layout (each sample's head logits in the first columns of a ``max_class_label``-wide
            row of zeros), with the shared trunk run once on the whole batch: Avalanche splits a batch mixing
            tasks (ER's replayed samples) before the trunk, so its batch-norm layers would see one sub-batch per
            task, with other statistics than the whole batch, and fail on a task with a single sample."""
            if task_labels is None or isinstance(task_labels, int):
                return super().forward(x, task_labels)
            h = self.net.features(x)
            out = h.new_zeros(x.shape[0], self.max_class_label)
            for task in torch.unique(task_labels).tolist():
                mask = task_labels == task
                logits = self.net.heads[task](h[mask])
                out[mask, : logits.shape[1]] = logits
            return out

    return MultiHead


def _keep_optimizer(self: Any, **kwargs: Any) -> None:
    """Keep the optimizer as clbench built it for the experience (``Engine.optimizer`` over the strategy's
    ``parameters_to_train``); Avalanche's own re-mapping would add any parameter it does not hold."""


@functools.cache
def _template(cls: type) -> type:
    """Avalanche strategy class ``cls`` with :func:`_keep_optimizer` as its ``make_optimizer``."""
    return type(cls.__name__, (cls,), {"make_optimizer": _keep_optimizer, "__module__": __name__})


class _EpochEnd:
    """An Avalanche plugin (Avalanche calls whichever ``before_*``/``after_*`` callbacks a plugin defines) that
    ends each epoch as clbench's engine does: the validation loss (when the stream has a validation split), the
    experience's learning-rate schedule (``ctx.schedule.step``; when it says stop, Avalanche's ``stop_training``
    ends the experience before the next epoch), then ``on_epoch_end(epoch, mean_loss, {"lr", "valid_loss"})``;
    at the experience's end, the schedule's best weights.

    The loss is Avalanche's ``strategy.loss`` after backward: the task loss plus whatever the method's plugin
    added in ``before_backward`` (EWC's, SI's, LwF's penalties), as the engine reports loss + penalty.
    """

    def __init__(self) -> None:
        self.ctx: Context | None = None
        self.callback: EpochCallback | None = None
        self._epoch = 0
        self._total: torch.Tensor | None = None
        self._steps = 0

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._epoch = 0

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self._total, self._steps = None, 0

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        loss = strategy.loss.detach().sum()  # summed on the device, read once per epoch
        self._total = loss if self._total is None else self._total + loss
        self._steps += 1

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        ctx = self.ctx
        assert ctx is not None and self.callback is not None
        mean = float(self._total) / self._steps if self._total is not None else float("nan")
        assert ctx.trainer is not None
        valid = ctx.trainer.validation_loss(ctx)
        if ctx.schedule is not None:
            if ctx.schedule.step(self._epoch, mean, valid).stop:
                strategy.stop_training()
            lr = ctx.schedule.lr
        else:
            lr = float(strategy.optimizer.param_groups[0]["lr"])
        self.callback(self._epoch, mean, {"lr": lr} | ({} if valid is None else {"valid_loss": valid}))
        self._epoch += 1

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """Restore the schedule's best-validation weights (plateau; a no-op otherwise) before the method's plugin
        takes its end-of-experience state (this plugin comes first in the list), as the engine restores them
        before ``after_experience``."""
        if self.ctx is not None and self.ctx.schedule is not None:
            self.ctx.schedule.restore_best()


@contextlib.contextmanager
def _without_avalanche_deprecations() -> Iterator[None]:
    """Drop the deprecation warnings Avalanche raises about its own internals (``ReplayPlugin`` calls its storage
    policy's deprecated ``update``; the decorator also sets a process-wide "once" filter, kept inside this
    context); every other warning is re-issued as is."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for w in caught:
        if not (issubclass(w.category, DeprecationWarning) and "/avalanche/" in w.filename.replace("\\", "/")):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A memory dataset as CPU tensors ``(x, y, t)`` in its own order (read from the backing tensors: no RNG)."""
    from clbench.streams.batches import materialise

    return materialise(dataset, "cpu")


def _dataset(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> Any:
    """An Avalanche dataset yielding ``(x[i], y[i], t[i])`` like the streams' own (same sample types)."""
    from avalanche.benchmarks.utils import DataAttribute, TaskAwareSupervisedClassificationDataset, TaskLabels

    from clbench.streams.core import TensorSamples

    return TaskAwareSupervisedClassificationDataset(
        [TensorSamples(x, y)], data_attributes=[DataAttribute(y.tolist(), "targets"), TaskLabels(t.tolist())])


def _pack(obj: Any) -> Any:
    """``obj`` (nested dicts / lists / tuples of Avalanche ``ParamData`` and tensors) with every tensor copied to
    the CPU and every ``ParamData`` as a plain dict: picklable, device-free."""
    from avalanche.training.utils import ParamData

    if isinstance(obj, ParamData):
        return {"__param_data__": obj.name, "data": obj.data.detach().cpu().clone(), "on_cpu": obj.device.type == "cpu"}
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_pack(v) for v in obj]
    return obj


def _unpack(obj: Any, device: torch.device) -> Any:
    """Inverse of :func:`_pack`: ``ParamData`` back on the CPU if they lived there, else on ``device``."""
    from avalanche.training.utils import ParamData

    if isinstance(obj, dict) and "__param_data__" in obj:
        dev = torch.device("cpu") if obj["on_cpu"] else device
        return ParamData(obj["__param_data__"], init_tensor=obj["data"].to(dev), device=dev)
    if isinstance(obj, dict):
        return {k: _unpack(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, device) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------- the base class


class AvalancheStrategy(Strategy):
    """Runs an Avalanche strategy as clbench's loop of experience ``ctx.experience``.

    Built at the first :meth:`train_experience` (lazily: resumed runs build it in their first experience too)
    around ``ctx.module`` on ``ctx.device``; each experience hands it that experience's fresh optimizer, the
    engine's batch size and epochs, and sets its clock's experience counter to ``ctx.experience``
    (the plugins index their per-experience state by it). Subclasses say which Avalanche strategy to build
    (:meth:`make`) and how to export / import what its plugin accumulates (:meth:`export_state`,
    :meth:`import_state`), so that a run killed between experiences resumes to the same accuracy matrix.
    """

    config_class: ClassVar[type[StrategyConfig]] = AvalancheConfig
    cfg: AvalancheConfig
    plugin_class: ClassVar[str | None] = None
    """Name of the method's plugin class in ``avalanche.training.plugins`` (None: no plugin state)."""
    lm_variant: ClassVar[str | None] = None
    """The strategy that runs the same method through the model's own loss, on language models too (None: none)."""

    def __init__(self, cfg: AvalancheConfig) -> None:
        super().__init__(cfg)
        self._template: Any = None
        self._adapter: nn.Module | None = None
        self._plugin: Any = None
        self._epoch_end = _EpochEnd()
        self._pending: dict[str, Any] | None = None
        self._device = torch.device("cpu")

    # -- what a method defines

    def make(self, training: Any, common: dict[str, Any], ctx: Context) -> Any:
        """Build the Avalanche strategy from module ``avalanche.training`` with the keyword arguments
        ``common`` (model, optimizer, criterion, sizes, device, plugins, evaluator) and the method's keys."""
        return training.Naive(**common)

    def export_state(self) -> dict[str, Any]:
        """What the method's plugin accumulated across experiences, on the CPU."""
        return {}

    def import_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`export_state`'s output into the freshly built plugin."""

    def check(self, ctx: Context) -> None:
        """Method-specific checks against the stream (raise :class:`ConfigError`)."""

    # -- the hooks

    def setup(self, ctx: Context) -> None:
        """Refuse what Avalanche's loop cannot honour, before anything is logged."""
        from lightning.fabric.plugins.precision import Precision

        from clbench.models.base import Classifier

        if not isinstance(ctx.module, Classifier):
            hint = (f"strategy={self.lm_variant} runs {self.name} through the model's own loss" if self.lm_variant
                    else "strategy=ewc_lm, lwf_lm and replay_lm run EWC, LwF and replay through the model's own loss")
            raise ConfigError(f"model {type(ctx.module).__name__} is not a classifier (model.name); Avalanche's "
                              f"baselines train with cross-entropy on a Classifier's logits; for a language model, "
                              f"{hint}")
        if type(ctx.fabric.strategy.precision) is not Precision or ctx.fabric.world_size != 1:
            raise ConfigError("bad value for 'engine.precision' / 'engine.devices': Avalanche's loop trains in full "
                              "precision on one device; valid: engine.precision=32-true, engine.devices=1")
        self._device = ctx.device
        self.check(ctx)

    def train_experience(self, ctx: Context, on_epoch_end: EpochCallback) -> None:
        """Train experience ``ctx.experience`` with the Avalanche strategy (its ``train`` on the experience),
        reporting every epoch's mean loss through ``on_epoch_end``."""
        template = self._build(ctx)
        template.optimizer = getattr(ctx.optimizer, "optimizer", ctx.optimizer)
        template.train_epochs = ctx.epochs
        template.train_mb_size = ctx.batch_size
        template.clock.train_exp_counter = ctx.experience
        self._epoch_end.ctx, self._epoch_end.callback = ctx, on_epoch_end
        try:
            with _without_avalanche_deprecations():
                template.train(ctx.stream.benchmark.train_stream[ctx.experience], eval_streams=[])
        finally:
            self._epoch_end.ctx = self._epoch_end.callback = None

    def state_dict(self) -> dict[str, Any]:
        """The plugin's accumulated state and the adapter's known task labels (on the CPU)."""
        if self._template is None:
            return dict(self._pending or {})
        state: dict[str, Any] = {"plugin": self.export_state()}
        if hasattr(self._adapter, "known_train_tasks_labels"):
            state["adapter"] = {"known_tasks": sorted(self._adapter.known_train_tasks_labels),
                                "max_class_label": int(self._adapter.max_class_label)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep ``state`` until the Avalanche strategy exists (or restore it now if it does)."""
        self._pending = dict(state) if state else None
        if self._template is not None and self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    def diagnostics(self) -> dict[str, float]:
        """Samples in the method's memory, for the replay family."""
        size = self.memory_size()
        return {} if size is None else {"memory/samples": float(size)}

    def memory_size(self) -> int | None:
        """Samples held in memory (None: the method keeps none)."""
        return None

    # -- internals

    def _build(self, ctx: Context) -> Any:
        if self._template is not None:
            return self._template
        from avalanche import training
        from avalanche.training.plugins import EvaluationPlugin

        module = ctx.module
        self._adapter = _multi_head_class()(module) if getattr(module, "multi_head", False) else _SingleHead(module)
        with warnings.catch_warnings():  # "No loggers specified": intended, clbench evaluates and logs
            warnings.simplefilter("ignore", UserWarning)
            evaluator = EvaluationPlugin(loggers=[])
        common = {"model": self._adapter, "optimizer": getattr(ctx.optimizer, "optimizer", ctx.optimizer),
                  "criterion": nn.CrossEntropyLoss(), "train_mb_size": ctx.batch_size, "train_epochs": ctx.epochs,
                  "eval_mb_size": ctx.batch_size, "device": ctx.device, "plugins": [self._epoch_end],
                  "evaluator": evaluator, "eval_every": -1}
        self._template = self.make(_TemplateModule(training), common, ctx)
        if self.plugin_class is not None:
            from avalanche.training import plugins

            cls = getattr(plugins, self.plugin_class)
            self._plugin = next(p for p in self._template.plugins if isinstance(p, cls))
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        return self._template

    def _restore(self, state: dict[str, Any]) -> None:
        adapter = state.get("adapter")
        if adapter is not None and hasattr(self._adapter, "known_train_tasks_labels"):
            self._adapter.known_train_tasks_labels = set(adapter["known_tasks"])
            self._adapter.max_class_label = adapter["max_class_label"]
        if state.get("plugin"):
            self.import_state(state["plugin"])


class _TemplateModule:
    """``avalanche.training`` whose strategy classes keep clbench's optimizer (see :func:`_template`)."""

    def __init__(self, training: Any) -> None:
        self._training = training

    def __getattr__(self, name: str) -> Any:
        return _template(getattr(self._training, name))


# ------------------------------------------------------------------------------------------------ methods


@register("avalanche_naive")
class AvalancheNaive(AvalancheStrategy):
    """Avalanche's ``Naive`` (plain fine-tuning) through the adapter: cross-checks clbench's ``naive`` loop."""

    config_class = AvalancheConfig


@register("ewc")
class EWC(AvalancheStrategy):
    """Elastic Weight Consolidation: Avalanche's ``EWC``; the state is the saved parameters θ*_k and the
    importances F_k of every past experience."""

    config_class = EWCConfig
    cfg: EWCConfig
    plugin_class = "EWCPlugin"
    lm_variant = "ewc_lm"

    def make(self, training: Any, common: dict[str, Any], ctx: Context) -> Any:
        c = self.cfg
        return training.EWC(ewc_lambda=c.ewc_lambda, mode=c.mode,
                            decay_factor=c.decay_factor if c.mode == "online" else None, **common)

    def export_state(self) -> dict[str, Any]:
        return {"saved_params": _pack(dict(self._plugin.saved_params)),
                "importances": _pack(dict(self._plugin.importances))}

    def import_state(self, state: dict[str, Any]) -> None:
        self._plugin.saved_params = defaultdict(dict, _unpack(state["saved_params"], self._device))
        self._plugin.importances = defaultdict(dict, _unpack(state["importances"], self._device))


@functools.cache
def _si_plugin_class() -> type:
    """Avalanche's ``SynapticIntelligencePlugin`` with its weight snapshots owned, not aliased.

    The plugin snapshots weights as ``param.detach().cpu().flatten()``: on a GPU a copy, on the CPU a *view* of
    the live parameter. On the CPU the snapshot θ_old taken before a step then moves with the step, so every
    ω = −g·(θ_new − θ_old) is 0, and θ* (taken at the experience start) follows the weights, so the penalty is
    0 too: Avalanche 0.6's SI is plain fine-tuning on the CPU. This subclass copies the two snapshots that must
    outlive a step (θ_old per iteration, θ* per experience) right after the plugin takes them; the algorithm is
    the plugin's, unchanged.
    """
    from avalanche.training.plugins import SynapticIntelligencePlugin

    def own(params: dict[str, Any]) -> None:
        for pd in params.values():
            pd.data = pd.data.clone()

    class OwnedSnapshotsSI(SynapticIntelligencePlugin):
        def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            super().before_training_exp(strategy, **kwargs)
            own(self.ewc_data[0])

        def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            super().before_training_iteration(strategy, **kwargs)
            own(self.syn_data["old_theta"])

    return OwnedSnapshotsSI


@register("si")
class SI(AvalancheStrategy):
    """Synaptic Intelligence: Avalanche's ``SynapticIntelligencePlugin`` in a plain ``Naive`` template (which is
    what its ``SynapticIntelligence`` strategy is), with the CPU aliasing fix of :func:`_si_plugin_class`. The
    state is θ* and Ω (``ewc_data``) and the path-integral accumulators (``syn_data``)."""

    config_class = SIConfig
    cfg: SIConfig
    plugin_class = "SynapticIntelligencePlugin"

    def make(self, training: Any, common: dict[str, Any], ctx: Context) -> Any:
        si = _si_plugin_class()(si_lambda=self.cfg.si_lambda, eps=self.cfg.eps)
        return training.Naive(**(common | {"plugins": [*common["plugins"], si]}))

    def export_state(self) -> dict[str, Any]:
        return {"ewc_data": _pack(list(self._plugin.ewc_data)), "syn_data": _pack(self._plugin.syn_data)}

    def import_state(self, state: dict[str, Any]) -> None:
        self._plugin.ewc_data = tuple(_unpack(state["ewc_data"], self._device))
        self._plugin.syn_data = _unpack(state["syn_data"], self._device)


@register("lwf")
class LwF(AvalancheStrategy):
    """Learning without Forgetting: Avalanche's ``LwF``; the state is the previous model (the teacher), the
    experience count and the classes of each earlier task."""

    config_class = LwFConfig
    cfg: LwFConfig
    plugin_class = "LwFPlugin"
    lm_variant = "lwf_lm"

    def make(self, training: Any, common: dict[str, Any], ctx: Context) -> Any:
        return training.LwF(alpha=self.cfg.alpha, temperature=self.cfg.temperature, **common)

    def export_state(self) -> dict[str, Any]:
        lwf = self._plugin.lwf
        prev = lwf.prev_model
        state: dict[str, Any] = {"expcount": lwf.expcount,
                                 "prev_classes_by_task": {k: sorted(v) for k, v in lwf.prev_classes_by_task.items()},
                                 "prev_model": None}
        if prev is not None:
            state["prev_model"] = {k: v.detach().cpu().clone() for k, v in prev.state_dict().items()}
            state["prev_training"] = prev.training
            if hasattr(prev, "known_train_tasks_labels"):
                state["prev_known_tasks"] = sorted(prev.known_train_tasks_labels)
                state["prev_max_class_label"] = int(prev.max_class_label)
        return state

    def import_state(self, state: dict[str, Any]) -> None:
        lwf = self._plugin.lwf
        lwf.expcount = state["expcount"]
        lwf.prev_classes_by_task = defaultdict(set, {k: set(v) for k, v in state["prev_classes_by_task"].items()})
        if state["prev_model"] is None:
            lwf.prev_model = None
            return
        prev = copy.deepcopy(self._adapter)  # the teacher is a copy of the model (as LwF's post_adapt makes it)
        prev.load_state_dict(state["prev_model"])
        prev.train(state["prev_training"])
        if "prev_known_tasks" in state:
            prev.known_train_tasks_labels = set(state["prev_known_tasks"])
            prev.max_class_label = state["prev_max_class_label"]
        lwf.prev_model = prev


@register("agem")
class AGEM(AvalancheStrategy):
    """Averaged GEM: Avalanche's ``AGEM``; the state is the memory (one random subset per experience)."""

    config_class = AGEMConfig
    cfg: AGEMConfig
    plugin_class = "AGEMPlugin"

    def check(self, ctx: Context) -> None:
        past = ctx.n_experiences - 1  # the reference batch takes sample_size // (stored experiences) from each
        _check(self.cfg.sample_size >= past, "sample_size", self.cfg.sample_size,
               f"must be >= {past} (one sample from each of the {past} stored experiences)")

    def make(self, training: Any, common: dict[str, Any], ctx: Context) -> Any:
        return training.AGEM(patterns_per_exp=self.cfg.patterns_per_exp, sample_size=self.cfg.sample_size, **common)

    def export_state(self) -> dict[str, Any]:
        return {"buffers": [_tensors(b) for b in self._plugin.buffers]}

    def import_state(self, state: dict[str, Any]) -> None:
        """Replays A-GEM's own ``update_memory`` with the stored buffers, in order: each holds at most
        ``patterns_per_exp`` samples, so it is stored as is (no shuffle) and the loader is rebuilt as A-GEM's."""
        self._plugin.buffers = []
        for x, y, t in state["buffers"]:
            self._plugin.update_memory(_dataset(x, y, t))

    def memory_size(self) -> int | None:
        return sum(len(b) for b in self._plugin.buffers) if self._plugin is not None else 0


@register("gem")
class GEM(AvalancheStrategy):
    """Gradient Episodic Memory: Avalanche's ``GEM`` (QP by ``qpsolvers``' quadprog); the state is the memory."""

    config_class = GEMConfig
    cfg: GEMConfig
    plugin_class = "GEMPlugin"

    def make(self, training: Any, common: dict[str, Any], ctx: Context) -> Any:
        return training.GEM(patterns_per_exp=self.cfg.patterns_per_exp, memory_strength=self.cfg.memory_strength,
                            **common)

    def export_state(self) -> dict[str, Any]:
        p = self._plugin
        return {"x": _pack(p.memory_x), "y": _pack(p.memory_y), "tid": _pack(p.memory_tid)}

    def import_state(self, state: dict[str, Any]) -> None:
        p = self._plugin
        p.memory_x, p.memory_y, p.memory_tid = dict(state["x"]), dict(state["y"]), dict(state["tid"])

    def memory_size(self) -> int | None:
        return sum(len(v) for v in self._plugin.memory_y.values()) if self._plugin is not None else 0


@register("er")
class ER(AvalancheStrategy):
    """Experience replay: Avalanche's ``ReplayPlugin`` in a plain ``Naive`` template (which is what its
    ``Replay`` strategy is; built here to choose the storage policy and the memory batch). The state is the
    storage policy's buffers (samples and reservoir weights)."""

    config_class = ERConfig
    cfg: ERConfig
    plugin_class = "ReplayPlugin"
    lm_variant = "replay_lm"

    def make(self, training: Any, common: dict[str, Any], ctx: Context) -> Any:
        from avalanche.training.plugins import ReplayPlugin
        from avalanche.training.storage_policy import ExperienceBalancedBuffer, ReservoirSamplingBuffer

        total = self.cfg.patterns_per_exp * ctx.n_experiences
        policy = (ReservoirSamplingBuffer(total) if self.cfg.storage == "reservoir"
                  else ExperienceBalancedBuffer(total, adaptive_size=True))
        replay = ReplayPlugin(mem_size=total, batch_size_mem=self.cfg.batch_size_mem, storage_policy=policy)
        return training.Naive(**(common | {"plugins": [*common["plugins"], replay]}))

    @staticmethod
    def _export_reservoir(buffer: Any) -> dict[str, Any]:
        return {"max_size": buffer.max_size, "weights": buffer._buffer_weights.clone(),
                "data": _tensors(buffer.buffer) if len(buffer.buffer) else None}

    @staticmethod
    def _import_reservoir(state: dict[str, Any]) -> Any:
        from avalanche.training.storage_policy import ReservoirSamplingBuffer

        buffer = ReservoirSamplingBuffer(state["max_size"])
        if state["data"] is not None:
            buffer.buffer = _dataset(*state["data"])
        buffer._buffer_weights = state["weights"]
        return buffer

    def export_state(self) -> dict[str, Any]:
        policy = self._plugin.storage_policy
        if self.cfg.storage == "reservoir":
            return {"reservoir": self._export_reservoir(policy)}
        return {"num_exps": policy._num_exps,
                "groups": {k: self._export_reservoir(g) for k, g in policy.buffer_groups.items()}}

    def import_state(self, state: dict[str, Any]) -> None:
        if self.cfg.storage == "reservoir":
            self._plugin.storage_policy = self._import_reservoir(state["reservoir"])
            return
        policy = self._plugin.storage_policy
        policy._num_exps = state["num_exps"]
        policy.buffer_groups = {k: self._import_reservoir(g) for k, g in state["groups"].items()}

    def memory_size(self) -> int | None:
        return len(self._plugin.storage_policy.buffer) if self._plugin is not None else 0
