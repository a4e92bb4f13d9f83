"""HLOP's spiking conv nets (Xiao et al. ICLR 2024; hlop.md "Networks"): the CIFAR-100 CNN and the reduced
pre-activation ResNet-18 of miniImageNet / 5-Datasets, on the neurons of :mod:`clbench.models.snn`.

Activity layout, as :mod:`clbench.models.snn`: (B, T, C, H, W), samples first and time second. The layers that
act on every time step are time-distributed: :class:`TimeConv2d`, :class:`TimeBatchNorm2d` and
:class:`TimeAvgPool2d` are the ``nn`` modules themselves (so the gradient projection and
:func:`~clbench.subspace.inputs.layer_input_matrix` treat a :class:`TimeConv2d` as any ``nn.Conv2d``), called on
(B, T, …): they fold time into the batch, (B·T, …), apply the module and unfold again. BatchNorm therefore takes
its statistics over B·T·H·W, as the official code's layers do on its (T·B, C, H, W) tensors. A 4-D (B, C, H, W)
input, constant over time, is processed once, as by the plain module.

Direct encoding: the first conv sees the image once, (B, C, H, W) (its pre-hook input is 4-D), and its current is
repeated over the T steps when it reaches the first spiking neurons. The readout is the head on the rate (weighted
for DSR, a mean for BPTT) of the last spikes; the rate commutes with the linear pooling, flattening and head, so
this equals the official "head at every step, then the rate".

Initialisation (the official code's): every conv weight He-normal with fan-out (std √(2 / (k²·C_out))),
BatchNorm γ = 1, β = 0, heads N(0, 0.01²), biases (``bias=True`` only) 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from clbench.config import check
from clbench.models.base import image_shape
from clbench.models.resnet import check_width_stem
from clbench.models.snn import SpikingClassifier, SpikingConfig, SpikingNeuron

__all__ = ["CNN_CHANNELS", "SpikingBasicBlock", "SpikingCNN", "SpikingResNet18", "TimeAvgPool2d",
           "TimeBatchNorm2d", "TimeConv2d", "repeat_in_time"]

CNN_CHANNELS: tuple[int, ...] = (64, 128, 256)
"""Widths of the spiking CNN's three conv stages (HLOP, CIFAR-100)."""


@dataclass
class SpikingCNNConfig(SpikingConfig):
    """``model=snn_cnn`` (HLOP's CIFAR net).

    Attributes:
        channels: the conv widths (HLOP: [64, 128, 256]).
        bn_running_stats: BatchNorm keeps running statistics for eval mode (HLOP's code); false: batch
            statistics always (GPM's convention).
    """

    name: str = "snn_cnn"
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    bn_running_stats: bool = False

    def validate(self) -> None:
        super().validate()
        check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "model.channels",
              f"{self.channels}; needs at least one width, each >= 1")


@dataclass
class SpikingResNetConfig(SpikingConfig):
    """``model=snn_resnet18`` (HLOP's spiking ResNet-18).

    Attributes:
        width: base width nf (20).
        stem_stride: 1 (3×3 stem for 32×32 inputs) or 2 (5×5 stem for 84×84).
        bn_running_stats: as :class:`SpikingCNNConfig`.
    """

    name: str = "snn_resnet18"
    width: int = 20
    stem_stride: int = 1
    bn_running_stats: bool = False

    def validate(self) -> None:
        super().validate()
        check_width_stem(self.width, self.stem_stride)


def _per_step(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn`` applied to every time step of x (B, T, C, H, W) at once (time folded into the batch); a 4-D x
    goes to ``fn`` as is."""
    if x.dim() != 5:
        return fn(x)
    return fn(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def repeat_in_time(x: Tensor, steps: int) -> Tensor:
    """x (B, C, H, W), constant over time, as (B, T, C, H, W) (a view); a 5-D x is returned as is."""
    return x.unsqueeze(1).expand(-1, steps, *x.shape[1:]) if x.dim() == 4 else x


class TimeConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` applied at every time step: (B, T, C, H, W) → (B, T, C', H', W'); (B, C, H, W) as usual.

    Its forward pre-hooks see the 5-D input, which :func:`~clbench.subspace.inputs.layer_input_matrix` unfolds
    with every step as one more input.
    """

    def forward(self, x: Tensor) -> Tensor:
        return _per_step(super().forward, x)


class TimeBatchNorm2d(nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` over (B, T, C, H, W): statistics over B·T·H·W (the official code's); (B, C, H, W)
    as usual."""

    def forward(self, x: Tensor) -> Tensor:
        return _per_step(super().forward, x)


class TimeAvgPool2d(nn.AvgPool2d):
    """An ``nn.AvgPool2d`` at every time step of (B, T, C, H, W); (B, C, H, W) as usual."""

    def forward(self, x: Tensor) -> Tensor:
        return _per_step(super().forward, x)


def _init_weights(model: nn.Module) -> None:
    """The official code's initialisation (module docstring)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            continue
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class SpikingCNN(SpikingClassifier):
    """HLOP's spiking CNN (CIFAR-100): ``len(channels)`` stages [``convs.i`` 3×3 (padding 1) → ``bns.i`` →
    ``neurons.i`` spiking → 2×2 average pool], flatten, head(s) on the readout rate.

    With the default channels (64, 128, 256): 3×32×32 → 32 → 16 → 8 → 4, so 256·4·4 = 4096 features (HLOP's
    per-task Linear(4096, 10)); 3×84×84 → 84 → 42 → 21 → 10, 25600 features (pooling floors).

    Protected layers: ``convs.0``, ``convs.1``, ``convs.2`` (HLOP's dims C_in·9 = 27, 576, 1152), plus the head
    when it is shared (per-task heads never). ``convs.0`` receives the image (B, C, H, W) once; the later convs
    the pooled spikes (B, T, C, H, W) of every step; a shared head the rate (B, 4096). :meth:`rate` turns such
    an input into the rate HLOP's Hebbian rule learns from under DSR.

    Args:
        input_shape: (C, H, W) of one sample; the flattened feature size is computed from it.
        classes_per_task, multi_head, n_classes: head layout (see :class:`~clbench.models.base.Classifier`).
        time_steps: T.
        neuron: a factory of one layer of neurons (:func:`~clbench.models.snn.make_neuron`).
        channels: widths of the conv stages (HLOP: 64, 128, 256).
        bias: biases on the convs and heads (HLOP: no conv biases).
        bn_running_stats: BatchNorm keeps running statistics and uses them in eval mode (the official code's
            ``nn.BatchNorm2d`` default); False: batch statistics always (GPM's convention in clbench).

    Raises:
        ValueError: if ``input_shape`` is not (C, H, W), ``channels`` is empty, ``time_steps`` < 1, or the image
            is too small for the 2×2 pools.
    """

    timed_rank = 5

    def __init__(self, input_shape: tuple[int, ...], classes_per_task: tuple[int, ...], multi_head: bool,
                 n_classes: int, time_steps: int, neuron: Callable[[], SpikingNeuron],
                 channels: tuple[int, ...] | list[int] = CNN_CHANNELS, bias: bool = False,
                 bn_running_stats: bool = False) -> None:
        shape = image_shape("SpikingCNN", input_shape)
        if not channels:
            raise ValueError("SpikingCNN needs at least one conv stage (channels)")
        if time_steps < 1:
            raise ValueError(f"SpikingCNN: time_steps must be >= 1, got {time_steps}")
        c, h, w = shape
        for _ in channels:
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"SpikingCNN: input_shape {shape} is too small for its {len(channels)} 2×2 pools")
        super().__init__(channels[-1] * h * w, classes_per_task, multi_head, n_classes, bias)
        self.input_shape = shape
        self.flat_features = channels[-1] * h * w
        self.time_steps = time_steps
        self.convs = nn.ModuleList(TimeConv2d(a, b, 3, padding=1, bias=bias)
                                   for a, b in itertools.pairwise([c, *channels]))
        self.bns = nn.ModuleList(TimeBatchNorm2d(b, track_running_stats=bn_running_stats) for b in channels)
        self.neurons = nn.ModuleList(neuron() for _ in channels)
        self.pool = TimeAvgPool2d(2)
        _init_weights(self)

    def spikes(self, x: Tensor) -> Tensor:
        """The pooled spikes (B, T, C, H', W') of the last stage for images x (B, C, H, W) (or flattened)."""
        h = x.reshape(x.shape[0], *self.input_shape)
        for conv, bn, neuron in zip(self.convs, self.bns, self.neurons, strict=True):
            h = self.pool(neuron(repeat_in_time(bn(conv(h)), self.time_steps)))
        return h

    def features(self, x: Tensor) -> Tensor:
        return self.rate(self.spikes(x)).flatten(1)

    def readout_neuron(self) -> SpikingNeuron:
        neuron = self.neurons[0]
        assert isinstance(neuron, SpikingNeuron)
        return neuron

    def protected_layers(self) -> dict[str, nn.Module]:
        layers: dict[str, nn.Module] = {f"convs.{i}": m for i, m in enumerate(self.convs)}
        if not self.multi_head:
            layers["head"] = self.head
        return layers


class SpikingBasicBlock(nn.Module):
    """Pre-activation block: ``bn1`` → ``sn1`` → ``conv1`` 3×3 (stride) → ``bn2`` → ``sn2`` → ``conv2`` 3×3, plus
    the block input (identity), or, when the stride or the width changes, ``downsample`` (1×1, same stride, no
    BatchNorm) of the ``sn1`` spikes (not of the block input).

    The input is (B, T, C, H, W), or (B, C, H, W) when constant over time (the first block after the stem):
    then ``bn1`` runs once and its output is repeated over the ``time_steps`` steps before ``sn1``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, time_steps: int,
                 neuron: Callable[[], SpikingNeuron], bias: bool = False, bn_running_stats: bool = False) -> None:
        super().__init__()
        self.time_steps = time_steps
        self.bn1 = TimeBatchNorm2d(in_planes, track_running_stats=bn_running_stats)
        self.sn1 = neuron()
        self.conv1 = TimeConv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.bn2 = TimeBatchNorm2d(planes, track_running_stats=bn_running_stats)
        self.sn2 = neuron()
        self.conv2 = TimeConv2d(planes, planes, 3, stride=1, padding=1, bias=bias)
        self.downsample: TimeConv2d | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = TimeConv2d(in_planes, planes, 1, stride=stride, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        s = self.sn1(repeat_in_time(self.bn1(x), self.time_steps))
        shortcut = repeat_in_time(x, self.time_steps) if self.downsample is None else self.downsample(s)
        return self.conv2(self.sn2(self.bn2(self.conv1(s)))) + shortcut

    def convs(self) -> dict[str, TimeConv2d]:
        """The block's convolutions in HLOP's order: conv1, conv2, then the downsample (if any)."""
        out = {"conv1": self.conv1, "conv2": self.conv2}
        if self.downsample is not None:
            out["downsample"] = self.downsample
        return out


class SpikingResNet18(SpikingClassifier):
    """HLOP's reduced pre-activation spiking ResNet-18 (miniImageNet, 5-Datasets; hlop.md "Networks").

    Stem ``conv1`` (no BatchNorm, no neuron: the blocks are pre-activation): 3×3 stride 1 padding 1 for 32×32
    inputs (``stem_stride=1``), 5×5 stride 2 padding 2 for 84×84 (``stem_stride=2``); then ``layers.0`` …
    ``layers.7``, 8 :class:`SpikingBasicBlock` of widths nf, nf, 2nf, 2nf, 4nf, 4nf, 8nf, 8nf and strides 1, 1,
    2, 1, 2, 1, 2, 1 (``layers.2``, ``layers.4``, ``layers.6`` have a 1×1 ``downsample``); then ``bn1`` → ``sn1``
    → global average pool → head(s) on the readout rate. Features: 8nf (160 for nf = 20) for any input size
    (the official code pools to 1×1): 32×32 → 32, 32, 16, 8, 4 → 1; 84×84 → 42, 42, 21, 11, 6 → 1. Module names
    follow the official code.

    Protected layers: every conv, downsamples included, in the order of hlop.md's row lists
    [first conv; block1 (c1, c2); block2 (c1, c2); block3 (c1, c2, downsample); block4 (c1, c2);
    block5 (c1, c2, downsample); block6 (c1, c2); block7 (c1, c2, downsample); block8 (c1, c2)], i.e.::

        conv1, layers.0.conv1, layers.0.conv2, layers.1.conv1, layers.1.conv2,
        layers.2.conv1, layers.2.conv2, layers.2.downsample, layers.3.conv1, layers.3.conv2,
        layers.4.conv1, layers.4.conv2, layers.4.downsample, layers.5.conv1, layers.5.conv2,
        layers.6.conv1, layers.6.conv2, layers.6.downsample, layers.7.conv1, layers.7.conv2

    (20 layers), plus ``head`` last when it is shared (per-task heads never). ``conv1`` receives the image
    (B, C, H, W) once, every block conv the spikes (B, T, C, H, W), a shared head the rate (B, 8nf).

    Args:
        input_shape: (C, H, W) of one sample.
        classes_per_task, multi_head, n_classes: head layout (see :class:`~clbench.models.base.Classifier`).
        time_steps: T.
        neuron: a factory of one layer of neurons (:func:`~clbench.models.snn.make_neuron`).
        nf: base width (HLOP: 20).
        stem_stride: 1 (3×3 stem) or 2 (5×5 stem).
        bias: biases on the convs and heads (HLOP: no conv biases).
        bn_running_stats: as :class:`SpikingCNN`.

    Raises:
        ValueError: if ``input_shape`` is not (C, H, W), ``stem_stride`` is not 1 or 2, or ``time_steps`` < 1.
    """

    timed_rank = 5

    def __init__(self, input_shape: tuple[int, ...], classes_per_task: tuple[int, ...], multi_head: bool,
                 n_classes: int, time_steps: int, neuron: Callable[[], SpikingNeuron], nf: int = 20,
                 stem_stride: int = 1, bias: bool = False, bn_running_stats: bool = False) -> None:
        shape = image_shape("SpikingResNet18", input_shape)
        if stem_stride not in (1, 2):
            raise ValueError(f"SpikingResNet18: stem_stride must be 1 (3×3 stem) or 2 (5×5 stem), got {stem_stride}")
        if time_steps < 1:
            raise ValueError(f"SpikingResNet18: time_steps must be >= 1, got {time_steps}")
        widths = (nf, 2 * nf, 4 * nf, 8 * nf)
        super().__init__(widths[-1], classes_per_task, multi_head, n_classes, bias)
        self.input_shape = shape
        self.flat_features = widths[-1]
        self.time_steps = time_steps
        kernel = 3 if stem_stride == 1 else 5
        self.conv1 = TimeConv2d(shape[0], nf, kernel, stride=stem_stride, padding=kernel // 2, bias=bias)
        blocks: list[SpikingBasicBlock] = []
        in_planes = nf
        for planes, stride in zip(widths, (1, 2, 2, 2), strict=True):
            for s in (stride, 1):
                blocks.append(SpikingBasicBlock(in_planes, planes, s, time_steps, neuron, bias, bn_running_stats))
                in_planes = planes
        self.layers = nn.ModuleList(blocks)
        self.bn1 = TimeBatchNorm2d(widths[-1], track_running_stats=bn_running_stats)
        self.sn1 = neuron()
        _init_weights(self)

    def spikes(self, x: Tensor) -> Tensor:
        """The last spikes (B, T, 8nf, H', W') (before the pool) for images x (B, C, H, W) (or flattened)."""
        h = self.conv1(x.reshape(x.shape[0], *self.input_shape))
        for block in self.layers:
            h = block(h)
        return self.sn1(self.bn1(h))

    def features(self, x: Tensor) -> Tensor:
        return self.rate(self.spikes(x)).mean(dim=(-2, -1))

    def readout_neuron(self) -> SpikingNeuron:
        assert isinstance(self.sn1, SpikingNeuron)
        return self.sn1

    def protected_layers(self) -> dict[str, nn.Module]:
        layers: dict[str, nn.Module] = {"conv1": self.conv1}
        for k, block in enumerate(self.layers):
            assert isinstance(block, SpikingBasicBlock)
            layers.update({f"layers.{k}.{n}": m for n, m in block.convs().items()})
        if not self.multi_head:
            layers["head"] = self.head
        return layers
