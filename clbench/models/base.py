"""What every network in clbench provides, so classifiers, spiking nets and LMs share one loop."""

from __future__ import annotations

import torch
from torch import nn

Batch = tuple[torch.Tensor, ...]


def image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``input_shape`` as (C, H, W) for the conv net ``name``.

    Raises:
        ValueError: the stream's samples are not images (e.g. a flat stream for a conv net).
    """
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs image inputs (C, H, W), got input_shape {tuple(input_shape)}; use an "
                         "image stream or model=mlp")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


class ContinualModel(nn.Module):
    """A network that knows its own loss and prediction on a batch ``(x, y, t)``.

    Subclasses implement :meth:`forward`, and say which layers the gradient-projection family protects
    (:meth:`protected_layers`: the papers' choice for the network, e.g. all layers but per-task heads).
    """

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean task loss of the batch (cross-entropy for a classifier)."""
        raise NotImplementedError

    def predict(self, batch: Batch) -> torch.Tensor:
        """Predicted labels, comparable with ``batch[1]``."""
        raise NotImplementedError

    def protected_layers(self) -> dict[str, nn.Module]:
        """Layers whose weight gradients projection strategies may constrain, by qualified name."""
        raise NotImplementedError


class Classifier(ContinualModel):
    """A classifier with a shared trunk and either one shared head or one head per task.

    Multi-head (task-incremental): sample n uses head ``t[n]`` and its label is local to the task.
    """

    def __init__(self, trunk_out: int, classes_per_task: tuple[int, ...], multi_head: bool, n_classes: int,
                 bias: bool) -> None:
        super().__init__()
        self.multi_head = multi_head
        if multi_head:
            self.heads = nn.ModuleList(nn.Linear(trunk_out, c, bias=bias) for c in classes_per_task)
        else:
            self.head = nn.Linear(trunk_out, n_classes, bias=bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _groups(self, t: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        """Task ids present in the batch with their sample indices (None: the whole batch)."""
        first = int(t[0])
        if bool((t == first).all()):
            return [(first, None)]
        return [(int(k), (t == k).nonzero(as_tuple=True)[0]) for k in torch.unique(t)]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits; for a multi-head batch mixing tasks, a list-free padded layout is avoided by
        :meth:`loss` and :meth:`predict`, which handle each task's samples separately."""
        h = self.features(x)
        if not self.multi_head:
            return self.head(h)
        groups = self._groups(t)
        if len(groups) != 1:
            raise ValueError("forward() of a multi-head model needs one task per batch; use loss()/predict()")
        return self.heads[groups[0][0]](h)

    def loss(self, batch: Batch) -> torch.Tensor:
        x, y, t = batch[0], batch[1], batch[2]
        h = self.features(x)
        if not self.multi_head:
            return nn.functional.cross_entropy(self.head(h), y)
        total = h.new_zeros(())
        for task, idx in self._groups(t):
            hs, ys = (h, y) if idx is None else (h[idx], y[idx])
            total = total + nn.functional.cross_entropy(self.heads[task](hs), ys, reduction="sum")
        return total / y.shape[0]

    def predict(self, batch: Batch) -> torch.Tensor:
        x, t = batch[0], batch[2]
        h = self.features(x)
        if not self.multi_head:
            return self.head(h).argmax(dim=1)
        out = torch.empty(h.shape[0], dtype=torch.long, device=h.device)
        for task, idx in self._groups(t):
            if idx is None:
                return self.heads[task](h).argmax(dim=1)
            out[idx] = self.heads[task](h[idx]).argmax(dim=1)
        return out

    def head_names(self) -> set[str]:
        """Qualified names of the head layers."""
        if self.multi_head:
            return {f"heads.{i}" for i in range(len(self.heads))}
        return {"head"}
