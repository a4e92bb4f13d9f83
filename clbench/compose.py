"""From a composed Hydra config to the validated :class:`~clbench.config.RunConfig`.

Hydra composes ``clbench/conf/``. Under each group's yaml it merges that option's schema, the defaults of its
family's config class, stored here in Hydra's ConfigStore as ``_schema/<group>/<name>`` (``config.yaml`` picks
it with an interpolation of the group's choice), so any key of the family can be overridden from the command
line even when the yaml does not list it, and ``name`` comes from the registration alone. :func:`load` then
merges the result into the typed classes (an unknown key or a wrong type fails naming the key and the valid
ones) and checks every range, all before any data or model is touched.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from clbench.config import (
    ConfigError,
    EngineConfig,
    FederatedConfig,
    RunConfig,
    TrackingConfig,
    check,
    rounds_per_task,
)
from clbench.federated.partition import SCHEMES
from clbench.models import MODELS
from clbench.streams import STREAM_CONFIGS
from strategies import config_class, is_federated, strategy_class, strategy_names

FEDERATED_ENGINES = ("inprocess", "flower")


def _open(defaults: dict[str, Any]) -> DictConfig:
    """``defaults`` as a config that is not in struct mode, also once Hydra has set it on the composed root: an
    override of a key it lacks (``engine.lrr=0.1``) then reaches :func:`load`, which names the section's valid keys,
    instead of failing in Hydra with no list (and a hint to add the key with ``+``)."""
    node = OmegaConf.create(defaults)
    OmegaConf.set_struct(node, False)
    return node


def register_schemas() -> None:
    """Store the defaults of every registered stream, model and strategy (``_schema/<group>/<name>``) and of the
    single-class groups (``_defaults/<group>``) in Hydra's ConfigStore. They are plain dicts, not structured
    configs, and not in struct mode (:func:`_open`): an unknown key, with or without ``+``, is reported by
    :func:`load`, naming the valid ones."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, schema in (("engine", EngineConfig), ("tracking", TrackingConfig), ("federated", FederatedConfig)):
        store.store(group="_defaults", name=group, node=_open(asdict(schema())))
    for name, cls in STREAM_CONFIGS.items():
        store.store(group="_schema/benchmark", name=name, node=_open(asdict(cls(name=name))))
    for name, entry in MODELS.items():
        store.store(group="_schema/model", name=name, node=_open(asdict(entry.config(name=name))))
    for name in strategy_names():
        store.store(group="_schema/strategy", name=name, node=_open(asdict(config_class(name)(name=name))))


register_schemas()


def _merge(schema: Any, node: Any, prefix: str) -> Any:
    """Merge ``node`` into the structured ``schema``; turn OmegaConf errors into :class:`ConfigError`."""
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, node)
    except ConfigKeyError as e:
        parent = e.full_key.rsplit(".", 1)[0] if e.full_key and "." in str(e.full_key) else ""
        valid = sorted(OmegaConf.select(base, parent).keys() if parent else base.keys())
        raise ConfigError(f"unknown config key '{prefix}{e.full_key}'; valid keys here: {valid}") from None
    except (ValidationError, OmegaConfBaseException) as e:
        raise ConfigError(f"bad value for '{prefix}{e.full_key}': {e.msg}") from None
    return OmegaConf.to_object(merged)


def _family(group: str, node: dict[str, Any], registry: dict[str, Any]) -> Any:
    """The typed config of ``group`` (benchmark, model, strategy): the class its ``name`` registered."""
    name = node.get("name")
    if name not in registry:
        raise ConfigError(f"unknown {group} '{name}' ({group}.name); valid: {sorted(registry)}")
    if group == "strategy":
        node = _one_for_all(node, registry[name](name=name))
    return _merge(registry[name], node, f"{group}.")


def _one_for_all(node: dict[str, Any], defaults: Any) -> dict[str, Any]:
    """``node`` with a single number given for a strategy's per-layer list of numbers (``strategy.threshold=0.97``)
    as that one-element list, which the strategies read as "the same value for every layer"."""

    def per_layer_numbers(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, int | float) for v in value)

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    return {k: [v] if number(v) and per_layer_numbers(getattr(defaults, k, None)) else v for k, v in node.items()}


def load(cfg: DictConfig | dict) -> RunConfig:
    """Validate a composed config and return the typed :class:`RunConfig`.

    Raises:
        ConfigError: an unknown key, a wrong type, an unknown strategy / benchmark / model or an out-of-range
            value; the message names the key and the valid values.
    """
    node = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    container = OmegaConf.to_container(node, resolve=True)
    assert isinstance(container, dict)
    parts = {g: container.pop(g, None) or {} for g in ("benchmark", "model", "strategy")}
    container = {k: v for k, v in container.items() if k != "hydra"}
    run: RunConfig = _merge(RunConfig, container | dict.fromkeys(parts), "")
    run.benchmark = _family("benchmark", parts["benchmark"], STREAM_CONFIGS)
    run.model = _family("model", parts["model"], {n: e.config for n, e in MODELS.items()})
    run.strategy = _family("strategy", parts["strategy"], {n: config_class(n) for n in strategy_names()})
    run.benchmark.validate()
    run.model.validate()
    run.engine.validate()
    run.tracking.validate()
    check(run.threads is None or run.threads >= 1, "threads", f"{run.threads}; must be >= 1 or null")
    check(run.engine.schedule != "plateau" or run.benchmark.validation_fraction > 0, "engine.schedule",
          "'plateau' watches the validation loss; set benchmark.validation_fraction > 0 (GPM's code: 0.05)")
    _check_federated(run, is_federated(run.strategy.name))
    _check_devices(run)
    run.strategy.validate()
    return run


def federated_strategy_names() -> list[str]:
    """The registered federated strategies, sorted."""
    return [n for n in strategy_names() if is_federated(n)]


def _check_devices(run: RunConfig) -> None:
    """Several devices shard the engine's loop (:mod:`clbench.distributed`): a strategy that trains otherwise is
    refused, before any process is spawned."""
    cls = strategy_class(run.strategy.name)
    why = ("simulates its clients in one process" if cls.federated else
           "runs its own training loop" if cls.overrides("train_experience") else None)
    check(run.engine.devices == 1 or why is None, "engine.devices",
          f"{run.engine.devices}; strategy '{run.strategy.name}' {why}, which is not sharded over devices: use "
          "engine.devices=1")


def _check_federated(run: RunConfig, federated: bool) -> None:
    """The ``federated`` keys: honoured by federated strategies, refused by the others when set (they would be
    ignored, yet hashed into the config key as if they mattered)."""
    f, name = run.federated, run.strategy.name
    if not federated:
        changed = sorted(k for k, v in asdict(f).items() if v != getattr(FederatedConfig(), k))
        check(not changed, f"federated.{changed[0] if changed else ''}",
              f"strategy '{name}' is not federated, so federated.* settings ({changed}) have no effect; use a "
              f"federated strategy ({federated_strategy_names()}) or drop them")
        return
    check(f.engine in FEDERATED_ENGINES, "federated.engine", f"'{f.engine}' is not one of {list(FEDERATED_ENGINES)}")
    if f.engine == "flower":
        check(importlib.util.find_spec("flwr") is not None, "federated.engine",
              "'flower' needs Flower: pip install -c constraints.txt -e '.[flower]'")
    check(math.isfinite(f.flower_timeout) and f.flower_timeout > 0, "federated.flower_timeout",
          f"{f.flower_timeout}; must be a finite number of seconds > 0")
    check(f.flower_federation is None or (f.engine == "flower" and f.flower_federation.strip() != ""),
          "federated.flower_federation", f"'{f.flower_federation}'; a federation of $FLWR_HOME/config.toml for "
          "federated.engine=flower, or null (a local federation)")
    check(f.clients >= 1, "federated.clients", f"{f.clients}; must be >= 1")
    check(1 <= f.per_round <= f.clients, "federated.per_round", f"{f.per_round}; must be in [1, federated.clients]")
    rounds_per_task(f.rounds_per_task, run.benchmark.n_tasks)
    check(f.local_epochs >= 1, "federated.local_epochs", f"{f.local_epochs}; must be >= 1")
    check(f.partition in SCHEMES, "federated.partition", f"'{f.partition}' is not one of {list(SCHEMES)}")
    check(math.isfinite(f.alpha) and f.alpha > 0, "federated.alpha", f"{f.alpha}; must be > 0")
    check(not (run.resume and f.engine == "flower"), "federated.engine",
          "'flower' runs are not checkpointed, so resume=true cannot continue one; resume works with "
          "federated.engine=inprocess")
    check(run.engine.schedule == "constant", "engine.schedule",
          f"'{run.engine.schedule}'; federated clients train with a constant learning rate (FOT's code)")
