"""The MLP of GPM's PMNIST experiments: 784-100-100-10, ReLU, no biases (Saha et al. 2021, §6)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from clbench.config import check
from clbench.models.base import Classifier, ClassifierConfig


@dataclass
class MLPConfig(ClassifierConfig):
    """``model=mlp``.

    Attributes:
        hidden: widths of the hidden layers (GPM's PMNIST net: [100, 100]).
        dropout: dropout after each hidden activation (0: none).
    """

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [100, 100])
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check(all(h >= 1 for h in self.hidden), "model.hidden", f"{self.hidden}; widths must be >= 1")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"{self.dropout}; must be in [0, 1)")


class MLP(Classifier):
    """Fully connected ReLU net ``fc1..fcL`` + head(s).

    Protected layers (GPM's code): every hidden layer, and the head when it is shared (single head, as
    PMNIST); per-task heads are never projected.
    """

    def __init__(self, input_shape: tuple[int, ...], hidden: list[int], classes_per_task: tuple[int, ...],
                 multi_head: bool, n_classes: int, bias: bool = False, dropout: float = 0.0) -> None:
        in_features = math.prod(input_shape)
        super().__init__(hidden[-1] if hidden else in_features, classes_per_task, multi_head, n_classes, bias)
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in itertools.pairwise(widths))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer in self.hidden:
            h = self.dropout(torch.relu(layer(h)))
        return h

    def protected_layers(self) -> dict[str, nn.Module]:
        layers: dict[str, nn.Module] = {f"hidden.{i}": m for i, m in enumerate(self.hidden)}
        if not self.multi_head:
            layers["head"] = self.head
        return layers
