"""Typed configs: the dataclasses of the run's components and their range checks. A leaf: it imports nothing of
clbench but the schedule names.

The model, stream and strategy families bring their own config classes (subclasses of :class:`ModelConfig`,
:class:`BenchmarkConfig`, :class:`StrategyConfig`, next to their code); :mod:`clbench.compose` merges a Hydra
config into the right classes (an unknown key or a wrong type fails there, naming the key) and validates it,
before any data or model is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

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

    def validate(self) -> None:
        """Range checks of the stream's keys; raise :class:`ConfigError` naming ``benchmark.<key>``. A stream
        family with keys of its own extends it."""
        check(self.n_tasks >= 1, "benchmark.n_tasks", f"{self.n_tasks}; must be >= 1")
        check(0.0 < self.test_fraction < 1.0, "benchmark.test_fraction", f"{self.test_fraction}; must be in (0, 1)")
        check(0.0 <= self.validation_fraction < 1.0, "benchmark.validation_fraction",
              f"{self.validation_fraction}; must be in [0, 1)")
        check(self.max_train_per_task >= 0, "benchmark.max_train_per_task", "must be >= 0 (0: no cap)")


@dataclass
class ModelConfig:
    """Base of every model family's config (peft's style: one class per family, in the family's module, e.g.
    :class:`clbench.models.mlp.MLPConfig`); ``name`` picks the model in :mod:`clbench.models`. A run logs its
    own family's keys only.

    Attributes:
        name: registered model name (``clbench.models.MODELS``).
    """

    name: str = "mlp"

    def validate(self) -> None:
        """Range checks of the model family's own keys; raise :class:`ConfigError` naming ``model.<key>``."""

    def missing_files(self) -> str | None:
        """What the model needs from disk and does not find there (weights that were never downloaded), in one
        sentence, or None; a cheap check, without loading anything. A run whose data is missing too names both."""
        return None


@dataclass
class EngineConfig:
    """The inner training loop on Lightning Fabric.

    Attributes:
        epochs: epochs per experience.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        lr: learning rate of experiences 2..T.
        first_lr: learning rate of the first experience (papers often use a different one); null = ``lr``.
        optimizer: ``sgd``, ``adam``, ``adamw`` or the name of any ``torch.optim`` optimizer (``RMSprop``); a fresh
            optimizer is built for every experience (as GPM's code).
        first_optimizer: the optimizer of the first experience (e.g. a stand-in's pre-training with Adam before
            alignment stages under plain SGD); null = ``optimizer``.
        momentum: SGD momentum.
        weight_decay: weight decay (L2 for SGD / Adam, decoupled for AdamW; note: it pulls weights along
            protected subspaces).
        optimizer_args: further keyword arguments of the optimizer (``{betas: [0.9, 0.999], eps: 1e-6}``).
        warmup_steps: linear warm-up of the learning rate over the first optimizer steps of every experience:
            step s (from 0) uses lr·min(1, s / warmup_steps), as Hugging Face's linear warm-up (0: none).
        accumulate: gradient accumulation: micro-batches of ``batch_size`` per optimizer step (the loss of each
            is divided by it, so a step sees the mean gradient of ``accumulate × batch_size`` samples).
        clip_norm: clip the global gradient norm to this value before each step (null: no clipping). The order
            of a step is backward → ``strategy.project`` → clip → optimizer step (OGPSA's official order).
        accelerator: Fabric accelerator (``auto``, ``cpu``, ``cuda``, ``gpu``, ``mps``).
        devices: Fabric devices: N > 1 trains on N processes with DDP (:mod:`clbench.distributed`); the global
            batch stays ``batch_size``, each rank training on its slice.
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
    first_optimizer: str | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    accumulate: int = 1
    clip_norm: float | None = None
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

    def validate(self) -> None:
        """Range checks of every ``engine.*`` key; raise :class:`ConfigError` naming it."""
        for key, choices in _ENGINE_CHOICES.items():
            value = str(getattr(self, key))
            check(value in choices, f"engine.{key}", f"'{value}' is not one of {list(choices)}")
        check(self.optimizer.lower() in OPTIMIZER_ALIASES or _is_torch_optimizer(self.optimizer), "engine.optimizer",
              f"'{self.optimizer}' is neither one of {sorted(OPTIMIZER_ALIASES)} nor a torch.optim optimizer")
        check(self.first_optimizer is None or self.first_optimizer.lower() in OPTIMIZER_ALIASES
              or _is_torch_optimizer(self.first_optimizer), "engine.first_optimizer",
              f"'{self.first_optimizer}' is neither null, one of {sorted(OPTIMIZER_ALIASES)} nor a torch.optim "
              "optimizer")
        check(self.epochs >= 1, "engine.epochs", f"{self.epochs}; must be >= 1")
        check(self.batch_size >= 1, "engine.batch_size", f"{self.batch_size}; must be >= 1")
        check(self.eval_batch_size >= 1, "engine.eval_batch_size", f"{self.eval_batch_size}; must be >= 1")
        check(self.lr > 0, "engine.lr", f"{self.lr}; must be > 0")
        check(self.first_lr is None or self.first_lr > 0, "engine.first_lr", f"{self.first_lr}; must be > 0 or null")
        check(0.0 <= self.momentum < 1.0, "engine.momentum", f"{self.momentum}; must be in [0, 1)")
        check(self.weight_decay >= 0, "engine.weight_decay", f"{self.weight_decay}; must be >= 0")
        check(self.warmup_steps >= 0, "engine.warmup_steps", f"{self.warmup_steps}; must be >= 0")
        check(self.accumulate >= 1, "engine.accumulate", f"{self.accumulate}; must be >= 1")
        check(self.clip_norm is None or (math.isfinite(self.clip_norm) and self.clip_norm > 0), "engine.clip_norm",
              f"{self.clip_norm}; must be a finite number > 0, or null (no clipping)")
        check(type(self.devices) is int and self.devices >= 1, "engine.devices",
              f"{self.devices}; must be a whole number of devices >= 1")
        check(self.cache_bytes >= 0, "engine.cache_bytes", "must be >= 0")
        check(self.lr_min >= 0, "engine.lr_min", f"{self.lr_min}; must be >= 0")
        check(self.patience >= 1, "engine.patience", f"{self.patience}; must be >= 1")
        check(self.lr_factor > 1, "engine.lr_factor", f"{self.lr_factor}; must be > 1")
        t_max = self.epochs if self.t_max is None else self.t_max
        check(0 <= self.warmup_epochs < t_max, "engine.warmup_epochs",
              f"{self.warmup_epochs}; must be >= 0 and below engine.t_max (or engine.epochs when t_max is null): "
              f"{t_max}")


@dataclass
class TrackingConfig:
    """MLflow tracking.

    Attributes:
        uri: tracking URI; the default is an embedded SQLite store in the working directory. Name a server
            (``http://host:5000``) to log there.
        experiment: MLflow experiment name; a sweep logs all its runs into it.
        run_name: run name; null = ``<strategy>-<benchmark>-s<seed>``.
        artifact_root: where a new experiment on a local store keeps artifacts.
        timeout: seconds a tracking server (``http(s)://`` URI) has to answer the check before a run starts; one
            that does not fails the run at once, naming the URI (:func:`clbench.tracking.check_store`).
    """

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "clbench"
    run_name: str | None = None
    artifact_root: str = "mlartifacts"
    timeout: float = 10.0

    def validate(self) -> None:
        """Range checks of the ``tracking.*`` keys; raise :class:`ConfigError` naming it."""
        check(self.uri.strip() != "", "tracking.uri", "empty; an MLflow tracking URI, e.g. sqlite:///mlflow.db")
        check(math.isfinite(self.timeout) and self.timeout > 0, "tracking.timeout",
              f"{self.timeout}; must be a finite number of seconds > 0")


@dataclass
class FederatedConfig:
    """Continual federated learning (FOT's protocol, fot.md §2 and §4); read by federated strategies only.

    Clients train with the engine's optimizer settings (``engine.batch_size``, ``engine.lr``, ``engine.optimizer``,
    ``engine.momentum``, ``engine.weight_decay``); ``engine.epochs`` is not used (see ``local_epochs``).

    Attributes:
        engine: ``inprocess``: the clients run one after another in this process (:mod:`clbench.federated.loop`).
            ``flower``: the same clients and server on Flower (the ``flower`` extra, fot.md §9): the server in a
            ServerApp, each client a SuperNode whose ClientApps run the client's rounds in their own processes
            (:mod:`clbench.flower.app`); the same accuracy matrix as ``inprocess``.
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
            127.0.0.1 for the run and stops them after it (:mod:`clbench.flower.launch`); a name submits
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
    """Base of every strategy's config; ``name`` picks the class in :mod:`strategies` (set by its registration,
    :func:`strategies.register`, the one place a method is named)."""

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
    benchmark: Any = field(default_factory=BenchmarkConfig)
    model: Any = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    strategy: Any = field(default_factory=StrategyConfig)


OPTIMIZER_ALIASES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
"""Lower-case names of the common optimizers → their ``torch.optim`` class names."""

_ENGINE_CHOICES: dict[str, tuple[str, ...]] = {
    "progress": ("auto", "bar", "none"),
    "accelerator": ("auto", "cpu", "cuda", "gpu", "mps"),
    "precision": ("32-true", "32", "bf16-mixed", "16-mixed"),
    "schedule": SCHEDULES,
}


def _is_torch_optimizer(name: str) -> bool:
    import torch

    cls = getattr(torch.optim, name, None)
    return isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)


def check(cond: bool, key: str, msg: str) -> None:
    """Raise :class:`ConfigError` ``bad value for '<key>': <msg>`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"bad value for '{key}': {msg}")


def rounds_per_task(value: Any, n_tasks: int) -> list[int]:
    """``federated.rounds_per_task`` as one count per task (one value: every task).

    Raises:
        ConfigError: a count < 1, or a list whose length is neither 1 nor ``n_tasks``.
    """
    counts = list(value) if isinstance(value, list | tuple) else [value]
    check(all(type(c) is int and c >= 1 for c in counts) and len(counts) in (1, n_tasks),
          "federated.rounds_per_task", f"{value}; give one count >= 1, or one per task ({n_tasks})")
    return counts * n_tasks if len(counts) == 1 else counts


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a (nested) config into ``{"engine.lr": 0.01, ...}`` for MLflow params."""
    node = OmegaConf.structured(obj) if not isinstance(obj, DictConfig | dict) else OmegaConf.create(obj)
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = value

    walk(OmegaConf.to_container(node, resolve=True), prefix)
    return out
