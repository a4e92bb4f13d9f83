"""Overlap of row spaces: the soft orthogonality penalties of the adapter methods.

For row blocks A_i (r_i × d) of earlier tasks and the current block A (r × d), the cross-Gram A_i Aᵀ (r_i × r)
vanishes exactly when the row spaces are orthogonal. O-LoRA (Wang et al. 2023; its code's form) penalises

    Σ_i Σ_jk |(A_i Aᵀ)_jk|          (``l1``)      or the paper's      Σ_i Σ_jk (A_i Aᵀ)_jk²      (``squared``);

O3 (Gao et al. 2024) penalises the squared Frobenius form against frozen snapshots Â_i.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

NORMS = ("l1", "squared")


def row_overlap(old: Sequence[Tensor], rows: Tensor, norm: str = "l1") -> Tensor:
    """Σ_i ‖A_i · rowsᵀ‖ over the blocks ``old`` (each r_i × d) against ``rows`` (r × d): the entrywise L1 norm
    (``l1``) or the squared Frobenius norm (``squared``); 0 (with a graph to ``rows``) when ``old`` is empty. Both
    norms sum over the rows of the blocks, so one block stacking the A_i's (dim 0) gives the same sum as the list.
    Leading dimensions batch: blocks (L × r_i × d) against ``rows`` (L × r × d) sum over the L pairs.

    Raises:
        ValueError: an unknown ``norm``, or blocks of another width d.
    """
    if norm not in NORMS:
        raise ValueError(f"row_overlap: norm {norm!r} is not one of {list(NORMS)}")
    total = None
    for block in old:
        if block.shape[-1] != rows.shape[-1]:
            raise ValueError(f"row_overlap: blocks of width {block.shape[-1]} and {rows.shape[-1]}")
        cross = block.to(rows.dtype) @ rows.transpose(-2, -1)
        term = cross.abs().sum() if norm == "l1" else cross.square().sum()
        total = term if total is None else total + term
    return rows.sum() * 0.0 if total is None else total


class LayerOverlap:
    """Σ_layers ‖F_l A_lᵀ‖ (``norm``) over many layers, for frozen rows F_l (k_l × d, e.g. the stacked A's of the
    earlier tasks) and the current A_l (r × d, trainable): the layers of one shape go through one batched
    cross-Gram (:func:`row_overlap` on L × k × d against L × r × d). The frozen rows are stacked once, here (they
    do not change while A trains); the current A's are read at each call, so the sum has a graph to them."""

    def __init__(self, pairs: Iterable[tuple[Tensor, Tensor]]) -> None:
        """``pairs``: (F_l, A_l) per layer; a layer without frozen rows (k_l = 0) adds nothing."""
        groups: dict[tuple[Any, ...], list[tuple[Tensor, Tensor]]] = {}
        for frozen, A in pairs:
            if frozen.shape[0]:
                groups.setdefault((frozen.shape, A.shape, A.dtype, A.device), []).append((frozen.detach(), A))
        self.groups = [(torch.stack([f for f, _ in g]), [A for _, A in g]) for g in groups.values()]

    def __call__(self, norm: str) -> Tensor:
        """The sum; a zero without a graph when no layer has frozen rows."""
        terms = [row_overlap([frozen], torch.stack(current), norm) for frozen, current in self.groups]
        return sum(terms[1:], terms[0]) if terms else torch.zeros(())


__all__ = ["NORMS", "LayerOverlap", "row_overlap"]
