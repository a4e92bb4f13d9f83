"""GPM's reduced ResNet-18 for 5-Datasets and miniImageNet (Saha et al. 2021; gpm.md §4, §2).

A ResNet-18 of base width nf (GPM: 20): a 3×3 stem, four stages of two BasicBlocks of widths nf, 2nf, 4nf, 8nf
and strides 1, 2, 2, 2, a 2×2 average pool and the head(s). No layer has a bias; every BatchNorm uses batch
statistics (``track_running_stats=False``). Features: 8nf·2·2 = 640 for 3×32×32 with a stride-1 stem
(5-Datasets), 8nf·3·3 = 1440 for 3×84×84 with a stride-2 stem (miniImageNet).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clbench.config import check
from clbench.models.base import Classifier, ClassifierConfig, image_shape

GPM_SAMPLES: list[int] = [10, 10, 10, 10, 10, 10, 10, 10, 10, 50, 50, 50, 50, 100, 100, 100, 100, 100, 100, 100]
"""GPM's per-layer n_s for the 20 protected convs, in :meth:`ResNet18.protected_layers` order (5-Datasets).

Of the 100 samples forwarded, the official code's ``batch_list`` gives the 17 3×3 convs in forward order
(stem, then conv1, conv2 of each block) 10×8, 50×3, 100×6: stem and layer1 (5 convs) and layer2.0.conv1,
layer2.0.conv2, layer2.1.conv1 take 10; layer2.1.conv2, layer3.0.conv1, layer3.0.conv2 take 50; layer3.1.* and
layer4.* take 100. Each 1×1 shortcut (blocks layer2.0, layer3.0, layer4.0) takes its block's count (10, 50, 100)
and follows its block's conv2, as in the official ``mat_final`` and parameter order. Hence:

    stem 10 | layer1: 10 10 10 10 | layer2: 10 10 [sc 10] 10 50 | layer3: 50 50 [sc 50] 100 100 |
    layer4: 100 100 [sc 100] 100 100
"""


@dataclass
class ResNetConfig(ClassifierConfig):
    """``model=resnet18`` (GPM's reduced ResNet-18).

    Attributes:
        width: base width nf (GPM: 20).
        stem_stride: stride of the first conv (1 for 32×32 inputs, 2 for miniImageNet's 84×84).
    """

    name: str = "resnet18"
    width: int = 20
    stem_stride: int = 1

    def validate(self) -> None:
        super().validate()
        check_width_stem(self.width, self.stem_stride)


def check_width_stem(width: int, stem_stride: int) -> None:
    """``model.width`` >= 1 and ``model.stem_stride`` in (1, 2), for the ResNets."""
    check(width >= 1, "model.width", f"{width}; must be >= 1")
    check(stem_stride in (1, 2), "model.stem_stride", f"{stem_stride}; must be 1 or 2")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3×3 convolution with zero padding 1."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=bias)


class BasicBlock(nn.Module):
    """conv3×3(stride) → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU.

    The shortcut is the identity, or ``shortcut.conv`` (1×1, same stride, on the block input) → ``shortcut.bn``
    when the stride is not 1 or the width changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride, bias)
        self.bn1 = nn.BatchNorm2d(planes, track_running_stats=False)
        self.conv2 = conv3x3(planes, planes, 1, bias)
        self.bn2 = nn.BatchNorm2d(planes, track_running_stats=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=bias),
                bn=nn.BatchNorm2d(planes, track_running_stats=False),
            ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))

    def convs(self) -> dict[str, nn.Conv2d]:
        """The block's convolutions in forward order: conv1, conv2, then the shortcut's (if any)."""
        out = {"conv1": self.conv1, "conv2": self.conv2}
        if isinstance(self.shortcut, nn.Sequential):
            out["shortcut.conv"] = self.shortcut.conv
        return out


class ResNet18(Classifier):
    """GPM's reduced ResNet-18: stem ``conv1``/``bn1``, stages ``layer1..layer4`` of 2 BasicBlocks, avg-pool 2.

    Module names follow the official code (``conv1``, ``layer2.0.conv1``, …) except the shortcut's, which are
    ``layer2.0.shortcut.conv`` / ``.bn`` instead of ``.0`` / ``.1``.

    Protected layers (GPM's code): all 20 convolutions (17 3×3 + 3 1×1 shortcuts) in forward order, each
    shortcut after its block's conv2; plus the head when it is shared (single head). Per-task heads never.

    Args:
        input_shape: (C, H, W) of one sample; C and the feature size are computed from it.
        classes_per_task, multi_head, n_classes: head layout (see :class:`~clbench.models.base.Classifier`).
        nf: base width (GPM: 20).
        stem_stride: stride of the stem (1 for 32×32 inputs, 2 for 84×84).
        bias: biases on the convolutions and heads (GPM: none).

    Raises:
        ValueError: if ``input_shape`` is not (C, H, W) or the image is too small for the final 2×2 pool.
    """

    def __init__(self, input_shape: tuple[int, ...], classes_per_task: tuple[int, ...], multi_head: bool,
                 n_classes: int, nf: int = 20, stem_stride: int = 1, bias: bool = False) -> None:
        shape = image_shape("ResNet18", input_shape)
        channels, h, w = shape
        strides = (1, 2, 2, 2)
        for s in (stem_stride, *strides):  # 3×3, padding 1 (the 1×1 shortcut gives the same size)
            h, w = (h + 2 - 3) // s + 1, (w + 2 - 3) // s + 1
        h, w = h // 2, w // 2  # avg_pool2d(2)
        if h < 1 or w < 1:
            raise ValueError(f"ResNet18: input_shape {shape} is too small for its stages and final 2×2 pool")
        widths = (nf, 2 * nf, 4 * nf, 8 * nf)
        super().__init__(widths[-1] * h * w, classes_per_task, multi_head, n_classes, bias)
        self.input_shape = shape
        self.flat_features = widths[-1] * h * w
        self.conv1 = conv3x3(channels, nf, stem_stride, bias)
        self.bn1 = nn.BatchNorm2d(nf, track_running_stats=False)
        in_planes = nf
        stages: list[nn.Sequential] = []
        for planes, stride in zip(widths, strides, strict=True):
            blocks = BasicBlock(in_planes, planes, stride, bias), BasicBlock(planes, planes, 1, bias)
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x.reshape(x.shape[0], *self.input_shape))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.avg_pool2d(out, 2).flatten(1)

    def protected_layers(self) -> dict[str, nn.Module]:
        layers: dict[str, nn.Module] = {"conv1": self.conv1}
        for s, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            for b, block in enumerate(stage):
                assert isinstance(block, BasicBlock)
                layers.update({f"layer{s}.{b}.{n}": m for n, m in block.convs().items()})
        if not self.multi_head:
            layers["head"] = self.head
        return layers
