"""Training one run on several devices: Fabric DDP, data sharded, everything else the same on every rank.

``engine.devices = N > 1`` runs N processes (ranks). Where no scheduler started them (``srun`` with one task per
device, ``torchrun``: Lightning reads their environment), :func:`launch` spawns them from this process, which
waits and returns rank 0's result (or raises its error, with its type, so the command line reports it as for one
device). What each rank does:

* **Data**: every rank draws the same global batch of ``engine.batch_size`` samples (the batch order is seeded
  from the run seed) and trains on its own slice of it (:func:`shard`). A rank's loss is scaled by
  ``n_r · N / n`` (``n_r`` its rows, ``n`` the global batch's), so that the all-reduced mean of the ranks'
  gradients is exactly the gradient of the global batch's mean loss, also for a last, uneven batch; a last batch
  smaller than N is skipped. Norm layers see only their rank's slice (no SyncBatchNorm).
* **Gradients**: DDP all-reduces them during ``backward``, so a strategy's projection (``strategy.project``, which
  runs after backward) acts on the averaged gradient. For GPM-style projections g ↦ g − U Uᵀ g the order does
  not matter, since P is linear and identical on every rank: P(mean g_r) = mean P g_r (tested).
* **Bases / strategy state**: after each experience every rank runs ``after_experience`` on the same data and
  model; rank 0's state is then broadcast (:func:`sync_state`), so the bases are identical on every rank whatever
  the hardware's numerics, and the largest difference a rank had from rank 0's is logged (``ddp/state_gap``).
* **Evaluation** runs on every rank (the same numbers); **logging, checkpoints and artifacts** come from rank 0,
  which alone holds the run lock. A resumed run reads the checkpoint on every rank.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from clbench.streams.batches import batch_len

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from clbench.config import EngineConfig
    from clbench.models.base import Batch
    from strategies.base import Strategy

T = TypeVar("T")


def make_fabric(cfg: EngineConfig) -> Fabric:
    """Fabric for ``engine.accelerator / devices / precision``: one device as is; several with DDP, spawning its
    processes unless a scheduler started them, and with ``find_unused_parameters`` (a multi-head model leaves the
    other tasks' heads without gradients)."""
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
    from lightning.fabric.strategies import DDPStrategy

    strategy: Any = "auto"
    if cfg.devices != 1:  # "popen" launches nothing where the processes exist already (srun, torchrun)
        external = TorchElasticEnvironment.detect() or SLURMEnvironment.detect()
        strategy = DDPStrategy(start_method="popen" if external else "spawn", find_unused_parameters=True)
    return Fabric(accelerator=cfg.accelerator, devices=cfg.devices, precision=cfg.precision,  # type: ignore[arg-type]
                  strategy=strategy)


class _Raised:
    """An error a rank raised, returned instead of raised so that it reaches the spawning process with its type."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _returning_errors(fabric: Fabric, function: Callable[..., Any], *args: Any) -> Any:
    try:
        return function(fabric, *args)
    except BaseException as error:  # every rank fails alike (a config error, a divergence: the loss is all-reduced)
        if fabric.world_size == 1:
            raise
        if fabric.global_rank != 0:  # rank 0's error is the one raised; another rank's alone would be lost
            import traceback
            traceback.print_exc()
        return _Raised(error)


def spawns(fabric: Fabric) -> bool:
    """Whether :func:`launch` starts the ranks as child processes of this one (no scheduler started them)."""
    from lightning.fabric.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(fabric.strategy.launcher, _MultiProcessingLauncher)


def children() -> list[int]:
    """The process ids of the ranks this process spawned (to pass a scheduler's signal on to them)."""
    return [p.pid for p in multiprocessing.active_children() if p.pid is not None]


def from_lead(fabric: Fabric, value: T) -> T:
    """``value`` as rank 0 has it, on every rank (a no-op on one device)."""
    return value if fabric.world_size == 1 else fabric.broadcast(value, src=0)


class SilentTracker:
    """What ranks other than 0 log to: nothing (rank 0 holds the MLflow run)."""

    run_id = ""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | os.PathLike[str]) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


def launch(fabric: Fabric, function: Callable[..., Any], *args: Any) -> Any:
    """``function(fabric, *args)`` on every rank (spawned here when needed); rank 0's result, or its error raised.
    """
    result = fabric.launch(_returning_errors, function, *args)
    if isinstance(result, _Raised):
        raise result.error
    return result


def shard(batches: Iterator[Batch], loss_fn: Callable[[Batch], torch.Tensor], rank: int,
          world: int) -> tuple[Iterator[Batch], Callable[[Batch], torch.Tensor]]:
    """This rank's slices of the global ``batches`` and ``loss_fn`` scaled for them (module docstring): the
    slices split each batch of n rows as evenly as possible (the first ``n mod world`` ranks one row more)."""
    weight = [1.0]

    def parts() -> Iterator[Batch]:
        for batch in batches:
            n = batch_len(batch)
            if n < world:  # a rank would have no rows
                continue
            size, extra = divmod(n, world)
            start = rank * size + min(rank, extra)
            rows = size + (rank < extra)
            weight[0] = rows * world / n
            yield _rows(batch, start, start + rows)

    def scaled(batch: Batch) -> torch.Tensor:
        return loss_fn(batch) * weight[0]

    return parts(), scaled


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    if isinstance(batch, dict):
        return {k: v[start:stop] for k, v in batch.items()}
    return tuple(v[start:stop] for v in batch)


def sync_state(fabric: Fabric, strategy: Strategy) -> float:
    """Give every rank rank 0's strategy state (its bases); the largest absolute difference any rank's own state
    had from it (0: computed identically). A no-op on one device."""
    if fabric.world_size == 1:
        return 0.0
    mine = strategy.state_dict()
    lead = fabric.broadcast(mine, src=0)
    gap = torch.tensor(_gap(mine, lead))
    if fabric.global_rank != 0:
        strategy.load_state_dict(lead)
    return float(fabric.all_reduce(gap, reduce_op="max"))


def _gap(a: Any, b: Any) -> float:
    """Largest absolute difference between the tensors of two nested states of the same shape (inf where their
    structure differs)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return float("inf")
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max((_gap(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return float("inf")
        return max((_gap(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return 0.0 if np.array_equal(a, b) else float("inf")
    return 0.0 if a == b else float("inf")
