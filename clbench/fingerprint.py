"""Run fingerprints: the hash of the settings that define a run's results, and the params a run logs.

A setting counts when its value differs from its family's default (a new key added with a default that keeps the
old behaviour keeps every earlier run's hash), plus the component names; never ``resume``, paths, threads,
display, tracking or the federated engine (both engines give the same results).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from clbench.config import RunConfig, flatten
from clbench.models import MODELS
from clbench.streams import STREAM_CONFIGS
from strategies import config_class, is_federated

_UNKEYED = ("resume", "checkpoint_dir", "threads", "tracking.", "engine.progress", "federated.engine",
            "federated.flower_")


def _keyed(flat: dict[str, Any], defaults: dict[str, Any]) -> dict[str, str]:
    """The settings that define results: every schema key (or an entry of a dict-valued key) but
    :data:`_UNKEYED` and the seed whose value (as text, as MLflow stores it) differs from the schema's default;
    the component names always."""

    def known(k: str) -> bool:
        return k in defaults or k.rsplit(".", 1)[0] in defaults

    return {k: str(v) for k, v in flat.items() if known(k) and not k.startswith(_UNKEYED) and k != "seed"
            and (k.endswith(".name") or str(v) != str(defaults.get(k)))}


def _schema_defaults(strategy: str, model: str, benchmark: str) -> dict[str, Any]:
    base = RunConfig(strategy=config_class(strategy)(name=strategy), model=MODELS[model].config(name=model),
                     benchmark=STREAM_CONFIGS[benchmark](name=benchmark))
    return flatten(asdict(base))


def _digest(items: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(items.items())).encode()).hexdigest()[:16]


def fingerprint(cfg: RunConfig, with_seed: bool = True) -> str:
    """A stable hash of everything that defines a run's results (see the module). With ``with_seed=False`` it
    names a configuration whose seeds ``clbench report`` aggregates."""
    defaults = _schema_defaults(cfg.strategy.name, cfg.model.name, cfg.benchmark.name)
    items = _keyed(flatten(asdict(cfg)), defaults)
    return _digest(items | ({"seed": str(cfg.seed)} if with_seed else {}))


def fingerprint_params(params: dict[str, str]) -> str:
    """:func:`fingerprint` (without the seed) of a run from its MLflow params (the flattened config as text)."""
    return _digest(_keyed(params, _schema_defaults(params["strategy.name"], params["model.name"],
                                                   params["benchmark.name"])))


def run_params(cfg: RunConfig) -> dict[str, Any]:
    """The flattened config a run logs: its own families' keys; ``federated.*`` only for a federated strategy."""
    flat = flatten(asdict(cfg))
    if not is_federated(cfg.strategy.name):
        flat = {k: v for k, v in flat.items() if not k.startswith("federated.")}
    return flat
