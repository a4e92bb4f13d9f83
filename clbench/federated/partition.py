"""Splitting one task's training samples over K clients (FOT data protocol, fot.md §5).

Every function returns K index tensors (int64, ascending) that together hold every index 0…N−1 exactly once,
and is deterministic given ``seed`` (an int or a ``torch.Generator``, whose state it advances).

* :func:`iid_partition`: a random permutation cut into K near-equal parts (the FOT code's IID split).
* :func:`shard_partition`: McMahan et al.'s pathological non-IID split that FOT uses: sort by label, cut
  into K·s shards (s = 2), give each client s random shards. A shard no longer than the smallest class
  holds at most 2 labels, so a client sees at most 2·s labels, and at most s when every class size is a
  multiple of the shard length (balanced data).
* :func:`dirichlet_partition`: per class c, proportions p_c ~ Dir(α·1_K) (Hsu et al. 2019). Not used by
  FOT (no α anywhere in its code); offered for other federated baselines.

Departure from the official code (data_preprocess/*/data_loader.py): it gives each client ⌊N/K⌋ (IID) or
2·⌊N/2K⌋ (shards) samples and drops the remainder (at most K−1, resp. 2K−1, samples per task). Here the
parts differ in size by at most one sample instead, so that no sample is lost.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["SCHEMES", "dirichlet_partition", "iid_partition", "partition", "shard_partition"]

SCHEMES = ("iid", "shards", "dirichlet")


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


def _labels(labels: Tensor | Sequence[int]) -> Tensor:
    t = torch.as_tensor(labels)
    if t.dim() != 1 or t.is_floating_point() or t.is_complex():
        raise ValueError(f"labels must be a 1-D integer sequence, got shape {tuple(t.shape)} of {t.dtype}")
    return t.cpu()


def _check_clients(num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")


def iid_partition(num_samples: int, num_clients: int, seed: int | torch.Generator) -> list[Tensor]:
    """Random equal split: a permutation of 0…N−1 cut into K parts of ⌊N/K⌋ or ⌈N/K⌉ indices.

    Raises:
        ValueError: if ``num_clients`` < 1 or ``num_clients`` > ``num_samples`` (a client would get nothing).
    """
    _check_clients(num_clients)
    if num_clients > num_samples:
        raise ValueError(f"num_clients ({num_clients}) exceeds num_samples ({num_samples})")
    perm = torch.randperm(num_samples, generator=_generator(seed))
    return [part.sort().values for part in perm.tensor_split(num_clients)]


def shard_partition(
    labels: Tensor | Sequence[int], num_clients: int, seed: int | torch.Generator, shards_per_client: int = 2
) -> list[Tensor]:
    """Label-sorted shards (FOT's non-IID split, McMahan et al. 2017).

    The indices are sorted by label (stable: ties keep their order), cut into S = K·s contiguous shards of
    ⌊N/S⌋ or ⌈N/S⌉ indices, and a random permutation π of the shards gives client k the shards
    π[k·s], …, π[k·s + s − 1] (s = ``shards_per_client``, 2 in FOT).

    Raises:
        ValueError: if ``num_clients`` or ``shards_per_client`` < 1, or K·s exceeds the number of samples.
    """
    _check_clients(num_clients)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    y = _labels(labels)
    num_shards = num_clients * shards_per_client
    if num_shards > y.numel():
        raise ValueError(
            f"num_clients × shards_per_client = {num_clients} × {shards_per_client} = {num_shards} shards "
            f"exceed the {y.numel()} samples in labels"
        )
    order = torch.sort(y, stable=True).indices
    shards = order.tensor_split(num_shards)
    perm = torch.randperm(num_shards, generator=_generator(seed)).tolist()
    return [
        torch.cat([shards[s] for s in perm[k * shards_per_client : (k + 1) * shards_per_client]]).sort().values
        for k in range(num_clients)
    ]


def dirichlet_partition(
    labels: Tensor | Sequence[int], num_clients: int, alpha: float, seed: int | torch.Generator
) -> list[Tensor]:
    """Per-class Dirichlet split: the n_c samples of class c are shuffled and cut at round(n_c·cumsum(p_c)).

    p_c ~ Dir(α·1_K), drawn independently per class (classes in ascending order); large α gives near-equal
    shares of every class, small α gives each class to few clients. Clients may end up empty for small α.
    The Dirichlet draws use a NumPy generator seeded from ``seed``.

    Raises:
        ValueError: if ``num_clients`` < 1, ``alpha`` is not a positive finite number, or labels is empty.
    """
    _check_clients(num_clients)
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    y = _labels(labels)
    if y.numel() == 0:
        raise ValueError("labels is empty")
    gen = _generator(seed)
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen)))
    parts: list[list[Tensor]] = [[] for _ in range(num_clients)]
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        p = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = np.rint(np.cumsum(p[:-1]) * idx.numel()).astype(np.int64)  # the last part runs to the end
        for k, part in enumerate(idx.tensor_split(torch.from_numpy(cuts))):
            parts[k].append(part)
    return [torch.cat(p).sort().values for p in parts]


def partition(
    labels: Tensor | Sequence[int],
    num_clients: int,
    scheme: str,
    seed: int | torch.Generator,
    *,
    alpha: float | None = None,
    shards_per_client: int = 2,
) -> list[Tensor]:
    """Dispatch on ``scheme``: ``"iid"``, ``"shards"`` (FOT's non-IID) or ``"dirichlet"`` (needs ``alpha``)."""
    if scheme == "iid":
        return iid_partition(len(labels), num_clients, seed)
    if scheme == "shards":
        return shard_partition(labels, num_clients, seed, shards_per_client)
    if scheme == "dirichlet":
        if alpha is None:
            raise ValueError('alpha is required for scheme="dirichlet"')
        return dirichlet_partition(labels, num_clients, alpha, seed)
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
