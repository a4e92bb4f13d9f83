"""Typed configs: one dataclass per component, and their validation.

Hydra composes ``clbench/conf/``; :func:`load` then merges the result into these schemas (an unknown key or a
wrong type fails here, naming the key) and checks ranges, all before any data or model is touched. Each
strategy brings its own config dataclass (``strategies/<name>.py``), looked up by ``strategy.name``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from clbench.schedule import SCHEDULES


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and what would be valid."""


@dataclass
class BenchmarkConfig:
    """A continual stream. ``name`` picks the builder in :mod:`clbench.streams`.

    Attributes:
        name: registered stream name (see ``clbench.streams.STREAMS``).
        n_tasks: number of experiences.
        scenario: for split streams, ``task`` (task-incremental: one head per task, labels local to the task)
            or ``class`` (class-incremental: one head over all classes). Permuted streams are always
            domain-incremental (one shared head) and ignore it.
        data_root: where real data sets live (downloads go there when ``download`` is true).
        download: allow the real loaders to download missing data.
        test_fraction: held-out fraction for the offline sets that ship without a test split.
        validation_fraction: fraction of each training experience held out for validation (0: none).
        max_train_per_task: cap on training samples per experience (0: no cap); for quick runs.
        stream_seed: seed of the stream's own randomness (permutations, class order, splits); ``null`` uses
            the run seed.
    """

    name: str = "permuted_mnist_5k"
    n_tasks: int = 10
    scenario: str = "domain"
    data_root: str = "data"
    download: bool = False
    test_fraction: float = 0.2
    validation_fraction: float = 0.0
    max_train_per_task: int = 0
    stream_seed: int | None = None


@dataclass
class ModelConfig:
    """A network from :mod:`clbench.models`.

    Attributes:
        name: registered model name (``mlp``, ``alexnet``, ``resnet18``, ``snn_mlp``, ``snn_cnn``,
            ``snn_resnet18``).
        hidden: widths of the hidden layers of the MLP (GPM's PMNIST net: [100, 100]).
        bias: whether the layers have biases (GPM's nets have none).
        head: ``auto`` (one head per task when the stream is task-incremental, else one shared head),
            ``single`` or ``multi``.
        dropout: dropout after each hidden activation of the MLP (0: none); the conv nets use their papers'.
        width: base width of the reduced ResNet-18 (nf; GPM uses 20).
        stem_stride: stride of the ResNet's first conv (1 for 32×32 inputs, 2 for miniImageNet's 84×84; the
            spiking ResNet's stem is then 5×5 instead of 3×3).
        channels: the spiking CNN's conv widths (HLOP: [64, 128, 256]).
        bn_running_stats: spiking conv nets: BatchNorm keeps running statistics for eval mode (HLOP's code);
            false: batch statistics always (GPM's convention, that of alexnet/resnet18).
        time_steps: spiking nets: T, the simulated time steps per sample (HLOP: 20 under DSR, 6 under BPTT).
        neuron: spiking nets: ``dsr`` (LIF trained by DSR, HLOP's main results) or ``bptt`` (LIF, BPTT with a
            sigmoid surrogate); see :mod:`clbench.models.snn`.
        tau: spiking nets: the membrane time constant τ; null = the neuron's paper value (DSR 1, BPTT 2).
        v_th: spiking nets: the (initial) threshold V_th; null = the neuron's paper value (DSR 0.3, BPTT 1).
        dt: DSR: the step Δt (0.05); spikes carry V_th/Δt.
        fire_at: DSR: fire when the potential reaches this fraction of V_th (0.3; the reset subtracts V_th).
        v_th_min: DSR: lower bound of the trainable V_th (5e-4).
        train_v_th: DSR: V_th is a trainable parameter (one per layer).
        surrogate_alpha: BPTT: steepness α of the sigmoid surrogate gradient (4).
    """

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [100, 100])
    bias: bool = False
    head: str = "auto"
    dropout: float = 0.0
    width: int = 20
    stem_stride: int = 1
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    bn_running_stats: bool = False
    time_steps: int = 20
    neuron: str = "dsr"
    tau: float | None = None
    v_th: float | None = None
    dt: float = 0.05
    fire_at: float = 0.3
    v_th_min: float = 5e-4
    train_v_th: bool = True
    surrogate_alpha: float = 4.0


@dataclass
class EngineConfig:
    """The inner training loop on Lightning Fabric.

    Attributes:
        epochs: epochs per experience.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        lr: learning rate of experiences 2..T.
        first_lr: learning rate of the first experience (papers often use a different one); null = ``lr``.
        optimizer: ``sgd`` or ``adam``; a fresh optimizer is built for every experience (as GPM's code).
        momentum: SGD momentum.
        weight_decay: L2 weight decay (note: it pulls weights along protected subspaces).
        accelerator: Fabric accelerator (``auto``, ``cpu``, ``cuda``, ``gpu``, ``mps``).
        devices: Fabric devices; 1 (multi-device training is not implemented yet).
        precision: Fabric precision: ``32-true`` or mixed ``bf16-mixed`` / ``16-mixed`` (weights stay fp32, so
            bases and projections keep full precision).
        progress: ``auto`` (a live display on a TTY, one line per experience otherwise), ``bar`` or ``none``.
        cache_bytes: experiences up to this size are cached as tensors on the device; larger ones stream
            through a DataLoader.
        checkpoint_every_epoch: checkpoint at every epoch end (always at every experience end).
        schedule: ``constant`` learning rate; ``plateau``: the patience rule of GPM's code (HAT's) on the
            validation loss, with early stopping and best-weights restore (:mod:`clbench.schedule`), needs
            ``benchmark.validation_fraction > 0``; ``cosine``: HLOP's warm-up + cosine rule per epoch.
        lr_min: ``plateau``: stop the experience once the learning rate falls below this.
        patience: ``plateau``: epochs without a better validation loss before the learning rate is divided.
        lr_factor: ``plateau``: the divisor of the learning rate.
        warmup_epochs: ``cosine``: W, epochs of linear warm-up (HLOP's code: 5 on CIFAR-100, else 0).
        t_max: ``cosine``: T_max in epochs; null = ``epochs``.
    """

    epochs: int = 5
    batch_size: int = 10
    eval_batch_size: int = 1000
    lr: float = 0.01
    first_lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    accelerator: str = "auto"
    devices: Any = 1
    precision: str = "32-true"
    progress: str = "auto"
    cache_bytes: int = 2**30
    checkpoint_every_epoch: bool = True
    schedule: str = "constant"
    lr_min: float = 1e-5
    patience: int = 6
    lr_factor: float = 2.0
    warmup_epochs: int = 0
    t_max: int | None = None


@dataclass
class TrackingConfig:
    """MLflow tracking.

    Attributes:
        uri: tracking URI; the default is an embedded SQLite store in the working directory. Name a server
            (``http://host:5000``) to log there.
        experiment: MLflow experiment name; a sweep logs all its runs into it.
        run_name: run name; null = ``<strategy>-<benchmark>-s<seed>``.
        artifact_root: where a new experiment on a local store keeps artifacts.
    """

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "clbench"
    run_name: str | None = None
    artifact_root: str = "mlartifacts"


@dataclass
class FederatedConfig:
    """Continual federated learning (FOT's protocol, fot.md §2 and §4); read by federated strategies only.

    Clients train with the engine's optimizer settings (``engine.batch_size``, ``engine.lr``, ``engine.optimizer``,
    ``engine.momentum``, ``engine.weight_decay``); ``engine.epochs`` is not used (see ``local_epochs``).

    Attributes:
        engine: ``inprocess``: the clients run one after another in this process (:mod:`clbench.federated.loop`).
            ``flower``: the same clients and server on Flower (the ``flower`` extra, fot.md §9): the server in a
            ServerApp, each client a SuperNode whose ClientApps run the client's rounds in their own processes
            (:mod:`clbench.federated.flower_app`); the same accuracy matrix as ``inprocess``.
        clients: K, the clients each task's training data is split over; every client holds a part of every
            task (the code's ``task_pct_per_client`` = 1).
        per_round: C, the clients sampled per round without replacement (all holders of the task when fewer).
        rounds_per_task: communication rounds per task: one value for every task, or a list with one per task
            (5-Datasets: 1000, 100, 200, 100, 100).
        local_epochs: E, local epochs of each sampled client per round (the code: 1).
        partition: how each task's training data is split over the clients: ``iid``, ``shards`` (the 2-shard
            non-IID split of the code) or ``dirichlet`` (per-class Dirichlet(α), not in FOT).
        alpha: α of ``partition=dirichlet``.
        secure_sum: clients mask their task-end reports pairwise (:mod:`clbench.federated.secure_sum`), so the
            server sees only their sum; false sends them in the clear (the code: a plain sum).
        flower_federation: with ``engine=flower``: null starts a SuperLink and ``clients`` SuperNodes on
            127.0.0.1 for the run and stops them after it (:mod:`clbench.federated.flower_launch`); a name submits
            the run to that federation of ``$FLWR_HOME/config.toml`` (e.g. a cluster's SuperLink, whose
            SuperNodes were started with ``--node-config "partition-id=k num-partitions=K"``, k = 0…K−1).
        flower_timeout: seconds the server waits for the SuperNodes to connect and for each round's replies.
    """

    engine: str = "inprocess"
    clients: int = 10
    per_round: int = 5
    rounds_per_task: Any = 20
    local_epochs: int = 1
    partition: str = "iid"
    alpha: float = 0.5
    secure_sum: bool = False
    flower_federation: str | None = None
    flower_timeout: float = 600.0


@dataclass
class StrategyConfig:
    """Base of every strategy's config; ``name`` picks the class in :mod:`strategies`."""

    name: str = "naive"

    def validate(self) -> None:
        """Range checks of the strategy's own keys; raise :class:`ConfigError` naming ``strategy.<key>``."""


@dataclass
class RunConfig:
    """One run: everything :func:`clbench.experiment.run` needs.

    Attributes:
        seed: seed of the model init, shuffling and sampling (and the stream unless ``stream_seed`` is set).
        resume: continue the run with the same config from its last checkpoint, in the same MLflow run.
        checkpoint_dir: root of the checkpoints, one folder per config (relative to the working directory).
        threads: torch CPU threads (null: torch's default).
        federated: the federated setting of federated strategies (``fedavg``, ``fot``); must stay at its
            defaults for the others.
    """

    seed: int = 0
    resume: bool = False
    checkpoint_dir: str = "checkpoints"
    threads: int | None = None
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    strategy: Any = field(default_factory=StrategyConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "benchmark.scenario": ("domain", "task", "class"),
    "model.head": ("auto", "single", "multi"),
    "engine.optimizer": ("sgd", "adam"),
    "engine.progress": ("auto", "bar", "none"),
    "engine.accelerator": ("auto", "cpu", "cuda", "gpu", "mps"),
    "engine.precision": ("32-true", "32", "bf16-mixed", "16-mixed"),
    "engine.schedule": SCHEDULES,
}


def register_defaults() -> None:
    """Store each component's defaults in Hydra's ConfigStore as ``_defaults/<group>``.

    ``config.yaml`` merges them under every group's yaml, so any key of the schema can be overridden from the
    command line (``benchmark.validation_fraction=0.05``) even when the chosen yaml does not list it. They are
    plain dicts, not structured configs: an unknown key is still reported by :func:`load`, naming the valid ones.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, schema in (("benchmark", BenchmarkConfig), ("model", ModelConfig), ("engine", EngineConfig),
                          ("tracking", TrackingConfig), ("federated", FederatedConfig)):
        store.store(group="_defaults", name=group, node=asdict(schema()))


register_defaults()


def _merge(schema: Any, node: Any, prefix: str) -> Any:
    """Merge ``node`` into the structured ``schema``; turn OmegaConf errors into :class:`ConfigError`."""
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, node)
    except ConfigKeyError as e:
        f"{prefix}{e.key}" if e.key is not None else prefix.rstrip(".")
        parent = e.full_key.rsplit(".", 1)[0] if e.full_key and "." in str(e.full_key) else ""
        valid = sorted(OmegaConf.select(base, parent).keys() if parent else base.keys())
        raise ConfigError(f"unknown config key '{prefix}{e.full_key}'; valid keys here: {valid}") from None
    except (ValidationError, OmegaConfBaseException) as e:
        raise ConfigError(f"bad value for '{prefix}{e.full_key}': {e.msg}") from None
    return OmegaConf.to_object(merged)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"bad value for '{key}': {msg}")


def load(cfg: DictConfig | dict) -> RunConfig:
    """Validate a composed config and return the typed :class:`RunConfig`.

    Raises:
        ConfigError: an unknown key, a wrong type, an unknown strategy / benchmark / model or an out-of-range
            value; the message names the key and the valid values.
    """
    from clbench.models import MODELS
    from clbench.streams import STREAMS
    from strategies import config_class, is_federated, strategy_names

    node = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    container = OmegaConf.to_container(node, resolve=True)
    assert isinstance(container, dict)
    container = {k: v for k, v in container.items() if k != "hydra"}
    strategy_node = container.pop("strategy", None) or {}
    run: RunConfig = _merge(RunConfig, container | {"strategy": None}, "")

    name = strategy_node.get("name")
    if name not in strategy_names():
        raise ConfigError(f"unknown strategy '{name}' (strategy.name); valid: {strategy_names()}")
    run.strategy = _merge(config_class(name), strategy_node, "strategy.")

    b, m, e = run.benchmark, run.model, run.engine
    if b.name not in STREAMS:
        raise ConfigError(f"unknown benchmark '{b.name}' (benchmark.name); valid: {sorted(STREAMS)}")
    if m.name not in MODELS:
        raise ConfigError(f"unknown model '{m.name}' (model.name); valid: {sorted(MODELS)}")
    for key, choices in _CHOICES.items():
        section, attr = key.split(".")
        value = str(getattr(getattr(run, section), attr))
        _check(value in choices, key, f"'{value}' is not one of {list(choices)}")
    _check(b.n_tasks >= 1, "benchmark.n_tasks", f"{b.n_tasks}; must be >= 1")
    _check(0.0 < b.test_fraction < 1.0, "benchmark.test_fraction", f"{b.test_fraction}; must be in (0, 1)")
    _check(0.0 <= b.validation_fraction < 1.0, "benchmark.validation_fraction",
           f"{b.validation_fraction}; must be in [0, 1)")
    _check(b.max_train_per_task >= 0, "benchmark.max_train_per_task", "must be >= 0 (0: no cap)")
    _check(all(h >= 1 for h in m.hidden), "model.hidden", f"{m.hidden}; widths must be >= 1")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"{m.dropout}; must be in [0, 1)")
    _check(m.width >= 1, "model.width", f"{m.width}; must be >= 1")
    _check(m.stem_stride in (1, 2), "model.stem_stride", f"{m.stem_stride}; must be 1 or 2")
    _check(m.time_steps >= 1, "model.time_steps", f"{m.time_steps}; must be >= 1")
    _check(m.neuron in ("dsr", "bptt"), "model.neuron", f"'{m.neuron}' is not one of ['dsr', 'bptt']")
    _check(m.tau is None or (m.tau > 0 and (m.neuron != "bptt" or m.tau >= 1)), "model.tau",
           f"{m.tau}; must be > 0 (>= 1 for the bptt neuron, whose leak is 1 - 1/tau) or null")
    _check(m.v_th is None or m.v_th > 0, "model.v_th", f"{m.v_th}; must be > 0 or null")
    _check(m.dt > 0, "model.dt", f"{m.dt}; must be > 0")
    _check(0 < m.fire_at <= 1, "model.fire_at", f"{m.fire_at}; must be in (0, 1]")
    _check(m.v_th_min >= 0, "model.v_th_min", f"{m.v_th_min}; must be >= 0")
    _check(m.surrogate_alpha > 0, "model.surrogate_alpha", f"{m.surrogate_alpha}; must be > 0")
    _check(m.name != "snn_mlp" or len(m.hidden) >= 1, "model.hidden", "snn_mlp needs at least one hidden layer")
    _check(len(m.channels) >= 1 and all(c >= 1 for c in m.channels), "model.channels",
           f"{m.channels}; needs at least one width, each >= 1")
    _check(e.epochs >= 1, "engine.epochs", f"{e.epochs}; must be >= 1")
    _check(e.batch_size >= 1, "engine.batch_size", f"{e.batch_size}; must be >= 1")
    _check(e.eval_batch_size >= 1, "engine.eval_batch_size", f"{e.eval_batch_size}; must be >= 1")
    _check(e.lr > 0, "engine.lr", f"{e.lr}; must be > 0")
    _check(e.first_lr is None or e.first_lr > 0, "engine.first_lr", f"{e.first_lr}; must be > 0 or null")
    _check(0.0 <= e.momentum < 1.0, "engine.momentum", f"{e.momentum}; must be in [0, 1)")
    _check(e.weight_decay >= 0, "engine.weight_decay", f"{e.weight_decay}; must be >= 0")
    _check(type(e.devices) is int and e.devices == 1, "engine.devices",
           f"{e.devices}; must be 1: multi-device (DDP) training is not implemented yet")
    _check(run.threads is None or run.threads >= 1, "threads", f"{run.threads}; must be >= 1 or null")
    _check(e.cache_bytes >= 0, "engine.cache_bytes", "must be >= 0")
    _check(e.lr_min >= 0, "engine.lr_min", f"{e.lr_min}; must be >= 0")
    _check(e.patience >= 1, "engine.patience", f"{e.patience}; must be >= 1")
    _check(e.lr_factor > 1, "engine.lr_factor", f"{e.lr_factor}; must be > 1")
    t_max = e.epochs if e.t_max is None else e.t_max
    _check(0 <= e.warmup_epochs < t_max, "engine.warmup_epochs",
           f"{e.warmup_epochs}; must be >= 0 and below engine.t_max (or engine.epochs when t_max is null): {t_max}")
    _check(e.schedule != "plateau" or b.validation_fraction > 0, "engine.schedule",
           "'plateau' watches the validation loss; set benchmark.validation_fraction > 0 (GPM's code: 0.05)")
    _check_federated(run, is_federated(name))
    run.strategy.validate()
    return run


_FEDERATED_ENGINES = ("inprocess", "flower")


def rounds_per_task(value: Any, n_tasks: int) -> list[int]:
    """``federated.rounds_per_task`` as one count per task (one value: every task).

    Raises:
        ConfigError: a count < 1, or a list whose length is neither 1 nor ``n_tasks``.
    """
    counts = list(value) if isinstance(value, list | tuple) else [value]
    _check(all(type(c) is int and c >= 1 for c in counts) and len(counts) in (1, n_tasks),
           "federated.rounds_per_task", f"{value}; give one count >= 1, or one per task ({n_tasks})")
    return counts * n_tasks if len(counts) == 1 else counts


def _check_federated(run: RunConfig, federated: bool) -> None:
    """The ``federated`` keys: honoured by federated strategies, refused by the others when set (they would be
    ignored, yet logged and hashed into the config key as if they mattered)."""
    from clbench.federated.partition import SCHEMES

    f, name = run.federated, run.strategy.name
    if not federated:
        changed = sorted(k for k, v in asdict(f).items() if v != getattr(FederatedConfig(), k))
        _check(not changed, f"federated.{changed[0] if changed else ''}",
               f"strategy '{name}' is not federated, so federated.* settings ({changed}) have no effect; use a "
               f"federated strategy ({federated_strategy_names()}) or drop them")
        return
    _check(f.engine in _FEDERATED_ENGINES, "federated.engine", f"'{f.engine}' is not one of {list(_FEDERATED_ENGINES)}")
    if f.engine == "flower":
        _check(importlib.util.find_spec("flwr") is not None, "federated.engine",
               "'flower' needs Flower: pip install -c constraints.txt -e '.[flower]'")
    _check(math.isfinite(f.flower_timeout) and f.flower_timeout > 0, "federated.flower_timeout",
           f"{f.flower_timeout}; must be a finite number of seconds > 0")
    _check(f.flower_federation is None or (f.engine == "flower" and f.flower_federation.strip() != ""),
           "federated.flower_federation", f"'{f.flower_federation}'; a federation of $FLWR_HOME/config.toml for "
           "federated.engine=flower, or null (a local federation)")
    _check(f.clients >= 1, "federated.clients", f"{f.clients}; must be >= 1")
    _check(1 <= f.per_round <= f.clients, "federated.per_round", f"{f.per_round}; must be in [1, federated.clients]")
    rounds_per_task(f.rounds_per_task, run.benchmark.n_tasks)
    _check(f.local_epochs >= 1, "federated.local_epochs", f"{f.local_epochs}; must be >= 1")
    _check(f.partition in SCHEMES, "federated.partition", f"'{f.partition}' is not one of {list(SCHEMES)}")
    _check(math.isfinite(f.alpha) and f.alpha > 0, "federated.alpha", f"{f.alpha}; must be > 0")
    _check(not run.resume, "resume", f"strategy '{name}' is federated, and federated runs are not checkpointed "
           "(clbench.federated.loop): resume=true cannot continue one")
    _check(run.engine.schedule == "constant", "engine.schedule",
           f"'{run.engine.schedule}'; federated clients train with a constant learning rate (FOT's code)")


_UNKEYED = ("resume", "checkpoint_dir", "threads", "tracking.", "engine.progress", "federated.engine",
            "federated.flower_")


def _keyed(flat: dict[str, Any], defaults: dict[str, Any]) -> dict[str, str]:
    """The settings that define results: every schema key but :data:`_UNKEYED` and the seed, whose value
    (as text, as MLflow stores it) differs from the schema's default; the component names always."""
    return {k: str(v) for k, v in flat.items() if k in defaults and not k.startswith(_UNKEYED) and k != "seed"
            and (k.endswith(".name") or str(v) != str(defaults[k]))}


def federated_strategy_names() -> list[str]:
    """The registered federated strategies, sorted."""
    from strategies import is_federated, strategy_names

    return [n for n in strategy_names() if is_federated(n)]


def _schema_defaults(strategy: str) -> dict[str, Any]:
    from strategies import config_class

    base = RunConfig(strategy=config_class(strategy)())
    return flatten(asdict(base))


def _digest(items: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(items.items())).encode()).hexdigest()[:16]


def fingerprint(cfg: RunConfig, with_seed: bool = True) -> str:
    """A stable hash of everything that defines a run's results: the keys whose value differs from the schema
    default (not ``resume``, paths, threads, display or tracking). Omitting defaults keeps the hash of every
    earlier run when a new key is added with a default that keeps the old behaviour. With ``with_seed=False`` it
    names a configuration whose seeds ``clbench report`` aggregates."""
    items = _keyed(flatten(asdict(cfg)), _schema_defaults(cfg.strategy.name))
    return _digest(items | ({"seed": str(cfg.seed)} if with_seed else {}))


def fingerprint_params(params: dict[str, str]) -> str:
    """:func:`fingerprint` (without the seed) of a run from its MLflow params (the flattened config as text)."""
    return _digest(_keyed(params, _schema_defaults(params["strategy.name"])))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a (nested) config into ``{"engine.lr": 0.01, ...}`` for MLflow params."""
    node = OmegaConf.structured(obj) if not isinstance(obj, DictConfig | dict) else OmegaConf.create(obj)
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = value

    walk(OmegaConf.to_container(node, resolve=True), prefix)
    return out
