"""Spiking networks in plain torch (HLOP, Xiao et al. ICLR 2024; hlop.md "Spiking network details").

Activity layout: (B, T, n), samples first and time second, so that dim 0 always counts samples (what
:func:`~clbench.subspace.inputs.collect_layer_inputs` limits) and a Linear layer acts on every time step at once.

Neurons (``kind``):

* ``"dsr"`` — the LIF neuron trained with DSR (differentiation on spike representation; Meng et al. CVPR 2022)
  behind all of HLOP's main results. Forward, per step t = 1..T, with β = exp(−Δt/τ)::

      u_t = β u_{t−1} + (1 − β) I_t;   fire if u_t ≥ a·V_th (a = 0.3);   u_t ← u_t − V_th on a spike;
      s_t = V_th/Δt on a spike, else 0.

  The weighted firing rate of a sequence z is r(z) = Σ_t w_t z_t / Σ_t w_t, w_t = exp(−(T − t)Δt/τ). The
  backward (no surrogate) treats the layer as r_out = clamp(r_in/τ, 0, V_th/Δt), r_in = r(I):

      ∂L/∂I_t = (1/τ)·r(∂L/∂s)·1[0 < r_in < τV_th/Δt]            (the same for every t)
      ∂L/∂V_th = Δt·Σ_{samples, neurons} T·r(∂L/∂s)·1[r_in > τV_th/Δt]   (as the official code writes it)

  V_th is trainable (init 0.3) and clamped to ≥ 5e-4 before every forward; τ = 1, Δt = 0.05; readout = the
  weighted rate. The firing rule (fire at 0.3·V_th, subtract V_th) is intentional (hlop.md "Pitfalls").
* ``"bptt"`` — the LIF neuron of HLOP's BPTT+SG variant (Table 1, PMNIST): v_t = (1 − 1/τ) v_{t−1} + I_t
  (τ = 2), s_t = H(v_t − V_th) ∈ {0, 1} (V_th = 1), soft reset v_t ← v_t − s_t V_th through a detached s_t;
  backward through time with the sigmoid surrogate ∂s/∂v = α σ(α(v − V_th))(1 − σ(α(v − V_th))), α = 4;
  readout = the plain mean over time. OTTT (per-step losses and optimizer-free traces) is not built: it needs its
  own loop (one backward per time step), which the engine's one-backward-per-batch loop does not provide.

Input encoding is direct: the (normalised) sample is the input current source at every step.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from clbench.config import check
from clbench.models.base import Classifier, ClassifierConfig

__all__ = ["NEURONS", "BPTTNeuron", "DSRNeuron", "SpikingClassifier", "SpikingMLP", "SpikingNeuron", "TimeSharedLinear",
           "make_neuron", "time_weights", "weighted_rate"]

NEURONS = ("dsr", "bptt")


def time_weights(steps: int, dt: float, tau: float, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """DSR's weights w_t = exp(−(T − t)Δt/τ) for t = 1..T (the last step weighs 1)."""
    t = torch.arange(1, steps + 1, device=device, dtype=torch.float64)
    return torch.exp(-(steps - t) * dt / tau).to(dtype)


@functools.lru_cache(maxsize=64)
def _normalised_weights(steps: int, dt: float, tau: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    w = time_weights(steps, dt, tau, device, torch.float64)
    return (w / w.sum()).to(dtype)


def weighted_rate(z: Tensor, dt: float, tau: float) -> Tensor:
    """r(z) = Σ_t w_t z_t / Σ_t w_t over dim 1 of z (B, T, …): DSR's weighted firing rate."""
    w = _normalised_weights(z.shape[1], dt, tau, z.device, z.dtype)
    return (z * w.view(1, -1, *([1] * (z.dim() - 2)))).sum(dim=1)


class _DSRFunction(torch.autograd.Function):
    """The DSR LIF layer on currents I (B, T, n): spikes forward, the rate-coded gradient backward."""

    @staticmethod
    def forward(ctx: Any, current: Tensor, v_th: Tensor, tau: float, dt: float, fire_at: float) -> Tensor:
        beta = math.exp(-dt / tau)
        vth = v_th.to(current.dtype)
        u = torch.zeros_like(current[:, 0])
        spikes = []
        for t in range(current.shape[1]):
            u = beta * u + (1.0 - beta) * current[:, t]
            s = (u >= fire_at * vth).to(current.dtype) * vth
            u = u - s
            spikes.append(s / dt)
        # a copy of V_th: the next forward's in-place clamp must not invalidate this graph
        ctx.save_for_backward(weighted_rate(current, dt, tau), v_th.detach().clone())
        ctx.tau, ctx.dt, ctx.steps = tau, dt, current.shape[1]
        return torch.stack(spikes, dim=1)

    @staticmethod
    def backward(ctx: Any, grad_spikes: Tensor) -> tuple[Tensor | None, ...]:
        rate_in, v_th = ctx.saved_tensors
        tau, dt, steps = ctx.tau, ctx.dt, ctx.steps
        grad_rate = weighted_rate(grad_spikes, dt, tau)  # r(∂L/∂s), (B, n)
        bound = tau * v_th.to(rate_in.dtype) / dt
        grad_current = grad_v_th = None
        if ctx.needs_input_grad[0]:
            inside = (rate_in > 0) & (rate_in < bound)
            per_step = torch.where(inside, grad_rate / tau, torch.zeros_like(grad_rate))
            grad_current = per_step.unsqueeze(1).expand(-1, steps, *per_step.shape[1:])
        if ctx.needs_input_grad[1]:
            above = rate_in > bound
            grad_v_th = (dt * steps * torch.where(above, grad_rate, torch.zeros_like(grad_rate)).sum()).to(v_th.dtype)
            grad_v_th = grad_v_th.reshape(v_th.shape)
        return grad_current, grad_v_th, None, None, None


class _TimeSharedLinearFn(torch.autograd.Function):
    """y_t = W x_t (no bias) over x (B, T, d), whose backward uses a gradient that is the same at every step.

    A DSR neuron's backward hands its input current one gradient δ (B, out) for every step (an expanded tensor,
    stride 0 over T: :class:`_DSRFunction`). Then ∂L/∂W = Σ_t δᵀ x_t = δᵀ (Σ_t x_t) and ∂L/∂x_t = δ W for every t:
    B·out·d multiply-adds each instead of autograd's B·T·out·d. Any other gradient takes the general route."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        shared = grad.stride(1) == 0
        delta = grad[:, 0] if shared else grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (delta @ weight).unsqueeze(1).expand_as(x) if shared else (grad @ weight)
        if ctx.needs_input_grad[1]:
            grad_w = delta.T @ (x.sum(1) if shared else x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w


class TimeSharedLinear(nn.Linear):
    """A bias-free ``nn.Linear`` over spikes (B, T, d) whose backward is T times cheaper when the gradient of its
    output is the same at every step, as under DSR (:class:`_TimeSharedLinearFn`); the same gradients as
    ``nn.Linear`` up to float rounding (the sum over steps is taken in another order). A module of its own, so
    hooks (HLOP's Hebbian step, GPM's activity records) and projections see an ``nn.Linear``."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or self.bias is not None:
            return super().forward(x)
        return _TimeSharedLinearFn.apply(x, self.weight)


class _SigmoidSpike(torch.autograd.Function):
    """Heaviside step s = 1[x ≥ 0] with the sigmoid surrogate ∂s/∂x = α σ(αx)(1 − σ(αx))."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        sig = torch.sigmoid(ctx.alpha * x)
        return grad * ctx.alpha * sig * (1.0 - sig), None


class SpikingNeuron(nn.Module):
    """A layer of spiking neurons: currents (B, T, n) → spikes (B, T, n); :meth:`rate` is its readout."""

    def rate(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The firing rate over time (dim 1) of a sequence z (B, T, …) that this neuron type reads out."""
        raise NotImplementedError


class DSRNeuron(SpikingNeuron):
    """DSR LIF neurons (see the module docstring), one threshold V_th shared by the layer.

    Args:
        tau: τ (code: 1). dt: Δt (0.05). v_th: initial V_th (0.3). fire_at: a, fire when u ≥ a·V_th (0.3).
        v_th_min: lower bound of V_th, applied before every forward (5e-4). train_v_th: V_th is a parameter
            (a 0-d ``v_th``; else a buffer).
    """

    def __init__(self, tau: float = 1.0, dt: float = 0.05, v_th: float = 0.3, fire_at: float = 0.3,
                 v_th_min: float = 5e-4, train_v_th: bool = True) -> None:
        super().__init__()
        self.tau, self.dt, self.fire_at, self.v_th_min = tau, dt, fire_at, v_th_min
        value = torch.tensor(float(v_th))
        if train_v_th:
            self.v_th = nn.Parameter(value)
        else:
            self.register_buffer("v_th", value)

    def forward(self, current: Tensor) -> Tensor:
        with torch.no_grad():
            self.v_th.clamp_(min=self.v_th_min)
        return _DSRFunction.apply(current, self.v_th, self.tau, self.dt, self.fire_at)

    def rate(self, z: Tensor) -> Tensor:
        return weighted_rate(z, self.dt, self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, dt={self.dt}, fire_at={self.fire_at}, v_th_min={self.v_th_min}"


class BPTTNeuron(SpikingNeuron):
    """LIF neurons for BPTT with a sigmoid surrogate (see the module docstring).

    Args:
        tau: τ ≥ 1, the leak v ← (1 − 1/τ) v (code: 2). v_th: the fixed threshold (1). alpha: the surrogate's
            steepness α (4).
    """

    def __init__(self, tau: float = 2.0, v_th: float = 1.0, alpha: float = 4.0) -> None:
        super().__init__()
        if tau < 1:
            raise ValueError(f"BPTTNeuron: tau must be >= 1 (the leak is 1 - 1/tau), got {tau}")
        self.tau, self.v_th, self.alpha = tau, v_th, alpha

    def forward(self, current: Tensor) -> Tensor:
        decay = 1.0 - 1.0 / self.tau
        v = torch.zeros_like(current[:, 0])
        spikes = []
        for t in range(current.shape[1]):
            v = decay * v + current[:, t]
            s = _SigmoidSpike.apply(v - self.v_th, self.alpha)
            v = v - s.detach() * self.v_th
            spikes.append(s)
        return torch.stack(spikes, dim=1)

    def rate(self, z: Tensor) -> Tensor:
        return z.mean(dim=1)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, v_th={self.v_th}, alpha={self.alpha}"


def make_neuron(kind: str, tau: float | None = None, v_th: float | None = None, dt: float = 0.05,
                fire_at: float = 0.3, v_th_min: float = 5e-4, train_v_th: bool = True,
                surrogate_alpha: float = 4.0) -> SpikingNeuron:
    """A neuron layer of ``kind`` (:data:`NEURONS`); ``tau`` / ``v_th`` = ``None`` take the kind's paper value
    (DSR τ = 1, V_th = 0.3; BPTT τ = 2, V_th = 1). ``dt``, ``fire_at``, ``v_th_min``, ``train_v_th`` concern DSR
    only, ``surrogate_alpha`` BPTT only."""
    if kind == "dsr":
        return DSRNeuron(tau=1.0 if tau is None else tau, dt=dt, v_th=0.3 if v_th is None else v_th,
                         fire_at=fire_at, v_th_min=v_th_min, train_v_th=train_v_th)
    if kind == "bptt":
        return BPTTNeuron(tau=2.0 if tau is None else tau, v_th=1.0 if v_th is None else v_th,
                          alpha=surrogate_alpha)
    raise ValueError(f"unknown neuron kind {kind!r}; valid: {list(NEURONS)}")


@dataclass
class SpikingConfig(ClassifierConfig):
    """Keys of every spiking net (HLOP's).

    Attributes:
        time_steps: T, the simulated time steps per sample (HLOP: 20 under DSR, 6 under BPTT).
        neuron: ``dsr`` (LIF trained by DSR, HLOP's main results) or ``bptt`` (LIF, BPTT with a sigmoid
            surrogate).
        tau: the membrane time constant τ; null = the neuron's paper value (DSR 1, BPTT 2).
        v_th: the (initial) threshold V_th; null = the neuron's paper value (DSR 0.3, BPTT 1).
        dt: DSR: the step Δt (0.05); spikes carry V_th/Δt.
        fire_at: DSR: fire when the potential reaches this fraction of V_th (0.3; the reset subtracts V_th).
        v_th_min: DSR: lower bound of the trainable V_th (5e-4).
        train_v_th: DSR: V_th is a trainable parameter (one per layer).
        surrogate_alpha: BPTT: steepness α of the sigmoid surrogate gradient (4).
    """

    time_steps: int = 20
    neuron: str = "dsr"
    tau: float | None = None
    v_th: float | None = None
    dt: float = 0.05
    fire_at: float = 0.3
    v_th_min: float = 5e-4
    train_v_th: bool = True
    surrogate_alpha: float = 4.0

    def validate(self) -> None:
        super().validate()
        check(self.time_steps >= 1, "model.time_steps", f"{self.time_steps}; must be >= 1")
        check(self.neuron in NEURONS, "model.neuron", f"'{self.neuron}' is not one of {list(NEURONS)}")
        check(self.tau is None or (self.tau > 0 and (self.neuron != "bptt" or self.tau >= 1)), "model.tau",
              f"{self.tau}; must be > 0 (>= 1 for the bptt neuron, whose leak is 1 - 1/tau) or null")
        check(self.v_th is None or self.v_th > 0, "model.v_th", f"{self.v_th}; must be > 0 or null")
        check(self.dt > 0, "model.dt", f"{self.dt}; must be > 0")
        check(0 < self.fire_at <= 1, "model.fire_at", f"{self.fire_at}; must be in (0, 1]")
        check(self.v_th_min >= 0, "model.v_th_min", f"{self.v_th_min}; must be >= 0")
        check(self.surrogate_alpha > 0, "model.surrogate_alpha", f"{self.surrogate_alpha}; must be > 0")

    def neuron_factory(self) -> Callable[[], SpikingNeuron]:
        """A factory of one layer of ``neuron`` neurons with this config's parameters."""

        def neuron() -> SpikingNeuron:
            return make_neuron(self.neuron, tau=self.tau, v_th=self.v_th, dt=self.dt, fire_at=self.fire_at,
                               v_th_min=self.v_th_min, train_v_th=self.train_v_th,
                               surrogate_alpha=self.surrogate_alpha)

        return neuron


@dataclass
class SpikingMLPConfig(SpikingConfig):
    """``model=snn_mlp``.

    Attributes:
        hidden: widths of the hidden layers (HLOP's PMNIST net: [800, 800]); at least one.
        time_shared_grad: the layers over spikes compute their gradients once for all steps where DSR makes them
            equal (:class:`TimeSharedLinear`): the same gradients up to float rounding, a training step ~1.7×
            faster for HLOP's PMNIST net. Off by default until the committed HLOP table is re-run with it (its
            runs re-run bit for bit without it).
    """

    name: str = "snn_mlp"
    hidden: list[int] = field(default_factory=lambda: [100, 100])
    time_shared_grad: bool = False

    def validate(self) -> None:
        super().validate()
        check(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), "model.hidden",
              f"{self.hidden}; snn_mlp needs at least one hidden layer, each width >= 1")


class SpikingClassifier(Classifier):
    """A classifier of spiking neurons: what the spiking nets share, the readout :meth:`rate` of layer inputs.

    A protected layer's input carries time at dim 1 when its rank is :attr:`timed_rank` ((B, T, n) for the MLP,
    (B, T, C, H, W) for the conv nets); any other input (the first layer's, constant over time and computed
    once, or a head's input, which is already a rate) has no time dim.
    """

    timed_rank: ClassVar[int] = 3
    """Rank of a layer input (B, T, …) that carries time at dim 1."""

    def readout_neuron(self) -> SpikingNeuron:  # pragma: no cover - abstract
        """One of the network's neuron layers (all are of one kind): its ``rate`` is the network's readout."""
        raise NotImplementedError

    def rate(self, activity: Tensor) -> Tensor:
        """The readout rate over time of a protected layer's input: (B, T, …) of rank :attr:`timed_rank` →
        (B, …) (weighted for DSR, a mean for BPTT); an input of any other rank (constant over time, or already
        a rate) is returned as is. HLOP's Hebbian rule learns from this rate under DSR (hlop.md)."""
        return self.readout_neuron().rate(activity) if activity.dim() == self.timed_rank else activity


class SpikingMLP(SpikingClassifier):
    """HLOP's spiking MLP (PMNIST: 784-800-800-10, no biases): ``hidden.i`` Linear → ``neurons.i`` spiking, then
    the head(s) on the readout rate of the last spikes.

    Forward over T steps with direct encoding: ``hidden.0`` sees the flattened sample once (its current is the
    same at every step, so it is computed once and repeated over time); every later ``hidden.i`` sees the
    spikes (B, T, n) of every step; the head sees the rate r(s) (B, n) of the last layer's spikes (weighted for
    DSR, a plain mean for BPTT): r(head(s)) = head(r(s)) since both are linear, so this *is* the readout
    "last layer averaged over time", T times cheaper. :meth:`features` returns that rate.

    Protected layers (as :class:`~clbench.models.mlp.MLP`): every ``hidden.i``, and the head when it is shared.
    What each receives, and hence what :func:`~clbench.subspace.inputs.collect_layer_inputs` records, is the
    presynaptic activity a projection must protect: its weight gradient is Σ_t δ_tᵀ x_t, whose rows lie in
    span{x_t}, and an update orthogonal to span{x_t} of old samples leaves all their per-step currents, hence
    their spike trains, unchanged: ``hidden.0`` the input (every step's), ``hidden.i`` the (B, T, n) spikes of
    every step (R gets one column per sample and step), the head the rates, which alone determine the logits.
    :meth:`rate` turns such an input into the rate HLOP's Hebbian rule learns from under DSR (hlop.md).

    Args:
        input_shape, classes_per_task, multi_head, n_classes, bias: as :class:`~clbench.models.mlp.MLP`.
        hidden: widths of the spiking layers (at least one).
        time_steps: T.
        neuron: a factory of one layer of neurons (:func:`make_neuron`).
        time_shared_grad: the layers over spikes (``hidden.1…``) are :class:`TimeSharedLinear` (bias-free only).
    """

    def __init__(self, input_shape: tuple[int, ...], hidden: list[int], classes_per_task: tuple[int, ...],
                 multi_head: bool, n_classes: int, time_steps: int, neuron: Callable[[], SpikingNeuron],
                 bias: bool = False, time_shared_grad: bool = False) -> None:
        if not hidden:
            raise ValueError("SpikingMLP needs at least one hidden (spiking) layer")
        if time_steps < 1:
            raise ValueError(f"SpikingMLP: time_steps must be >= 1, got {time_steps}")
        super().__init__(hidden[-1], classes_per_task, multi_head, n_classes, bias)
        widths = [math.prod(input_shape), *hidden]
        self.time_steps = time_steps
        timed = TimeSharedLinear if time_shared_grad else nn.Linear
        self.hidden = nn.ModuleList((nn.Linear if i == 0 else timed)(a, b, bias=bias)
                                    for i, (a, b) in enumerate(itertools.pairwise(widths)))
        self.neurons = nn.ModuleList(neuron() for _ in hidden)

    def spikes(self, x: Tensor) -> Tensor:
        """Spikes (B, T, n) of the last hidden layer for inputs x (B, …)."""
        current = self.hidden[0](x.flatten(1))
        s = self.neurons[0](current.unsqueeze(1).expand(-1, self.time_steps, -1))
        for layer, neuron in zip(self.hidden[1:], self.neurons[1:], strict=True):
            s = neuron(layer(s))
        return s

    def features(self, x: Tensor) -> Tensor:
        return self.neurons[-1].rate(self.spikes(x))

    def readout_neuron(self) -> SpikingNeuron:
        neuron = self.neurons[0]
        assert isinstance(neuron, SpikingNeuron)
        return neuron

    def protected_layers(self) -> dict[str, nn.Module]:
        layers: dict[str, nn.Module] = {f"hidden.{i}": m for i, m in enumerate(self.hidden)}
        if not self.multi_head:
            layers["head"] = self.head
        return layers
