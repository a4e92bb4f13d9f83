"""The papers' networks and the language models (Hugging Face, wrapped by peft: :mod:`clbench.models.lm`).
``build_model`` picks one by ``model.name`` and sizes it from the stream; each family has its own config class
(:data:`MODELS`), so a run logs its own family's keys only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clbench.config import ModelConfig
from clbench.models.alexnet import AlexNet, AlexNetConfig
from clbench.models.base import Classifier, ContinualModel, multi_head
from clbench.models.lm import LanguageModel, LMConfig, build_lm
from clbench.models.mlp import MLP, MLPConfig
from clbench.models.resnet import ResNet18, ResNetConfig
from clbench.models.snn import SpikingMLP, SpikingMLPConfig
from clbench.models.snn_conv import SpikingCNN, SpikingCNNConfig, SpikingResNet18, SpikingResNetConfig
from clbench.streams.text import TextStreamSpec

if TYPE_CHECKING:
    from clbench.streams import StreamSpec


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its config class, its builder ``build(cfg, spec) -> ContinualModel`` and whether it
    reads text streams (else image / tensor streams)."""

    config: type[ModelConfig]
    build: Callable[[Any, Any], ContinualModel]
    text: bool = False


def _image_net(build: Callable[[Any, Any], ContinualModel]) -> Callable[[Any, Any], ContinualModel]:
    """``build``, with its ValueError (a stream whose samples are not images) naming model and stream."""

    def wrapped(cfg: Any, spec: Any) -> ContinualModel:
        try:
            return build(cfg, spec)
        except ValueError as e:
            raise ValueError(f"model.name={cfg.name} cannot take benchmark '{spec.name}': {e}") from e

    return wrapped


def _mlp(cfg: MLPConfig, spec: StreamSpec) -> ContinualModel:
    return MLP(spec.input_shape, list(cfg.hidden), spec.classes_per_task, multi_head(cfg, spec), spec.n_classes,
               bias=cfg.bias, dropout=cfg.dropout)


def _alexnet(cfg: AlexNetConfig, spec: StreamSpec) -> ContinualModel:
    return AlexNet(spec.input_shape, spec.classes_per_task, multi_head(cfg, spec), spec.n_classes, bias=cfg.bias)


def _resnet18(cfg: ResNetConfig, spec: StreamSpec) -> ContinualModel:
    return ResNet18(spec.input_shape, spec.classes_per_task, multi_head(cfg, spec), spec.n_classes, nf=cfg.width,
                    stem_stride=cfg.stem_stride, bias=cfg.bias)


def _snn_mlp(cfg: SpikingMLPConfig, spec: StreamSpec) -> ContinualModel:
    return SpikingMLP(spec.input_shape, list(cfg.hidden), spec.classes_per_task, multi_head(cfg, spec),
                      spec.n_classes, time_steps=cfg.time_steps, neuron=cfg.neuron_factory(), bias=cfg.bias,
                      time_shared_grad=cfg.time_shared_grad)


def _snn_cnn(cfg: SpikingCNNConfig, spec: StreamSpec) -> ContinualModel:
    return SpikingCNN(spec.input_shape, spec.classes_per_task, multi_head(cfg, spec), spec.n_classes,
                      time_steps=cfg.time_steps, neuron=cfg.neuron_factory(), channels=list(cfg.channels),
                      bias=cfg.bias, bn_running_stats=cfg.bn_running_stats)


def _snn_resnet18(cfg: SpikingResNetConfig, spec: StreamSpec) -> ContinualModel:
    return SpikingResNet18(spec.input_shape, spec.classes_per_task, multi_head(cfg, spec), spec.n_classes,
                           time_steps=cfg.time_steps, neuron=cfg.neuron_factory(), nf=cfg.width,
                           stem_stride=cfg.stem_stride, bias=cfg.bias, bn_running_stats=cfg.bn_running_stats)


MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry(MLPConfig, _mlp),
    "alexnet": ModelEntry(AlexNetConfig, _image_net(_alexnet)),
    "resnet18": ModelEntry(ResNetConfig, _image_net(_resnet18)),
    "snn_mlp": ModelEntry(SpikingMLPConfig, _snn_mlp),
    "snn_cnn": ModelEntry(SpikingCNNConfig, _image_net(_snn_cnn)),
    "snn_resnet18": ModelEntry(SpikingResNetConfig, _image_net(_snn_resnet18)),
    "causal_lm": ModelEntry(LMConfig, build_lm, text=True),
    "seq2seq_lm": ModelEntry(LMConfig, build_lm, text=True),
}
"""Registry: model name → its config class and builder."""


def model_config(name: str, **values: Any) -> ModelConfig:
    """The config of model ``name`` with ``values`` over its family's defaults (what ``model=<name>`` gives).

    Raises:
        ValueError: an unknown model name.
    """
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not a registered model; valid: {sorted(MODELS)}")
    return MODELS[name].config(name=name, **values)


def build_model(cfg: ModelConfig, spec: Any) -> ContinualModel:
    """Build ``cfg.name`` for the stream: input size, classes and head layout from ``spec`` (a language model
    reads any text stream).

    Raises:
        ValueError: a text model on an image stream or the reverse, naming both and the valid choices.
    """
    entry = MODELS[cfg.name]
    if entry.text != isinstance(spec, TextStreamSpec):
        valid = sorted(n for n, e in MODELS.items() if e.text != entry.text)
        kind = "a text stream" if entry.text else "an image / tensor stream"
        raise ValueError(f"model.name={cfg.name} needs {kind}, and benchmark '{spec.name}' is not one; for this "
                         f"benchmark use one of model.name={valid}, or change benchmark.name")
    return entry.build(cfg, spec)


__all__ = ["MLP", "MODELS", "AlexNet", "Classifier", "ContinualModel", "LMConfig", "LanguageModel", "ModelEntry",
           "ResNet18", "SpikingCNN", "SpikingMLP", "SpikingResNet18", "build_model", "model_config"]
