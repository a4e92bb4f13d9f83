"""What every network in clbench provides, so classifiers, spiking nets and LMs share one loop.

The loop never looks inside a batch: a stream yields samples, the model turns them into tensors once
(:meth:`ContinualModel.collate`, for samples that are not tensors already), and every batch the loop handles is
then a tuple or a dict of tensors sharing their first dimension (the samples). Only the model reads its fields:
it computes its training loss (:meth:`ContinualModel.loss`), scores a batch (:meth:`ContinualModel.score`: named
per-sample scores, which the loop averages) and runs a forward pass for the layer hooks of the subspace methods
(:meth:`ContinualModel.outputs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clbench.config import ModelConfig, check
from clbench.streams.batches import Batch

if TYPE_CHECKING:
    from clbench.streams import StreamSpec


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
    """A network that knows its own batches: their loss, their scores and their forward pass.

    Subclasses implement :meth:`loss`, :meth:`score`, :meth:`outputs` and :meth:`protected_layers` (the
    papers' choice of layers the gradient-projection family protects, e.g. all layers but per-task heads).
    """

    collate_notes: dict[str, int]
    """Counts a model keeps of what its :meth:`collate` did to the data (a language model:
    ``truncated_samples``); the loop logs them as ``data/<key>``."""

    def collate(self, samples: Sequence[Any]) -> Batch:
        """The tensors of ``samples`` (one experience's, all at once), for streams whose samples are not
        tensors (text); image streams are read as ``(x, y, t)`` tensors without it. It may count what it did in
        :attr:`collate_notes`."""
        raise TypeError(f"{type(self).__name__} takes tensor samples; it cannot collate {type(samples[0])}")

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean training loss of the batch (cross-entropy for a classifier), a scalar with a graph."""
        raise NotImplementedError

    def score(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Named per-sample scores of the batch (each of shape ``(n,)``), averaged over an evaluation set by the
        loop: e.g. ``accuracy`` (0 or 100 per sample) for a classifier, ``exact_match`` and ``loss`` for a
        generator. The stream names the primary one, which fills the matrix R."""
        raise NotImplementedError

    def likelihood_loss(self, batch: Batch) -> torch.Tensor:
        """The plain likelihood objective of the batch (the cross-entropy of its targets), whatever objective
        :meth:`loss` trains (a language model's preference batch: DPO there, the NLL of both answers here): the
        reference loss of OGPSA. Default: :meth:`loss`."""
        return self.loss(batch)

    def begin_experience(self, experience: int) -> None:
        """Called by the loop as experience ``experience`` starts (on resume: before the strategy rebuilds what it
        added), for a model whose trainable part depends on the experience (a language model's
        ``adapter_from``: full fine-tuning first, then its adapters). Default: nothing."""

    def anchors(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-sample tensors (first dimension the batch's) that the loss needs from the model *as it is when an
        experience starts*, computed then, once, and added to the experience's training (and validation) batches
        under these keys; kept in the checkpoint, so a resumed experience reads them, not recomputes them. A
        language model's preference batch: DPO's reference log-probabilities. Default: none."""
        return {}

    def outputs(self, batch: Batch) -> Any:
        """The forward pass of the batch (logits); the subspace methods run it for the layer inputs it shows
        their hooks."""
        raise NotImplementedError

    def target_logits(self, batch: Batch) -> torch.Tensor:
        """Logits at the positions the model is trained to predict, one row per position (m × classes): what a
        distillation compares between two versions of the model (``lwf_lm``). Default: :meth:`outputs` with its
        leading dimensions flattened (a classifier: one row per sample)."""
        out = self.outputs(batch)
        return out.reshape(-1, out.shape[-1])

    def protected_layers(self) -> dict[str, nn.Module]:
        """Layers whose weight gradients projection strategies may constrain, by qualified name."""
        raise NotImplementedError

    def input_positions(self, batch: Batch) -> torch.Tensor | None:
        """Which positions of the sequence inputs that :meth:`outputs` gives the protected layers hold data (n × L
        booleans, e.g. a language model's real tokens), for the subspace methods' layer inputs; None: all."""
        return None


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

    def score(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``accuracy``: 100 for a sample whose predicted label is ``y``, else 0."""
        y = batch[1]
        return {"accuracy": (self.predict(batch) == y).to(torch.float64) * 100.0}

    def outputs(self, batch: Batch) -> torch.Tensor:
        """Logits of ``(x, y, t)`` (one task per batch for a multi-head net)."""
        return self(batch[0], batch[2])

    def predict(self, batch: Batch) -> torch.Tensor:
        """Predicted labels of ``(x, y, t)``, comparable with ``y``."""
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


@dataclass
class ClassifierConfig(ModelConfig):
    """Keys every classifier family shares.

    Attributes:
        bias: whether the layers have biases (GPM's nets have none).
        head: ``auto`` (one head per task when the stream is task-incremental, else one shared head),
            ``single`` or ``multi``.
    """

    bias: bool = False
    head: str = "auto"

    def validate(self) -> None:
        check(self.head in HEADS, "model.head", f"'{self.head}' is not one of {list(HEADS)}")


HEADS = ("auto", "single", "multi")


def multi_head(cfg: ClassifierConfig, spec: StreamSpec) -> bool:
    """Whether a classifier of ``cfg`` on the stream ``spec`` has one head per task.

    Raises:
        ValueError: ``model.head=multi`` on a stream with one label space.
    """
    if cfg.head == "multi" and not spec.multi_head:
        raise ValueError(f"model.head=multi needs a task-incremental stream; '{spec.name}' has one label space")
    return spec.multi_head if cfg.head == "auto" else cfg.head == "multi"
