"""Stream specs, the registry, config validation and the tensor-backed Avalanche datasets all streams share.

Every stream is assembled the same way: a builder produces, per task, a :class:`TensorSamples` view for the
training data and one for the test data (the views share the underlying tensors: a permuted task stores only
its permutation, a split task only its indices; image streams may store raw ``uint8`` pixels and decode them
on access with a :class:`PixelNorm`). :func:`assemble` then carves the seeded validation split and
the training cap, wraps every view in an Avalanche ``TaskAwareSupervisedClassificationDataset`` whose samples
are ``(x, y, t)`` (task label ``t`` = experience index), and builds the benchmark with
``benchmark_from_datasets`` + ``with_task_labels`` and sets the classes-timeline attributes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from clbench.config import BenchmarkConfig

if TYPE_CHECKING:  # avalanche is imported where it is used: importing it costs ~10 s, config checks need none
    from avalanche.benchmarks.utils import TaskAwareSupervisedClassificationDataset

# Tags that derive independent random streams from one seed (see :func:`derived_seed`).
TAG_TEST_SPLIT = 1
TAG_PERMUTATIONS = 2
TAG_VALIDATION = 3
TAG_CAP = 4


@dataclass(frozen=True)
class StreamSpec:
    """What a model needs to know about a stream, independent of the data.

    Attributes:
        name: registered stream name.
        n_tasks: number of experiences.
        input_shape: shape of one sample, e.g. ``(784,)``, ``(64,)`` or ``(3, 32, 32)``.
        classes_per_task: number of classes in each experience.
        n_classes: total number of distinct classes in the stream (the size of a single shared head; for a
            multi-head stream it is the sum over the tasks' heads).
        multi_head: True for task-incremental streams: labels are local ``0..c_t-1`` and the model uses task
            ``t``'s head. False: one head over ``n_classes`` global labels.
        primary_score: the model score that fills R (:meth:`clbench.models.base.ContinualModel.score`).
    """

    name: str
    n_tasks: int
    input_shape: tuple[int, ...]
    classes_per_task: tuple[int, ...]
    n_classes: int
    multi_head: bool
    primary_score: str = "accuracy"


@dataclass
class Stream:
    """A built stream: its spec and the Avalanche benchmark.

    Attributes:
        spec: the stream's :class:`StreamSpec`.
        benchmark: an Avalanche ``CLScenario`` with ``train_stream`` and ``test_stream`` (and ``valid_stream``
            when ``benchmark.validation_fraction > 0``). Experience ``i`` of every stream has task label ``i``
            and its dataset yields ``(x, y, t)``.
        references: named datasets that are not trained on, for strategies that measure something against them
            (OGPSA's general-capability reference sets, ``strategy.ref_sets``); empty for most streams.
    """

    spec: StreamSpec
    benchmark: Any
    references: dict[str, Any] = field(default_factory=dict)


Builder = Callable[[BenchmarkConfig, int], Stream]

STREAMS: dict[str, Builder] = {}
"""Registry: stream name -> ``builder(cfg, seed)``."""

STREAM_CONFIGS: dict[str, type[BenchmarkConfig]] = {}
"""Registry: stream name -> the config class of its family (:class:`BenchmarkConfig` or a subclass)."""


def register(name: str, config: type[BenchmarkConfig] = BenchmarkConfig) -> Callable[[Builder], Builder]:
    """Decorator that registers a stream builder under ``name`` in :data:`STREAMS`, with its family's config
    class."""

    def deco(fn: Builder) -> Builder:
        if name in STREAMS:
            raise ValueError(f"stream {name!r} registered twice")
        STREAMS[name] = fn
        STREAM_CONFIGS[name] = config
        return fn

    return deco


def build_stream(cfg: BenchmarkConfig, seed: int) -> Stream:
    """Build the stream ``cfg.name`` with run seed ``seed`` (``cfg.stream_seed`` takes precedence).

    Raises:
        ValueError: unknown ``benchmark.name`` or an invalid value of another ``benchmark.*`` key.
        FileNotFoundError: a real data set is missing and ``benchmark.download`` is false.
    """
    builder = STREAMS.get(cfg.name)
    if builder is None:
        raise ValueError(f"benchmark.name={cfg.name!r} is not a registered stream; valid: {sorted(STREAMS)}")
    return builder(cfg, seed)


# --------------------------------------------------------------------------------------------- validation


def stream_seed(cfg: BenchmarkConfig, seed: int) -> int:
    """The seed of the stream's own randomness: ``cfg.stream_seed`` if set, else the run seed."""
    return int(seed if cfg.stream_seed is None else cfg.stream_seed)


def check_common(cfg: BenchmarkConfig) -> None:
    """Validate the keys every stream uses; raise ``ValueError`` naming the key and its valid range.

    Permuted streams accept any ``n_tasks >= 1``; split streams also call :func:`check_split`.
    """
    if cfg.n_tasks < 1:
        raise ValueError(f"benchmark.n_tasks={cfg.n_tasks} is invalid; valid: an integer >= 1")
    if not 0.0 < cfg.test_fraction < 1.0:
        raise ValueError(f"benchmark.test_fraction={cfg.test_fraction} is invalid; valid: 0 < value < 1")
    if not 0.0 <= cfg.validation_fraction < 1.0:
        raise ValueError(
            f"benchmark.validation_fraction={cfg.validation_fraction} is invalid; valid: 0 <= value < 1"
        )
    if cfg.max_train_per_task < 0:
        raise ValueError(
            f"benchmark.max_train_per_task={cfg.max_train_per_task} is invalid; valid: 0 (no cap) or >= 1"
        )


def check_split(cfg: BenchmarkConfig, total_classes: int) -> int:
    """Validate a class-split stream's ``scenario`` and ``n_tasks``; return the number of classes per task.

    ``n_tasks`` must divide ``total_classes`` evenly; in the ``task`` scenario each task needs >= 2 classes
    (a one-class head is trivial).
    """
    if cfg.scenario not in ("task", "class"):
        raise ValueError(
            f"benchmark.scenario={cfg.scenario!r} is invalid for split stream {cfg.name!r}; "
            "valid: 'task' (multi-head, local labels) or 'class' (single head, global labels)"
        )
    min_per_task = 2 if cfg.scenario == "task" else 1
    valid = [
        n
        for n in range(1, total_classes + 1)
        if total_classes % n == 0 and total_classes // n >= min_per_task
    ]
    if cfg.n_tasks not in valid:
        raise ValueError(
            f"benchmark.n_tasks={cfg.n_tasks} is invalid for stream {cfg.name!r} "
            f"(scenario {cfg.scenario!r}, {total_classes} classes split evenly); valid: {valid}"
        )
    return total_classes // cfg.n_tasks


# ----------------------------------------------------------------------------------------------- seeding


def derived_seed(seed: int, tag: int, *more: int) -> int:
    """A 63-bit seed derived deterministically from ``(seed, tag, *more)``: one independent stream per use."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, tag, *more])
    return int(state.generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def generator(seed: int, tag: int, *more: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derived_seed`."""
    return torch.Generator().manual_seed(derived_seed(seed, tag, *more))


def stratified_split(y: Tensor, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Split ``0..len(y)-1`` per class: ``round(fraction * n_c)`` indices of class ``c`` are held out.

    Returns ``(kept, held)``, both sorted ascending (so the split does not reorder the data).
    """
    kept: list[Tensor] = []
    held: list[Tensor] = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_held = round(fraction * idx.numel())
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


# ------------------------------------------------------------------------------------ tensor-backed samples


@dataclass(frozen=True)
class PixelNorm:
    """Decoding of stored images ``(..., C, H, W)`` into normalised float32 inputs, applied on access.

    ``out[c] = (x[c] / divisor - mean[c]) / std[c]`` in float32, the same operations as torchvision's
    ``ToTensor`` + ``Normalize`` for ``uint8`` pixels and ``divisor = 255``; a one-channel image is then
    repeated to ``channels`` channels (GPM's ``expand`` of the MNIST-like sets). Storing ``uint8`` pixels and
    decoding per batch keeps a real image stream at a quarter of its float32 size (a twelfth for a replicated
    grey-scale set).

    Attributes:
        mean: per-channel means (one value for grey-scale data, applied before the replication).
        std: per-channel standard deviations, same length as ``mean``.
        divisor: the stored values are divided by it first (255 for ``uint8`` pixels, 1 for floats).
        channels: channels of the output; a stored single channel is repeated to this many.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    divisor: float = 255.0
    channels: int = 3

    def __post_init__(self) -> None:
        """Check that ``mean`` and ``std`` agree and that ``channels`` is reachable from them."""
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, self.channels):
            raise ValueError(
                f"PixelNorm: mean {self.mean} / std {self.std} need equal lengths of 1 or channels={self.channels}"
            )

    def output_shape(self, stored: Sequence[int]) -> tuple[int, ...]:
        """Shape of one decoded sample whose stored shape is ``stored`` = ``(C, H, W)``."""
        return (self.channels, *tuple(stored)[1:])

    def __call__(self, x: Tensor) -> Tensor:
        """Decode ``x`` (``(C, H, W)`` or ``(N, C, H, W)``, any dtype) into a new contiguous float32 tensor."""
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(shape)
        out = x.to(torch.float32) / self.divisor  # always a new tensor: the in-place ops below never touch x
        out.sub_(mean).div_(std)
        if out.shape[-3] != self.channels:
            out = out.expand(*out.shape[:-3], self.channels, *out.shape[-2:]).contiguous()
        return out


class TensorSamples(Dataset):
    """A view ``(x[index] with features permuted by perm or decoded by norm, y[index])`` over shared tensors.

    ``x`` is ``(N, *shape)`` (float, or raw pixels when ``norm`` is given), ``y`` is ``(N,)`` int64 (labels
    already in the stream's label space), ``index`` (optional) selects and orders rows, ``perm`` (optional,
    1-D inputs only) permutes features, ``norm`` (optional, ``(N, C, H, W)`` inputs only) turns stored pixels
    into normalised float32 images on access (:class:`PixelNorm`). Several views share ``x`` without copying it
    (all permuted tasks share one base tensor, all split tasks one image tensor).
    ``__getitem__`` returns ``(x_i, int(y_i))``; Avalanche appends the task label. :meth:`gather` is the
    vectorised path :mod:`clbench.streams.batches` uses to materialise a whole experience at once.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        index: Tensor | None = None,
        perm: Tensor | None = None,
        norm: PixelNorm | None = None,
    ) -> None:
        """Create the view; see the class docstring for the arguments."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        if perm is not None and x.dim() != 2:
            raise ValueError("feature permutations need flat (N, D) inputs")
        if norm is not None and (x.dim() != 4 or perm is not None):
            raise ValueError("a PixelNorm needs (N, C, H, W) inputs and no feature permutation")
        self.x = x
        self.y = y
        self.index = index
        self.perm = perm
        self.norm = norm

    def __len__(self) -> int:
        """Number of samples in the view."""
        return int(self.x.shape[0] if self.index is None else self.index.numel())

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """Sample ``i`` as ``(x, label)``."""
        j = int(self.index[i]) if self.index is not None else int(i)
        xi = self.x[j]
        if self.perm is not None:
            xi = xi[self.perm]
        if self.norm is not None:
            xi = self.norm(xi)
        return xi, int(self.y[j])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input (as returned, i.e. after decoding)."""
        stored = tuple(self.x.shape[1:])
        return stored if self.norm is None else self.norm.output_shape(stored)

    @property
    def sample_nbytes(self) -> int:
        """Bytes of one input (as returned, i.e. after decoding)."""
        size = self.x.element_size() if self.norm is None else 4
        return math.prod(self.sample_shape) * size

    def labels(self) -> Tensor:
        """All labels of the view, in order."""
        return self.y if self.index is None else self.y[self.index]

    def select(self, sub: Tensor) -> TensorSamples:
        """A new view of rows ``sub`` (positions within this view); no data is copied."""
        rows = sub if self.index is None else self.index[sub]
        return TensorSamples(self.x, self.y, rows, self.perm, self.norm)

    def gather(
        self, positions: Tensor | None = None, device: torch.device | None = None
    ) -> tuple[Tensor, Tensor]:
        """Fresh (never aliasing ``self.x``) tensors ``(x, y)`` of ``positions`` (default: all), in order, on
        ``device`` (default: where ``x`` is). Rows are selected where ``x`` lives, the permutation and the pixel
        decoding are applied on ``device`` (on a GPU that is much faster than the strided gather on the host, and
        ``uint8`` pixels travel at a quarter of the float32 size)."""
        device = self.x.device if device is None else torch.device(device)
        rows = self.index
        if positions is not None:
            rows = positions if rows is None else rows[positions]
        if rows is None:
            # a permutation or a decoding below copies anyway
            xs = self.x.to(device, copy=self.perm is None and self.norm is None)
            ys = self.y.to(device, copy=True)
        else:
            xs = self.x.index_select(0, rows).to(device)
            ys = self.y.index_select(0, rows).to(device)
        if self.perm is not None:
            xs = xs.index_select(1, self.perm.to(device))
        if self.norm is not None:
            xs = self.norm(xs)
        return xs, ys


def make_dataset(samples: TensorSamples, task: int) -> TaskAwareSupervisedClassificationDataset:
    """Wrap a view as an Avalanche dataset yielding ``(x, y, t)`` with ``t = task`` for every sample."""
    from avalanche.benchmarks.utils import (
        ConstantSequence,
        DataAttribute,
        TaskAwareSupervisedClassificationDataset,
        TaskLabels,
    )

    n = len(samples)
    return TaskAwareSupervisedClassificationDataset(
        [samples],
        data_attributes=[
            DataAttribute(samples.labels().tolist(), "targets"),
            TaskLabels(ConstantSequence(int(task), n)),
        ],
    )


# ---------------------------------------------------------------------------------------------- assembly


def assemble(
    cfg: BenchmarkConfig,
    seed: int,
    spec: StreamSpec,
    train: Sequence[TensorSamples],
    test: Sequence[TensorSamples],
) -> Stream:
    """Turn per-task views into a :class:`Stream`.

    Per training task ``i`` (seeded by ``(seed, i)``, independently of the other tasks and keys): first a
    class-stratified validation split of ``cfg.validation_fraction`` (exposed as ``benchmark.valid_stream``),
    then a random cap of ``cfg.max_train_per_task`` training samples.
    """
    from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_task_labels

    if len(train) != spec.n_tasks or len(test) != spec.n_tasks:
        raise ValueError("one train and one test view per task expected")
    train_sets, valid_sets, test_sets = [], [], []
    classes: dict[str, list[list[int]]] = {"train": [], "valid": [], "test": []}
    for i, (tr, te) in enumerate(zip(train, test, strict=True)):
        if cfg.validation_fraction > 0:
            kept, held = stratified_split(
                tr.labels(), cfg.validation_fraction, generator(seed, TAG_VALIDATION, i)
            )
            if held.numel() == 0 or kept.numel() == 0:
                raise ValueError(
                    f"benchmark.validation_fraction={cfg.validation_fraction} leaves an empty split for task "
                    f"{i} ({len(tr)} training samples); valid: a fraction holding out and keeping >= 1 sample"
                )
            valid = tr.select(held)
            valid_sets.append(make_dataset(valid, i))
            classes["valid"].append(torch.unique(valid.labels()).tolist())
            tr = tr.select(kept)
        if 0 < cfg.max_train_per_task < len(tr):
            sub = torch.randperm(len(tr), generator=generator(seed, TAG_CAP, i))[: cfg.max_train_per_task]
            tr = tr.select(sub.sort().values)
        train_sets.append(make_dataset(tr, i))
        test_sets.append(make_dataset(te, i))
        classes["train"].append(torch.unique(tr.labels()).tolist())
        classes["test"].append(torch.unique(te.labels()).tolist())
    streams: dict[str, list[TaskAwareSupervisedClassificationDataset]] = {"train": train_sets}
    if valid_sets:
        streams["valid"] = valid_sets
    streams["test"] = test_sets
    bm = with_task_labels(benchmark_from_datasets(**streams))
    for name, stream in bm.streams.items():
        add_classes_timeline(stream, classes[name])
    return Stream(spec=spec, benchmark=bm)


def add_classes_timeline(stream: Any, classes: Sequence[Sequence[int]]) -> None:
    """Set Avalanche's ``ClassesTimeline`` attributes on each experience of ``stream``, as sorted lists.

    ``avalanche.benchmarks.scenarios.supervised.with_classes_timeline`` (0.6) stores sets, which
    ``MultiHeadClassifier.adaptation`` cannot use as a tensor index, and it iterates every label in Python;
    here ``classes[i]`` are experience ``i``'s classes, already computed from the label tensors.
    """
    every = sorted({c for cls in classes for c in cls})
    seen: set[int] = set()
    for exp, cls in zip(stream, classes, strict=True):
        current = sorted(cls)
        exp.classes_in_this_experience = current
        exp.previous_classes = sorted(seen)
        seen.update(current)
        exp.classes_seen_so_far = sorted(seen)
        exp.future_classes = [c for c in every if c not in seen]


def permuted_views(x: Tensor, y: Tensor, perms: Sequence[Tensor | None]) -> list[TensorSamples]:
    """One view per permutation over the shared ``x`` (``None``: identity, no feature copy)."""
    return [TensorSamples(x, y, None, p) for p in perms]


def split_views(
    x: Tensor, y: Tensor, n_tasks: int, per_task: int, multi_head: bool, norm: PixelNorm | None = None
) -> list[TensorSamples]:
    """Task ``t`` = classes ``t*per_task .. (t+1)*per_task - 1``; local labels when ``multi_head``.

    ``norm`` (optional) decodes stored image pixels on access (see :class:`TensorSamples`).
    """
    views = []
    for t in range(n_tasks):
        lo = t * per_task
        rows = torch.nonzero((y >= lo) & (y < lo + per_task)).flatten()
        labels = y - lo if multi_head else y
        views.append(TensorSamples(x, labels, rows, None, norm))
    return views


def pad_to_32(x: Tensor) -> Tensor:
    """28x28 grey-scale images (``(N, 28, 28)`` or flat ``(N, 784)``) zero-padded by 2 pixels on every side to
    ``(N, 1, 32, 32)``, same dtype (GPM's ``transforms.Pad(padding=2, fill=0)`` for its MNIST-like sets)."""
    return torch.nn.functional.pad(x.reshape(-1, 1, 28, 28), (2, 2, 2, 2), value=0)


def pmnist_permutations(n_tasks: int, seed: int, n_features: int = 784) -> list[Tensor]:
    """Feature permutations of the GPM paper's PMNIST protocol; no task uses the identity.

    The official code draws a seed-shuffled ``0..9`` and permutes task ``i`` with a
    ``RandomState(100*r + i)``, ``r`` being task ``i``'s entry of that shuffle. Here the shuffle is
    ``RandomState(seed).permutation(m)`` with ``m = max(10, n_tasks)`` and task ``i`` uses
    ``RandomState(100*r_i + i).permutation(n_features)``.
    With ``n_tasks <= 10`` the tasks are a prefix of the 10-task stream of the same seed.
    """
    order = np.random.RandomState(seed % 2**32).permutation(max(10, n_tasks))
    return [
        torch.from_numpy(np.random.RandomState(100 * int(order[i]) + i).permutation(n_features))
        for i in range(n_tasks)
    ]


def random_permutations(n_tasks: int, seed: int, n_features: int) -> list[Tensor | None]:
    """Task 0 unpermuted (``None``), tasks ``1..n_tasks-1`` random permutations drawn from ``seed``.

    Drawn in task order from one generator, so task ``i``'s permutation does not depend on ``n_tasks``.
    """
    gen = generator(seed, TAG_PERMUTATIONS)
    return [None] + [torch.randperm(n_features, generator=gen) for _ in range(1, n_tasks)]
