"""Continual-learning strategies, one file per method.

A method is one module here defining a :class:`strategies.base.Strategy` subclass decorated with
:func:`register` plus a config YAML in ``clbench/conf/strategy/``. Modules are discovered on first use, so
nothing else needs editing to add one.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clbench.config import StrategyConfig
    from strategies.base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}
_DISCOVERED = False


def register(name: str):
    """Class decorator: make a Strategy subclass available as ``strategy=<name>``: the one place a method is
    named (its config's ``strategy.name`` and its Hydra schema follow from it)."""

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"strategy name '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base" and not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _DISCOVERED = True


def strategy_names() -> list[str]:
    """Names of every registered strategy, sorted."""
    _discover()
    return sorted(_REGISTRY)


def config_class(name: str) -> type[StrategyConfig]:
    """The config dataclass of strategy ``name``."""
    _discover()
    return _REGISTRY[name].config_class


def strategy_config(name: str, **values: Any) -> StrategyConfig:
    """The config of strategy ``name`` with ``values`` over its class's defaults."""
    return config_class(name)(name=name, **values)


def is_federated(name: str) -> bool:
    """Whether strategy ``name`` trains federated (:mod:`clbench.federated.loop`), not on one learner."""
    _discover()
    return _REGISTRY[name].federated


def strategy_class(name: str) -> type[Strategy]:
    """The class registered as strategy ``name``."""
    _discover()
    return _REGISTRY[name]


def build_strategy(cfg: Any) -> Strategy:
    """Instantiate the strategy named by ``cfg.name`` with its typed config.

    Raises:
        TypeError: ``cfg`` is another strategy's config class (e.g. ``HLOPConfig()``, whose ``name`` keeps the
            base default ``naive``: :func:`strategy_config` names it), which would build the wrong strategy.
    """
    _discover()
    cls = _REGISTRY[cfg.name]
    if type(cfg) is not cls.config_class:
        raise TypeError(f"strategy '{cfg.name}' takes a {cls.config_class.__name__}, got a {type(cfg).__name__}; "
                        f"build the config with strategies.strategy_config('{cfg.name}', ...)")
    return cls(cfg)
