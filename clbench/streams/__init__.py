"""Continual benchmark streams built with Avalanche, and fast batch sources over their experiences.

Public API:

* :class:`StreamSpec`, :class:`Stream`: what a model needs to know about a stream, and the built stream (its
  ``benchmark`` is an Avalanche ``CLScenario`` with ``train_stream``, ``test_stream`` and, when
  ``benchmark.validation_fraction > 0``, ``valid_stream``). Every experience's dataset yields ``(x, y, t)``;
  experience ``i`` has task label ``i`` in every stream.
* :data:`STREAMS`, :func:`build_stream`: the registry ``name -> builder(cfg, seed)`` and its lookup.
* :class:`BatchSource`, :func:`batch_source`: an experience's data as device tensors batched by index
  selection, or streamed through a DataLoader when it does not fit (the two implementations,
  ``TensorBatchSource`` and ``LoaderBatchSource``, live in :mod:`clbench.streams.batches`).

Registered streams: offline (data shipped with installed packages) ``permuted_digits``, ``split_digits``,
``permuted_mnist1d``, ``split_mnist1d``, ``permuted_mnist_5k`` (the default); real (torchvision data under
``benchmark.data_root``) ``pmnist``, ``split_cifar100``.
"""

from clbench.streams import offline as _offline
from clbench.streams import real as _real
from clbench.streams.batches import BatchSource, batch_source
from clbench.streams.core import STREAMS, Stream, StreamSpec, build_stream

__all__ = [
    "STREAMS",
    "BatchSource",
    "Stream",
    "StreamSpec",
    "batch_source",
    "build_stream",
]

del _offline, _real
