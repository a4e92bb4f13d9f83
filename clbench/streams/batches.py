"""Fast mini-batch sources over an experience's dataset (DESIGN.md, "Tensor cache").

:func:`batch_source` materialises a dataset that fits in ``max_bytes`` once as tensors on the device and serves
batches by index selection (:class:`TensorBatchSource`); a larger one streams through a
``torch.utils.data.DataLoader`` (:class:`LoaderBatchSource`). Samples that are tensors ``(x, y[, t])`` (the image
streams) are read as three tensors ``x, y, t``; any other samples (text) are turned into tensors by the model's
``collate`` (:meth:`clbench.models.base.ContinualModel.collate`), a tuple or dict of tensors. A source never
looks inside a batch beyond its first dimension. Both give the same batches for the same
generator state: a shuffled epoch is ``torch.randperm(len, generator=generator)`` cut into consecutive
batches, the last one partial.

Materialisation reads the tensors behind the datasets this package builds (and behind plain
``TensorDataset``\\ s) directly, without per-sample Python work, whenever the Avalanche dataset applies no
transform; anything else is read once through a DataLoader.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset, TensorDataset

from clbench.streams.core import TensorSamples

Samples = tuple[Tensor, Tensor, Tensor]
"""``(x, y, t)``: inputs, int64 labels, int64 task labels of tensor samples, all on one device."""

Batch = tuple[Tensor, ...] | Mapping[str, Tensor]
"""A batch: a tuple (images: ``(x, y, t)``) or a dict (text: token ids, masks, ...) of tensors whose first
dimension is the sample."""

Collate = Callable[[Sequence[Any]], Batch]
"""A model's ``collate``: the tensors of a list of samples."""


def batch_len(batch: Batch) -> int:
    """Number of samples in ``batch`` (the first dimension its tensors share)."""
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return int(first.shape[0])


def map_batch(batch: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    """``batch`` with ``fn`` applied to each tensor, its structure kept."""
    if isinstance(batch, Mapping):
        return {k: fn(v) for k, v in batch.items()}
    return tuple(fn(v) for v in batch)

_READ_BATCH = 1024
"""Batch size used to read a dataset through a DataLoader when materialising it."""

_LABEL_BYTES = 16
"""Bytes per sample of ``y`` and ``t`` (two int64)."""


class BatchSource(ABC):
    """Mini-batches of one dataset on one device."""

    device: torch.device

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @property
    @abstractmethod
    def cached(self) -> bool:
        """True when the whole dataset lives on the device as tensors."""

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch at ``batch_size`` (the last, partial one included)."""
        _check_batch_size(batch_size)
        return math.ceil(len(self) / batch_size)

    @abstractmethod
    def batches(
        self, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """One epoch of batches, the last one partial.

        Args:
            batch_size: samples per batch.
            shuffle: visit the samples in the order ``torch.randperm(len(self), generator=generator)``;
                otherwise in dataset order.
            generator: CPU generator for the shuffle (``None``: torch's default generator).
        """

    @abstractmethod
    def take(self, n: int, generator: torch.Generator | None = None) -> Batch:
        """``n >= 1`` distinct random samples (the first ``n`` of a ``randperm`` from ``generator``); all if
        ``n >= len(self)``, in dataset order."""

    @abstractmethod
    def all(self) -> Batch:
        """The whole dataset as tensors on the device (cached sources only)."""


class TensorBatchSource(BatchSource):
    """A dataset held as tensors on the device (a tuple, e.g. ``(x, y, t)``, or a dict); batches are slices (in
    order) or index selections of every tensor.

    Batches of an unshuffled epoch and the result of :meth:`all` are views of the cache: treat them as
    read-only.
    """

    def __init__(self, *fields: Tensor, **named: Tensor) -> None:
        """Hold the tensors ``fields`` (a tuple batch) or ``named`` (a dict batch), already on one device, with
        the same first dimension."""
        if bool(fields) == bool(named):
            raise ValueError("give the tensors either positionally (a tuple batch) or by name (a dict batch)")
        tensors = list(fields or named.values())
        sizes = {int(v.shape[0]) for v in tensors}
        if len(sizes) != 1:
            raise ValueError(f"the tensors of a batch source must share their first dimension, got {sorted(sizes)}")
        self.data: Batch = dict(named) if named else tuple(fields)
        self.device = tensors[0].device
        self._n = sizes.pop()
        # a field constant over the samples (the task label: one task per experience is the rule) is served as
        # a prefix view, without a copy
        self._keys = list(named) if named else None
        self._fields = [(v, self._n > 0 and v.dim() == 1 and not v.is_floating_point() and bool((v == v[0]).all()))
                        for v in tensors]

    def __len__(self) -> int:
        """Number of samples."""
        return self._n

    @property
    def cached(self) -> bool:
        """Always True."""
        return True

    def _select(self, idx: Tensor) -> Batch:
        n = idx.shape[0]
        picked = [v[:n] if const else v.index_select(0, idx) for v, const in self._fields]
        return tuple(picked) if self._keys is None else dict(zip(self._keys, picked, strict=True))

    def batches(
        self, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """See :meth:`BatchSource.batches`: one ``randperm`` per epoch, one ``index_select`` per tensor and
        batch, no host-to-device copy besides the permutation."""
        _check_batch_size(batch_size)
        n = self._n
        if not shuffle:
            for s in range(0, n, batch_size):
                yield map_batch(self.data, lambda v, s=s: v[s : s + batch_size])
            return
        order = torch.randperm(n, generator=generator).to(self.device, non_blocking=True)
        for idx in order.split(batch_size):
            yield self._select(idx)

    def take(self, n: int, generator: torch.Generator | None = None) -> Batch:
        """See :meth:`BatchSource.take`."""
        _check_take(n)
        if n >= self._n:
            return self.all()
        idx = torch.randperm(self._n, generator=generator)[:n].to(self.device, non_blocking=True)
        return map_batch(self.data, lambda v: v.index_select(0, idx))

    def all(self) -> Batch:
        """The cached tensors themselves (read-only)."""
        return self.data

    def with_fields(self, **named: Tensor) -> TensorBatchSource:
        """A source of the same samples with the tensors ``named`` (one row per sample, on this device) added to
        every batch (a dict batch only).

        Raises:
            ValueError: a tuple batch, a key it already has, or a tensor with another number of rows.
        """
        if self._keys is None:
            raise ValueError("only a dict batch takes named fields")
        clash = sorted(set(named) & set(self._keys))
        if clash:
            raise ValueError(f"the batches already have the fields {clash}")
        assert isinstance(self.data, Mapping)
        return TensorBatchSource(**self.data, **named)


class LoaderBatchSource(BatchSource):
    """A dataset too large for the cache, read through a DataLoader batch by batch."""

    def __init__(self, dataset: Any, device: torch.device, num_workers: int = 0) -> None:
        """Stream ``dataset`` to ``device`` with ``num_workers`` loader processes."""
        self.dataset = dataset
        self.device = torch.device(device)
        self.num_workers = num_workers
        self._n = len(dataset)

    def __len__(self) -> int:
        """Number of samples."""
        return self._n

    @property
    def cached(self) -> bool:
        """Always False."""
        return False

    def _loader(self, dataset: Any, batch_size: int, order: Sequence[int] | None) -> Iterator[Batch]:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=order,
            num_workers=self.num_workers,
            collate_fn=getattr(dataset, "collate_fn", None),
            pin_memory=self.device.type == "cuda",
        )
        for batch in loader:
            yield _to_batch(batch, self.device)

    def batches(
        self, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """See :meth:`BatchSource.batches` (same order as the cached source for the same generator)."""
        _check_batch_size(batch_size)
        order = torch.randperm(self._n, generator=generator).tolist() if shuffle else None
        yield from self._loader(self.dataset, batch_size, order)

    def take(self, n: int, generator: torch.Generator | None = None) -> Batch:
        """See :meth:`BatchSource.take` (reads the ``n`` samples through the loader)."""
        _check_take(n)
        if n >= self._n:
            subset = self.dataset
        else:
            subset = Subset(self.dataset, torch.randperm(self._n, generator=generator)[:n].tolist())
        return _cat(list(self._loader(subset, _READ_BATCH, None)))

    def all(self) -> Batch:
        """Not available: the dataset does not fit the cache."""
        raise RuntimeError(
            f"this dataset ({self._n} samples) is streamed, not cached; use batches() or raise max_bytes"
        )


def needs_collate(dataset: Any) -> bool:
    """Whether the samples of ``dataset`` are not tensors ``(x, y[, t])`` (text) and need a model's collate."""
    first = dataset[0] if len(dataset) else None
    return first is not None and not (isinstance(first, tuple | list) and isinstance(first[0], Tensor | np.ndarray))


def batch_source(
    dataset: Any, device: torch.device | str, max_bytes: int = 2**30, num_workers: int = 0,
    collate: Collate | None = None,
) -> BatchSource:
    """A :class:`BatchSource` over ``dataset``.

    Tensor samples ``(x, y[, t])`` (missing ``t`` reads as 0): if ``len * (bytes of one x + 16)`` fits in
    ``max_bytes`` the dataset is materialised once on ``device`` as ``(x, y, t)`` (:class:`TensorBatchSource`),
    else it streams through a DataLoader with ``num_workers`` workers (:class:`LoaderBatchSource`). Any other
    samples (text) are turned into tensors by ``collate`` (the model's), all at once, and cached.

    Raises:
        ValueError: an empty dataset, or samples that are not tensors and no ``collate``.
    """
    device = torch.device(device)
    n = len(dataset)
    if n == 0:
        raise ValueError("empty dataset")
    first = dataset[0]
    if needs_collate(dataset):
        if collate is None:
            raise ValueError(f"samples of type {type(first).__name__} need the model's collate")
        batch = collate([dataset[i] for i in range(n)])
        moved = map_batch(batch, lambda v: v.to(device))
        return TensorBatchSource(**moved) if isinstance(moved, Mapping) else TensorBatchSource(*moved)
    x0 = first[0] if isinstance(first[0], Tensor) else torch.as_tensor(first[0])
    if n * (x0.numel() * x0.element_size() + _LABEL_BYTES) > max_bytes:
        return LoaderBatchSource(dataset, device, num_workers)
    return TensorBatchSource(*materialise(dataset, device))


def materialise(dataset: Any, device: torch.device | str = "cpu") -> Samples:
    """The whole dataset as fresh tensors ``(x, y, t)`` on ``device``: read directly from the backing tensors
    when possible (:func:`direct_tensors`), otherwise through a DataLoader."""
    device = torch.device(device)
    direct = direct_tensors(dataset, device)
    if direct is not None:
        return direct
    loader = DataLoader(dataset, batch_size=_READ_BATCH, collate_fn=getattr(dataset, "collate_fn", None))
    x, y, t = _cat([_to_batch(b, torch.device("cpu")) for b in loader])
    return x.to(device), y.to(device), t.to(device)


# ---------------------------------------------------------------------------------- direct tensor access


def direct_tensors(dataset: Any, device: torch.device | str = "cpu") -> Samples | None:
    """``(x, y, t)`` on ``device`` read straight from the tensors behind ``dataset``, or ``None`` if that is
    not possible.

    Handles :class:`~clbench.streams.core.TensorSamples`, ``TensorDataset`` (2 or 3 tensors) and Avalanche
    datasets over them (any nesting of subsets and concatenations) whose transform groups are empty and whose
    only attribute appended to samples is the task label. The result equals reading every sample through
    ``__getitem__`` and collating; it never aliases the dataset's tensors.
    """
    from avalanche.benchmarks.utils import AvalancheDataset
    device = torch.device(device)
    n = len(dataset)
    if isinstance(dataset, TensorSamples | TensorDataset):
        xy = _gather(dataset, None, None, device)
        if xy is None:
            return None
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 3:
            return xy[0], xy[1], dataset.tensors[2].to(device, torch.int64, copy=True)
        return xy[0], xy[1], torch.zeros(n, dtype=torch.int64, device=device)
    if not isinstance(dataset, AvalancheDataset):
        return None
    extra = [a for a in dataset._data_attributes.values() if a.use_in_getitem]
    if len(extra) > 1 or (extra and extra[0].name != "targets_task_labels"):
        return None
    flat = dataset._flat_data
    xy = _gather(flat, None, flat._transform_groups.current_group, device)
    if xy is None:
        return None
    t = _attribute_tensor(extra[0], n) if extra else torch.zeros(n, dtype=torch.int64)
    return xy[0], xy[1], t.to(device)


def _gather(
    node: Any, idx: Tensor | None, group: str | None, device: torch.device
) -> tuple[Tensor, Tensor] | None:
    """``(x, y)`` on ``device`` of positions ``idx`` (``None``: all) of a dataset tree node, or ``None`` if
    the node is not supported."""
    from avalanche.benchmarks.utils.data import _FlatDataWithTransform
    from avalanche.benchmarks.utils.flat_data import FlatData
    if isinstance(node, TensorSamples):
        return node.gather(idx, device)
    if isinstance(node, TensorDataset):
        if len(node.tensors) not in (2, 3):
            return None
        x, y = node.tensors[0], node.tensors[1]
        if idx is None:
            return x.to(device, copy=True), y.to(device, torch.int64, copy=True)
        return x.index_select(0, idx).to(device), y.index_select(0, idx).to(device, torch.int64)
    if not isinstance(node, FlatData):
        return None
    if isinstance(node, _FlatDataWithTransform):
        group = node._transform_groups.current_group if group is None else group
        try:
            if node._transform_groups[group] is not None or node._frozen_transform_groups[group] is not None:
                return None
        except KeyError:
            return None
    else:
        group = None  # a plain FlatData calls its children's __getitem__, i.e. their own current group
    if node._indices is not None:
        mapped = _index_tensor(node._indices)
        idx = mapped if idx is None else mapped[idx]
    children = node._datasets
    if len(children) == 1:
        return _gather(children[0], idx, group, device)
    bounds = torch.tensor(node._cumulative_sizes, dtype=torch.int64)
    if idx is None:
        idx = torch.arange(int(bounds[-1]))
    owner = torch.bucketize(idx, bounds, right=True)
    out: tuple[Tensor, Tensor] | None = None
    for k, child in enumerate(children):
        pos = torch.nonzero(owner == k).flatten()
        if pos.numel() == 0:
            continue
        part = _gather(child, idx[pos] - (int(bounds[k - 1]) if k else 0), group, device)
        if part is None:
            return None
        if out is None:
            out = (part[0].new_empty((idx.numel(), *part[0].shape[1:])), part[1].new_empty(idx.numel()))
        elif part[0].shape[1:] != out[0].shape[1:] or part[0].dtype != out[0].dtype:
            return None
        pos = pos.to(device)
        out[0][pos] = part[0]
        out[1][pos] = part[1]
    return out


def _index_tensor(indices: Any) -> Tensor:
    """An Avalanche index sequence (list, ndarray, ``LazyRange``, ``LazyIndices``) as an int64 tensor."""
    from avalanche.benchmarks.utils.flat_data import LazyIndices, LazyRange
    if isinstance(indices, LazyRange):
        start = indices._start + indices._offset
        return torch.arange(start, start + len(indices))
    if isinstance(indices, LazyIndices):
        indices._to_eager()
        return torch.from_numpy(np.asarray(indices._eager_list, dtype=np.int64))
    if isinstance(indices, Tensor):
        return indices.long()
    return torch.as_tensor(np.asarray(indices, dtype=np.int64))


def _attribute_tensor(attr: Any, n: int) -> Tensor:
    """A data attribute of ints as an int64 tensor (constant attributes without touching every element)."""
    from avalanche.benchmarks.utils import ConstantSequence
    if isinstance(attr.data, ConstantSequence) or len(attr.uniques) == 1:
        return torch.full((n,), int(attr[0]), dtype=torch.int64)
    return torch.as_tensor([int(v) for v in attr], dtype=torch.int64)


# --------------------------------------------------------------------------------------------- helpers


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid; valid: >= 1")


def _check_take(n: int) -> None:
    if n < 1:
        raise ValueError(f"take(n={n}) is invalid; valid: n >= 1")


def _to_batch(batch: Any, device: torch.device) -> Samples:
    """A collated ``[x, y]`` or ``[x, y, t, ...]`` as ``(x, y, t)`` on ``device`` (``t`` = 0 if absent)."""
    x, y = batch[0], torch.as_tensor(batch[1]).long()
    t = torch.as_tensor(batch[2]).long() if len(batch) > 2 else torch.zeros_like(y)
    nb = device.type == "cuda"
    return x.to(device, non_blocking=nb), y.to(device, non_blocking=nb), t.to(device, non_blocking=nb)


def _cat(batches: list[Samples]) -> Samples:
    return (
        torch.cat([b[0] for b in batches]),
        torch.cat([b[1] for b in batches]),
        torch.cat([b[2] for b in batches]),
    )
