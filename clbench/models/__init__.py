"""The papers' networks. ``build_model`` picks one by ``model.name`` and sizes it from the stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from clbench.models.base import Classifier, ContinualModel
from clbench.models.mlp import MLP

if TYPE_CHECKING:
    from clbench.config import ModelConfig
    from clbench.streams import StreamSpec


def _mlp(cfg: ModelConfig, spec: StreamSpec, multi_head: bool) -> ContinualModel:
    return MLP(spec.input_shape, list(cfg.hidden), spec.classes_per_task, multi_head, spec.n_classes,
               bias=cfg.bias, dropout=cfg.dropout)


MODELS: dict[str, Callable[[ModelConfig, StreamSpec, bool], ContinualModel]] = {"mlp": _mlp}


def build_model(cfg: ModelConfig, spec: StreamSpec) -> ContinualModel:
    """Build ``cfg.name`` for the stream: input size, classes and head layout from ``spec``."""
    if cfg.head == "multi" and not spec.multi_head:
        raise ValueError(f"model.head=multi needs a task-incremental stream; '{spec.name}' has one label space")
    multi = spec.multi_head if cfg.head == "auto" else cfg.head == "multi"
    return MODELS[cfg.name](cfg, spec, multi)


__all__ = ["MODELS", "Classifier", "ContinualModel", "build_model"]
