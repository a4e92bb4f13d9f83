"""The papers' networks. ``build_model`` picks one by ``model.name`` and sizes it from the stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from clbench.models.alexnet import AlexNet
from clbench.models.base import Classifier, ContinualModel
from clbench.models.mlp import MLP
from clbench.models.resnet import ResNet18
from clbench.models.snn import SpikingMLP, SpikingNeuron, make_neuron
from clbench.models.snn_conv import SpikingCNN, SpikingResNet18

if TYPE_CHECKING:
    from clbench.config import ModelConfig
    from clbench.streams import StreamSpec


def _mlp(cfg: ModelConfig, spec: StreamSpec, multi_head: bool) -> ContinualModel:
    return MLP(spec.input_shape, list(cfg.hidden), spec.classes_per_task, multi_head, spec.n_classes,
               bias=cfg.bias, dropout=cfg.dropout)


def _alexnet(cfg: ModelConfig, spec: StreamSpec, multi_head: bool) -> ContinualModel:
    try:
        return AlexNet(spec.input_shape, spec.classes_per_task, multi_head, spec.n_classes, bias=cfg.bias)
    except ValueError as e:
        raise ValueError(f"model.name={cfg.name} cannot take benchmark '{spec.name}': {e}") from e


def _resnet18(cfg: ModelConfig, spec: StreamSpec, multi_head: bool) -> ContinualModel:
    try:
        return ResNet18(spec.input_shape, spec.classes_per_task, multi_head, spec.n_classes, nf=cfg.width,
                        stem_stride=cfg.stem_stride, bias=cfg.bias)
    except ValueError as e:
        raise ValueError(f"model.name={cfg.name} cannot take benchmark '{spec.name}': {e}") from e


def _neuron_factory(cfg: ModelConfig) -> Callable[[], SpikingNeuron]:
    """A factory of one layer of ``cfg.neuron`` neurons with the config's parameters."""

    def neuron() -> SpikingNeuron:
        return make_neuron(cfg.neuron, tau=cfg.tau, v_th=cfg.v_th, dt=cfg.dt, fire_at=cfg.fire_at,
                           v_th_min=cfg.v_th_min, train_v_th=cfg.train_v_th, surrogate_alpha=cfg.surrogate_alpha)

    return neuron


def _snn_mlp(cfg: ModelConfig, spec: StreamSpec, multi_head: bool) -> ContinualModel:
    return SpikingMLP(spec.input_shape, list(cfg.hidden), spec.classes_per_task, multi_head, spec.n_classes,
                      time_steps=cfg.time_steps, neuron=_neuron_factory(cfg), bias=cfg.bias)


def _snn_cnn(cfg: ModelConfig, spec: StreamSpec, multi_head: bool) -> ContinualModel:
    try:
        return SpikingCNN(spec.input_shape, spec.classes_per_task, multi_head, spec.n_classes,
                          time_steps=cfg.time_steps, neuron=_neuron_factory(cfg), channels=list(cfg.channels),
                          bias=cfg.bias, bn_running_stats=cfg.bn_running_stats)
    except ValueError as e:
        raise ValueError(f"model.name={cfg.name} cannot take benchmark '{spec.name}': {e}") from e


def _snn_resnet18(cfg: ModelConfig, spec: StreamSpec, multi_head: bool) -> ContinualModel:
    try:
        return SpikingResNet18(spec.input_shape, spec.classes_per_task, multi_head, spec.n_classes,
                               time_steps=cfg.time_steps, neuron=_neuron_factory(cfg), nf=cfg.width,
                               stem_stride=cfg.stem_stride, bias=cfg.bias, bn_running_stats=cfg.bn_running_stats)
    except ValueError as e:
        raise ValueError(f"model.name={cfg.name} cannot take benchmark '{spec.name}': {e}") from e


MODELS: dict[str, Callable[[ModelConfig, StreamSpec, bool], ContinualModel]] = {
    "mlp": _mlp, "alexnet": _alexnet, "resnet18": _resnet18, "snn_mlp": _snn_mlp, "snn_cnn": _snn_cnn,
    "snn_resnet18": _snn_resnet18}


def build_model(cfg: ModelConfig, spec: StreamSpec) -> ContinualModel:
    """Build ``cfg.name`` for the stream: input size, classes and head layout from ``spec``."""
    if cfg.head == "multi" and not spec.multi_head:
        raise ValueError(f"model.head=multi needs a task-incremental stream; '{spec.name}' has one label space")
    multi = spec.multi_head if cfg.head == "auto" else cfg.head == "multi"
    return MODELS[cfg.name](cfg, spec, multi)


__all__ = ["MLP", "MODELS", "AlexNet", "Classifier", "ContinualModel", "ResNet18", "SpikingCNN", "SpikingMLP",
           "SpikingResNet18", "build_model"]
