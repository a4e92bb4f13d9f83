"""GPM's 5-layer AlexNet for 10-split CIFAR-100 (Saha et al. 2021; gpm.md §4 "10-split CIFAR-100", §2).

Three bias-free convolutions (stride 1, no padding), each followed by BatchNorm without running statistics,
ReLU, dropout and 2×2 max-pooling, then two bias-free fully connected layers with BatchNorm1d, ReLU and dropout,
then the head(s). On 3×32×32 inputs the spatial sizes are 32→29→14→12→6→5→2, so fc1 takes 256·2·2 = 1024.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clbench.models.base import Classifier, ClassifierConfig, image_shape

GPM_SAMPLES: list[int] = [24, 100, 100, 125, 125]
"""GPM's per-layer n_s for conv1, conv2, conv3, fc1, fc2 (protected order) on CIFAR-100: of the 125 samples
forwarded, conv1 uses the first 24 (2·12 in the official code), conv2/conv3 100, fc1/fc2 all 125 (gpm.md §2)."""

CONVS: tuple[tuple[int, int], ...] = ((64, 4), (128, 3), (256, 2))
"""(out channels, kernel size) of conv1..conv3."""

DROPOUT: tuple[float, ...] = (0.2, 0.2, 0.5, 0.5, 0.5)
"""Dropout after conv1, conv2, conv3, fc1, fc2 (the official code's drop1 = 0.2, drop2 = 0.5)."""


@dataclass
class AlexNetConfig(ClassifierConfig):
    """``model=alexnet`` (GPM's 5-layer AlexNet; no keys beyond ``bias`` and ``head``)."""

    name: str = "alexnet"


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution (or pooling) along one spatial dimension."""
    return (size + 2 * padding - kernel) // stride + 1


class AlexNet(Classifier):
    """GPM's AlexNet: ``conv1..conv3`` (+ ``bn1..bn3``), ``fc1``/``fc2`` (+ ``bn4``/``bn5``), head(s).

    Block order (official code): conv → BN → ReLU → dropout → maxpool 2, and fc → BN1d → ReLU → dropout.
    Every BatchNorm has ``track_running_stats=False``: it normalises with the batch's statistics in train and in
    eval mode (gpm.md §2 "BatchNorm"); its affine γ, β are learned. Module names follow the official code.

    Protected layers (GPM's code): conv1, conv2, conv3, fc1, fc2 in forward order, plus the head when it is
    shared (single head); per-task heads are never projected.

    Args:
        input_shape: (C, H, W) of one sample; C and the flattened size of conv3's pooled output (1024 for
            3×32×32) are computed from it.
        classes_per_task, multi_head, n_classes: head layout (see :class:`~clbench.models.base.Classifier`).
        bias: biases on the convolutions, fc layers and heads (GPM: none).
        hidden: widths of fc1 and fc2 (GPM: 2048).
        dropout: dropout after conv1, conv2, conv3, fc1, fc2.

    Raises:
        ValueError: if ``input_shape`` is not (C, H, W) or the image is too small for the three conv/pool stages.
    """

    def __init__(self, input_shape: tuple[int, ...], classes_per_task: tuple[int, ...], multi_head: bool,
                 n_classes: int, bias: bool = False, hidden: int = 2048,
                 dropout: tuple[float, ...] = DROPOUT) -> None:
        if len(dropout) != 5:
            raise ValueError(f"AlexNet needs 5 dropout rates (conv1-3, fc1, fc2), got {len(dropout)}")
        super().__init__(hidden, classes_per_task, multi_head, n_classes, bias)
        self.input_shape = image_shape("AlexNet", input_shape)
        channels, h, w = self.input_shape
        for _, k in CONVS:
            h, w = conv_out(h, k) // 2, conv_out(w, k) // 2
        if h < 1 or w < 1:
            raise ValueError(f"AlexNet: input_shape {self.input_shape} is too small for its 3 conv/pool stages")
        self.flat_features = CONVS[-1][0] * h * w

        c1, c2, c3 = (c for c, _ in CONVS)
        k1, k2, k3 = (k for _, k in CONVS)
        self.conv1 = nn.Conv2d(channels, c1, k1, bias=bias)
        self.bn1 = nn.BatchNorm2d(c1, track_running_stats=False)
        self.conv2 = nn.Conv2d(c1, c2, k2, bias=bias)
        self.bn2 = nn.BatchNorm2d(c2, track_running_stats=False)
        self.conv3 = nn.Conv2d(c2, c3, k3, bias=bias)
        self.bn3 = nn.BatchNorm2d(c3, track_running_stats=False)
        self.fc1 = nn.Linear(self.flat_features, hidden, bias=bias)
        self.bn4 = nn.BatchNorm1d(hidden, track_running_stats=False)
        self.fc2 = nn.Linear(hidden, hidden, bias=bias)
        self.bn5 = nn.BatchNorm1d(hidden, track_running_stats=False)
        self.drops = nn.ModuleList(nn.Dropout(p) for p in dropout)
        self.pool = nn.MaxPool2d(2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], *self.input_shape)
        for i, (conv, bn) in enumerate(((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))):
            h = self.pool(self.drops[i](torch.relu(bn(conv(h)))))
        h = h.flatten(1)
        h = self.drops[3](torch.relu(self.bn4(self.fc1(h))))
        return self.drops[4](torch.relu(self.bn5(self.fc2(h))))

    def protected_layers(self) -> dict[str, nn.Module]:
        layers: dict[str, nn.Module] = {"conv1": self.conv1, "conv2": self.conv2, "conv3": self.conv3,
                                        "fc1": self.fc1, "fc2": self.fc2}
        if not self.multi_head:
            layers["head"] = self.head
        return layers
