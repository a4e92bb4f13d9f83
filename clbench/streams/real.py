"""Streams over real data sets read from ``benchmark.data_root`` (torchvision data sets, and pickles).

* ``pmnist``: MNIST (60,000 / 10,000), pixels / 255 normalised with (0.1307, 0.3081), flattened to 784, every
  task permuted by the GPM paper's protocol (:func:`clbench.streams.core.pmnist_permutations`). The paper's
  54,000 / 6,000 / 10,000 per task is ``benchmark.validation_fraction=0.1``.
* ``split_cifar100``: CIFAR-100, task ``t`` = classes ``10t .. 10t+9`` (fixed class order),
  ``scenario='task'`` gives label = class mod 10 and one head per task (the paper's protocol),
  ``scenario='class'`` keeps global labels. Per-channel normalisation mean (125.3, 123.0, 113.9)/255,
  std (63.0, 62.1, 66.7)/255, no augmentation. The paper's 4,750 / 250 / 1,000 per task is
  ``benchmark.validation_fraction=0.05``.
* ``five_datasets``: GPM's 5-Datasets (see :func:`build_five_datasets`): CIFAR-10, MNIST, SVHN, Fashion-MNIST,
  notMNIST, one 10-way task each, 3x32x32, task-incremental.
* ``miniimagenet``: the 20-split miniImageNet of ROGO / GPM (see :func:`build_miniimagenet`): 20 tasks x 5
  classes, 3x84x84, task-incremental; read from pickles.

Missing data with ``benchmark.download=false`` raises :class:`FileNotFoundError` at once (torchvision is asked
with ``download=False``, which never touches the network). With ``download=true`` torchvision downloads into
``data_root``; its errors propagate unchanged (no retries here). notMNIST and miniImageNet have no torchvision
loader and are never downloaded: missing files raise :class:`FileNotFoundError` naming the exact paths expected
and where to get them, whatever ``benchmark.download`` says.

The image sets of ``five_datasets`` and ``miniimagenet`` are kept as ``uint8`` pixels and decoded (pixels / 255,
per-channel mean/std, grey channel replicated to 3) on access by :class:`~clbench.streams.core.PixelNorm`:
5-Datasets takes ~0.6 GB instead of ~3.9 GB as float32, miniImageNet ~1.3 GB instead of ~5 GB.

The pickles are read with :mod:`pickle`, which can run code: only use files from the sources named here.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clbench.config import BenchmarkConfig
from clbench.streams.core import (
    PixelNorm,
    Stream,
    StreamSpec,
    TensorSamples,
    assemble,
    check_common,
    check_split,
    pad_to_32,
    permuted_views,
    pmnist_permutations,
    register,
    split_views,
    stream_seed,
)
from clbench.streams.offline import MNIST_MEAN, MNIST_PAD32_MEAN, MNIST_PAD32_STD, MNIST_STD

CIFAR100_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR100_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)

# Per-set normalisation of GPM's 5-Datasets, as in sahagobinda/GPM dataloader/five_datasets.py (commit 1a238ec;
# the same values in THUNLP-MT/ROGO dataloader/mixture.py). CIFAR-10 uses the CIFAR-100 constants above; the
# MNIST (offline.MNIST_PAD32_*) and Fashion-MNIST values include the 2-pixel zero padding to 32x32; notMNIST
# is 32x32 already and not padded.
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.198, 0.201, 0.197)
FASHION_PAD32_MEAN = 0.2190
FASHION_PAD32_STD = 0.3318
NOTMNIST_MEAN = 0.4254
NOTMNIST_STD = 0.4501

# miniImageNet: ImageNet mean/std, as THUNLP-MT/ROGO dataloader/miniimagenet.py (commit 87ec345).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FIVE_DATASETS = ("CIFAR-10", "MNIST", "SVHN", "Fashion-MNIST", "notMNIST")
"""5-Datasets' tasks in the official code's order (GPM five_datasets.py: ``idata = np.arange(5)``, not shuffled)."""

NOTMNIST_DIR = "notmnist"
NOTMNIST_FILES = ("notmnist_train.pkl", "notmnist_test.pkl")
NOTMNIST_SOURCE = (
    "notmnist.zip from https://github.com/nkundiushuti/notmnist_convert (the file GPM's code downloads: "
    "https://github.com/nkundiushuti/notmnist_convert/blob/master/notmnist.zip?raw=true) and unzip it so that "
    "notmnist_train.pkl and notmnist_test.pkl lie directly in the folder below"
)

MINIIMAGENET_DIR = "miniimagenet"
MINIIMAGENET_FILES = ("train.pkl", "test.pkl")
MINIIMAGENET_SOURCE = (
    "the train/test pickles linked in THUNLP-MT/ROGO's README.md (train: "
    "https://drive.google.com/file/d/1fm6TcKIwELbuoEOOdvxq72TtUlZlvGIm/view, test: "
    "https://drive.google.com/file/d/1RA-MluRWM4fqxG9HQbQBBVVjDddYPCri/view), saved as train.pkl and test.pkl; "
    "or build them from miniImageNet (https://github.com/yaoyao-liu/mini-imagenet-tools) as "
    "facebookresearch/Adversarial-Continual-Learning data/split_miniimagenet.py does: 500 train / 100 test "
    "images per class, each pickle a dict {'images': 84x84x3 uint8 arrays, 'labels': ints 0..99}"
)
MINIIMAGENET_TASKS = 20
MINIIMAGENET_SIZE = 84


def _data_root(cfg: BenchmarkConfig) -> str:
    """``cfg.data_root`` as an absolute path (relative paths resolve against the current directory)."""
    return os.path.abspath(os.path.expanduser(cfg.data_root))


def load_torchvision(
    cls: Any, label: str, subdir: str, cfg: BenchmarkConfig, train: bool, split_arg: bool = False
) -> Any:
    """``cls(root, train=train, download=cfg.download)`` (``split='train'|'test'`` instead of ``train`` when
    ``split_arg``, as torchvision's SVHN takes), turning "not found" into a clear error.

    Raises:
        FileNotFoundError: the data is missing (or corrupt) under ``data_root`` and ``download`` is false.
    """
    root = _data_root(cfg)
    which: dict[str, Any] = {"split": "train" if train else "test"} if split_arg else {"train": train}
    try:
        return cls(root=root, download=bool(cfg.download), **which)
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


# ------------------------------------------------------------------------------------- pickled data sets


def require_files(label: str, folder: str, files: tuple[str, ...], source: str) -> list[str]:
    """The absolute paths of ``files`` in ``folder``; raise at once if any is missing (no network, no download).

    Raises:
        FileNotFoundError: naming every missing path and ``source``, where to get the files.
    """
    paths = [os.path.join(folder, f) for f in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{label} not found: missing {', '.join(repr(p) for p in missing)}. clbench never downloads "
            f"{label} (benchmark.download does not apply); get {source}; the files go in {folder!r}."
        )
    return paths


def _load_pickle(path: str) -> Any:
    """Unpickle ``path`` (``latin1`` decoding, so Python 2 pickles of numpy arrays load too)."""
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _pickled_images(path: str, images_key: str, labels_key: str) -> tuple[np.ndarray, Tensor]:
    """``(images as one uint8 ndarray, int64 labels)`` of a pickled dict; ``ValueError`` naming the file if the
    keys, the dtype or the lengths are not as expected."""
    data = _load_pickle(path)
    if not isinstance(data, dict) or images_key not in data or labels_key not in data:
        raise ValueError(f"{path!r}: expected a pickled dict with keys {images_key!r} and {labels_key!r}")
    images = np.asarray(data.pop(images_key))
    labels = torch.as_tensor(np.asarray(data.pop(labels_key), dtype=np.int64)).flatten()
    if images.dtype != np.uint8:
        raise ValueError(f"{path!r}: {images_key!r} must be uint8 pixels, got {images.dtype}")
    if images.shape[0] != labels.numel():
        raise ValueError(f"{path!r}: {images.shape[0]} images but {labels.numel()} labels")
    return images, labels


def notmnist_paths(cfg: BenchmarkConfig) -> list[str]:
    """notMNIST's expected files (checked at once): ``<data_root>/notmnist/notmnist_{train,test}.pkl``.

    The pickles of nkundiushuti/notmnist_convert (what GPM's loader downloads and reads): notMNIST_small's
    letters A-J resized to 32x32, split 90 / 10 with ``random_state=42``; each a dict ``{'features': uint8
    (N, 1, 32, 32), 'labels': uint8 (N,)}`` with labels 0..9 = A..J.
    """
    folder = os.path.join(_data_root(cfg), NOTMNIST_DIR)
    return require_files("notMNIST", folder, NOTMNIST_FILES, NOTMNIST_SOURCE)


def load_notmnist(path: str) -> tuple[Tensor, Tensor]:
    """One notMNIST pickle as ``(uint8 (N, 1, 32, 32), int64 labels)``."""
    images, labels = _pickled_images(path, "features", "labels")
    if images.shape[-2:] != (32, 32) or images.size != images.shape[0] * 32 * 32:
        raise ValueError(f"{path!r}: expected 32x32 grey-scale 'features', got shape {images.shape}")
    return torch.from_numpy(images.reshape(-1, 1, 32, 32)), labels


def check_task_stream(cfg: BenchmarkConfig, valid_tasks: list[int], what: str) -> None:
    """Validate ``scenario`` (``task`` only) and ``n_tasks`` (one of ``valid_tasks``) of a task-incremental
    real stream; ``what`` explains the valid task counts in the message."""
    if cfg.scenario != "task":
        raise ValueError(
            f"benchmark.scenario={cfg.scenario!r} is invalid for stream {cfg.name!r}; "
            "valid: 'task' (task-incremental, one head per task, as the paper)"
        )
    if cfg.n_tasks not in valid_tasks:
        lo, hi = min(valid_tasks), max(valid_tasks)
        valid = str(lo) if lo == hi else f"{lo}..{hi}"
        raise ValueError(f"benchmark.n_tasks={cfg.n_tasks} is invalid for stream {cfg.name!r} ({what}); valid: {valid}")


# ----------------------------------------------------------------------------------------------- 5-Datasets


def _five_datasets_part(index: int, cfg: BenchmarkConfig, train: bool, notmnist: list[str]) -> tuple[Tensor, Tensor]:
    """Data set ``index`` of :data:`FIVE_DATASETS` as ``(uint8 (N, C, 32, 32), int64 labels 0..9)``."""
    from torchvision import datasets

    if index == 0:
        ds = load_torchvision(datasets.CIFAR10, "CIFAR-10", "cifar-10-batches-py", cfg, train)
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return x, torch.as_tensor(ds.targets, dtype=torch.int64)
    if index in (1, 3):
        if index == 1:
            ds = load_torchvision(datasets.MNIST, "MNIST", os.path.join("MNIST", "raw"), cfg, train)
        else:
            folder = os.path.join("FashionMNIST", "raw")
            ds = load_torchvision(datasets.FashionMNIST, "Fashion-MNIST", folder, cfg, train)
        return pad_to_32(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64)
    if index == 2:
        ds = load_torchvision(datasets.SVHN, "SVHN", "", cfg, train, split_arg=True)
        return torch.from_numpy(np.ascontiguousarray(ds.data)), torch.as_tensor(ds.labels, dtype=torch.int64)
    return load_notmnist(notmnist[0 if train else 1])


FIVE_DATASETS_NORMS = (
    PixelNorm(mean=CIFAR100_MEAN, std=CIFAR100_STD),
    PixelNorm(mean=(MNIST_PAD32_MEAN,), std=(MNIST_PAD32_STD,)),
    PixelNorm(mean=SVHN_MEAN, std=SVHN_STD),
    PixelNorm(mean=(FASHION_PAD32_MEAN,), std=(FASHION_PAD32_STD,)),
    PixelNorm(mean=(NOTMNIST_MEAN,), std=(NOTMNIST_STD,)),
)
"""Decoding of each 5-Datasets task: pixels / 255, the per-set mean/std above, grey replicated to 3 channels."""


@register("five_datasets")
def build_five_datasets(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``five_datasets``: GPM's 5-Datasets (Saha et al. 2021, code sahagobinda/GPM dataloader/five_datasets.py).

    Task ``t`` = data set ``t`` of CIFAR-10, MNIST, SVHN, Fashion-MNIST, notMNIST (the code's fixed order), 10
    classes each with its own labels 0..9, task-incremental (one 10-way head per task; ``scenario`` must be
    ``task``, ``n_tasks`` must be 5). Every image is 3x32x32: MNIST and Fashion-MNIST are zero-padded 28 -> 32 and
    replicated to 3 channels, notMNIST (32x32 already) is replicated; normalisation pixels / 255 with each set's
    mean/std from the official code (:data:`FIVE_DATASETS_NORMS`). No augmentation. The official test splits are
    the test streams; ``benchmark.validation_fraction`` (GPM: 0.05) holds out a class-stratified part of each
    training set (the official code holds out a random, unstratified 5 %); ``test_fraction`` is unused.

    Data under ``data_root``: CIFAR-10, MNIST, SVHN and Fashion-MNIST in torchvision's layouts
    (``cifar-10-batches-py/``, ``MNIST/raw/``, ``train_32x32.mat`` + ``test_32x32.mat``, ``FashionMNIST/raw/``;
    downloaded there when ``benchmark.download=true``), notMNIST as ``notmnist/notmnist_train.pkl`` and
    ``notmnist/notmnist_test.pkl`` (:func:`notmnist_paths`; never downloaded). notMNIST is checked first, so a
    missing file fails before any download.
    """
    check_common(cfg)
    check_task_stream(cfg, [len(FIVE_DATASETS)], "one task per data set: " + ", ".join(FIVE_DATASETS))
    notmnist = notmnist_paths(cfg)
    s = stream_seed(cfg, seed)
    train_views: list[TensorSamples] = []
    test_views: list[TensorSamples] = []
    for i, norm in enumerate(FIVE_DATASETS_NORMS):
        for train, views in ((True, train_views), (False, test_views)):
            x, y = _five_datasets_part(i, cfg, train, notmnist)
            views.append(TensorSamples(x, y, None, None, norm))
    spec = StreamSpec(
        name=cfg.name,
        n_tasks=len(FIVE_DATASETS),
        input_shape=train_views[0].sample_shape,
        classes_per_task=(10,) * len(FIVE_DATASETS),
        n_classes=10 * len(FIVE_DATASETS),
        multi_head=True,
    )
    return assemble(cfg, s, spec, train_views, test_views)


# ----------------------------------------------------------------------------------------------- miniImageNet


def miniimagenet_paths(cfg: BenchmarkConfig) -> list[str]:
    """miniImageNet's expected files (checked at once): ``<data_root>/miniimagenet/{train,test}.pkl``.

    The layout ROGO's loader reads (``data/miniimagenet/{train,test}.pkl``, THUNLP-MT/ROGO
    dataloader/miniimagenet.py): each a pickled dict ``{'images': N arrays 84x84x3 uint8 (a list or one
    array), 'labels': N ints 0..99}``; 500 train and 100 test images per class (:data:`MINIIMAGENET_SOURCE`).
    """
    folder = os.path.join(_data_root(cfg), MINIIMAGENET_DIR)
    return require_files("miniImageNet", folder, MINIIMAGENET_FILES, MINIIMAGENET_SOURCE)


def load_miniimagenet(path: str) -> tuple[Tensor, Tensor]:
    """One miniImageNet pickle as ``(uint8 (N, 3, 84, 84), int64 labels 0..99)``.

    Images of another size are resized to 84x84 (bilinear with antialiasing, as ROGO's ``Resize((84, 84))`` on
    PIL images); 84x84 images are taken as they are.
    """
    images, labels = _pickled_images(path, "images", "labels")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path!r}: expected 'images' of shape (N, H, W, 3), got {images.shape}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    del images
    if tuple(x.shape[-2:]) != (MINIIMAGENET_SIZE, MINIIMAGENET_SIZE):
        from torchvision.transforms.functional import resize

        x = resize(x, [MINIIMAGENET_SIZE, MINIIMAGENET_SIZE], antialias=True)
    found = sorted(set(torch.unique(labels).tolist()))
    if found != list(range(100)):
        raise ValueError(f"{path!r}: expected labels 0..99 (100 classes), found {len(found)} distinct labels")
    return x, labels


def miniimagenet_class_order(seed: int) -> np.ndarray:
    """The 100 classes in task order, as ROGO: ``np.random.seed(seed); np.random.permutation(100)`` split into
    20 consecutive groups of 5 (task ``t`` = ``order[5t:5t+5]``, local label = position in that group).
    A ``RandomState(seed)`` gives the same permutation without touching NumPy's global generator."""
    return np.random.RandomState(seed % 2**32).permutation(100)


@register("miniimagenet")
def build_miniimagenet(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``miniimagenet``: 20-split miniImageNet as in ROGO (THUNLP-MT/ROGO dataloader/miniimagenet.py), the
    benchmark GPM reports (Saha et al. 2021; GPM's released code has no miniImageNet loader).

    100 classes shuffled with the stream seed (:func:`miniimagenet_class_order`; ROGO's default seed is 37) into
    20 tasks of 5 classes; ``n_tasks <= 20`` keeps the first ``n_tasks`` of them. Task-incremental: local labels
    0..4 in the order of the shuffled class list, one 5-way head per task (``scenario`` must be ``task``).
    3x84x84 images, pixels / 255 normalised with the ImageNet mean/std, no augmentation, stored as ``uint8``.
    The pickles' test split (100 per class) is the test stream; ``benchmark.validation_fraction`` (ROGO: 0.02)
    holds out a class-stratified part of each training task (ROGO: an unstratified ``random_split``);
    ``test_fraction`` is unused. Files: :func:`miniimagenet_paths` (never downloaded).
    """
    check_common(cfg)
    check_task_stream(
        cfg, list(range(1, MINIIMAGENET_TASKS + 1)), f"the first n of the {MINIIMAGENET_TASKS} tasks of 5 classes"
    )
    paths = miniimagenet_paths(cfg)
    s = stream_seed(cfg, seed)
    rank = torch.empty(100, dtype=torch.int64)
    rank[torch.from_numpy(miniimagenet_class_order(s))] = torch.arange(100)
    norm = PixelNorm(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    views = []
    for path in paths:
        x, y = load_miniimagenet(path)
        views.append(split_views(x, rank[y], cfg.n_tasks, 5, True, norm))
    train_views, test_views = views
    spec = StreamSpec(
        name=cfg.name,
        n_tasks=cfg.n_tasks,
        input_shape=train_views[0].sample_shape,
        classes_per_task=(5,) * cfg.n_tasks,
        n_classes=5 * cfg.n_tasks,
        multi_head=True,
    )
    return assemble(cfg, s, spec, train_views, test_views)
