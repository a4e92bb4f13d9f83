"""Several LoRA adapters on one model (peft): what the adapter methods (O-LoRA's one adapter per task) ask of a
model, kept in the model family (peft's tuner layout) so that a strategy never touches peft's internals.

With adapters i = 1..t active, every wrapped linear layer computes h = W₀x + Σ_i (α/r)·B_i A_i x (A_i: r × d_in,
``lora_A``; B_i: d_out × r, ``lora_B``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn


class LoraAdapters:
    """Mixin for a model whose ``lm`` is a ``peft.PeftModel`` built with ``lora_config`` (None: no LoRA)."""

    lm: Any
    lora_config: Any

    def adapter_names(self) -> list[str]:
        """The LoRA adapters the model holds, in the order they were added (``default`` first)."""
        return list(self.lm.peft_config) if self.lora_config is not None else []

    def add_adapter(self, name: str) -> None:
        """A fresh LoRA adapter ``name`` of the model's LoRA config on the same targets: A Kaiming-uniform
        (a = √5), B = 0, so the model's function is unchanged; placed on the base layers' device.

        Raises:
            ValueError: the model has no LoRA (``model.adapter=none``) or already an adapter ``name``.
        """
        if self.lora_config is None:
            raise ValueError("adapters need model.adapter=lora")
        if name in self.adapter_names():
            raise ValueError(f"the model already has an adapter {name!r}")
        self.lm.add_adapter(name, copy.deepcopy(self.lora_config))

    def use_adapters(self, names: Sequence[str], trainable: Sequence[str] = ()) -> None:
        """Make ``names`` the active adapters (their outputs summed) and let only the parameters of the
        ``trainable`` ones require gradients (peft's activation unfreezes every active adapter; the others are
        frozen again here)."""
        self.lm.base_model.set_adapter(list(names))
        for adapter, A, B in self._lora_pairs():
            for p in (A, B):
                p.requires_grad_(adapter in trainable)

    def lora_factors(self, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (A, B)}`` of ``adapter``: A = ``lora_A`` weight (r × d_in), B = ``lora_B`` weight (d_out × r),
        by the wrapped layer's qualified name (the same keys for every adapter)."""
        from peft.tuners.lora import LoraLayer

        assert isinstance(self, nn.Module)
        return {name: (m.lora_A[adapter].weight, m.lora_B[adapter].weight) for name, m in self.named_modules()
                if isinstance(m, LoraLayer) and adapter in m.lora_A}

    def _lora_pairs(self) -> Iterator[tuple[str, nn.Parameter, nn.Parameter]]:
        from peft.tuners.lora import LoraLayer

        assert isinstance(self, nn.Module)
        for m in self.modules():
            if isinstance(m, LoraLayer):
                for adapter in m.lora_A:
                    yield adapter, m.lora_A[adapter].weight, m.lora_B[adapter].weight
