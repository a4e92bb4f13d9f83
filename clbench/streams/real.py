"""Streams over real data sets read with torchvision from ``benchmark.data_root``.

* ``pmnist``: MNIST (60,000 / 10,000), pixels / 255 normalised with (0.1307, 0.3081), flattened to 784, every
  task permuted by the GPM paper's protocol (:func:`clbench.streams.core.pmnist_permutations`). The paper's
  54,000 / 6,000 / 10,000 per task is ``benchmark.validation_fraction=0.1``.
* ``split_cifar100``: CIFAR-100, task ``t`` = classes ``10t .. 10t+9`` (fixed class order),
  ``scenario='task'`` gives label = class mod 10 and one head per task (the paper's protocol),
  ``scenario='class'`` keeps global labels. Per-channel normalisation mean (125.3, 123.0, 113.9)/255,
  std (63.0, 62.1, 66.7)/255, no augmentation. The paper's 4,750 / 250 / 1,000 per task is
  ``benchmark.validation_fraction=0.05``.

Missing data with ``benchmark.download=false`` raises :class:`FileNotFoundError` at once (torchvision is asked
with ``download=False``, which never touches the network). With ``download=true`` torchvision downloads into
``data_root``; its errors propagate unchanged (no retries here).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from clbench.config import BenchmarkConfig
from clbench.streams.core import (
    Stream,
    StreamSpec,
    assemble,
    check_common,
    check_split,
    permuted_views,
    pmnist_permutations,
    register,
    split_views,
    stream_seed,
)
from clbench.streams.offline import MNIST_MEAN, MNIST_STD

CIFAR100_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR100_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


def _data_root(cfg: BenchmarkConfig) -> str:
    """``cfg.data_root`` as an absolute path (relative paths resolve against the current directory)."""
    return os.path.abspath(os.path.expanduser(cfg.data_root))


def load_torchvision(cls: Any, label: str, subdir: str, cfg: BenchmarkConfig, train: bool) -> Any:
    """``cls(root, train=train, download=cfg.download)``, turning "not found" into a clear error.

    Raises:
        FileNotFoundError: the data is missing (or corrupt) under ``data_root`` and ``download`` is false.
    """
    root = _data_root(cfg)
    try:
        return cls(root=root, train=train, download=bool(cfg.download))
    except RuntimeError as err:
        if cfg.download:
            raise
        raise FileNotFoundError(
            f"{label} not found (or incomplete) in data root {root!r} (torchvision looks in "
            f"{os.path.join(root, subdir)!r}). Set benchmark.download=true to download it there, or place "
            f"the files there yourself."
        ) from err


@register("pmnist")
def build_pmnist(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``pmnist``: torchvision MNIST under ``data_root``, PMNIST protocol (see the module docstring)."""
    check_common(cfg)
    from torchvision.datasets import MNIST

    s = stream_seed(cfg, seed)
    parts = []
    for train in (True, False):
        ds = load_torchvision(MNIST, "MNIST", os.path.join("MNIST", "raw"), cfg, train)
        x = ((ds.data.float() / 255.0 - MNIST_MEAN) / MNIST_STD).reshape(len(ds.data), -1)
        parts.append((x, torch.as_tensor(ds.targets, dtype=torch.int64)))
    (x_tr, y_tr), (x_te, y_te) = parts
    perms: list[torch.Tensor | None] = list(pmnist_permutations(cfg.n_tasks, s, x_tr.shape[1]))
    spec = StreamSpec(
        name=cfg.name,
        n_tasks=cfg.n_tasks,
        input_shape=(x_tr.shape[1],),
        classes_per_task=(10,) * cfg.n_tasks,
        n_classes=10,
        multi_head=False,
    )
    return assemble(cfg, s, spec, permuted_views(x_tr, y_tr, perms), permuted_views(x_te, y_te, perms))


@register("split_cifar100")
def build_split_cifar100(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``split_cifar100``: torchvision CIFAR-100 under ``data_root``, split by class (module docstring)."""
    check_common(cfg)
    per_task = check_split(cfg, 100)
    from torchvision.datasets import CIFAR100

    s = stream_seed(cfg, seed)
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    parts = []
    for train in (True, False):
        ds = load_torchvision(CIFAR100, "CIFAR-100", "cifar-100-python", cfg, train)
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).float().div_(255.0)
        x = ((x - mean) / std).contiguous()
        parts.append((x, torch.as_tensor(ds.targets, dtype=torch.int64)))
    (x_tr, y_tr), (x_te, y_te) = parts
    multi_head = cfg.scenario == "task"
    spec = StreamSpec(
        name=cfg.name,
        n_tasks=cfg.n_tasks,
        input_shape=tuple(x_tr.shape[1:]),
        classes_per_task=(per_task,) * cfg.n_tasks,
        n_classes=100,
        multi_head=multi_head,
    )
    train_views = split_views(x_tr, y_tr, cfg.n_tasks, per_task, multi_head)
    test_views = split_views(x_te, y_te, cfg.n_tasks, per_task, multi_head)
    return assemble(cfg, s, spec, train_views, test_views)
