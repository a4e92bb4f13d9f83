"""Several LoRA adapters on one model (peft): what the adapter methods (O-LoRA's one adapter per task) ask of a
model, kept in the model family (peft's tuner layout) so that a strategy never touches peft's internals.

With adapters i = 1..t active, every wrapped linear layer computes h = W₀x + Σ_i s_i·B_i A_i x (A_i: r_i × d_in,
``lora_A``; B_i: d_out × r_i, ``lora_B``; s_i = α/r, peft's ``scaling``).

peft runs every active adapter as its own branch (two small matmuls, a scaling, an add, forward and backward), so
t active adapters cost t branches in every wrapped layer. :meth:`LoraAdapters.stack_adapters` folds frozen adapters
into one adapter, :data:`STACK`, in the "cat" form (O-LoRA's official code keeps its old adapters this way):

    A_stack = [A_1; …; A_k] (rows stacked, Σr_i × d_in),   B_stack = [B_1 · s_1/s, …, B_k · s_k/s] (columns),

with the scaling s = s_1 of the first, so s·B_stack A_stack = Σ_i s_i B_i A_i: one branch computes what k did. With
equal scalings (one LoRA config, as O-LoRA's) the blocks are exact copies (s_i/s = 1). The stacked adapters stay
stored, inactive, as the record of each task (their factors for diagnostics, their state for checkpoints).

Two more services of the family:

* **Full fine-tuning before the adapters** (:meth:`LoraAdapters.full_finetuning`): the whole model trains with
  every adapter layer off (h = W₀x), then the base freezes and the adapters train on it (``model.adapter_from``).
* **A per-input gate** (:meth:`LoraAdapters.gated`, O3's soft loading, o3.md §5): with weights w ∈ R^n for a
  batch of n inputs, every wrapped layer computes h = W₀x + w(x)·Σ_i s_i B_i A_i x, by a forward hook on each
  ``lora_B`` that scales its output row by row. w = 0 gives exactly the base model; the adapter path is linear
  in w.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

STACK = "frozen_stack"
"""Name of the adapter :meth:`LoraAdapters.stack_adapters` builds (refused as an adapter name)."""
GATE = "adapter_gate"
"""Batch key of the per-sample adapter weights w(x) (:meth:`LoraAdapters.gated`; a language model applies it in
its loss and scores)."""


class LoraAdapters:
    """Mixin for a model whose ``lm`` is a ``peft.PeftModel`` built with ``lora_config`` (None: no LoRA)."""

    lm: Any
    lora_config: Any

    def adapter_names(self) -> list[str]:
        """The LoRA adapters the model holds, in the order they were added (``default`` first); not :data:`STACK`,
        which only repeats some of them."""
        return [a for a in self.lm.peft_config if a != STACK] if self.lora_config is not None else []

    def add_adapter(self, name: str) -> None:
        """A fresh LoRA adapter ``name`` of the model's LoRA config on the same targets: A Kaiming-uniform
        (a = √5), B = 0, so the model's function is unchanged; placed on the base layers' device.

        Raises:
            ValueError: the model has no LoRA (``model.adapter=none``), already an adapter ``name``, or ``name`` is
                :data:`STACK`.
        """
        if self.lora_config is None:
            raise ValueError("adapters need model.adapter=lora")
        if name in self.adapter_names() or name == STACK:
            raise ValueError(f"the model already has an adapter {name!r}")
        self.lm.add_adapter(name, copy.deepcopy(self.lora_config))

    def add_task_adapter(self, adapters: list[str], task: int) -> None:
        """The adapter of task ``task`` for a method with one adapter per task, appended to ``adapters`` (the
        method's list, in task order): a fresh ``task<t>`` for t > 0; task 0 uses the model's own adapter."""
        if task > 0:
            self.add_adapter(f"task{task}")
            adapters.append(f"task{task}")

    def restore_adapters(self, adapters: list[str], saved: list[str]) -> list[str]:
        """Re-create, for a resumed run, the adapters in ``saved`` (its list) that ``adapters`` (the list of this
        fresh model: its own adapter) lacks; their weights load next. Returns the resumed list."""
        for name in saved[len(adapters):]:
            self.add_adapter(name)
        return list(saved)

    def use_adapters(self, names: Sequence[str], trainable: Sequence[str] = ()) -> None:
        """Make ``names`` the active adapters (their outputs summed; :data:`STACK` among them stands for the adapters
        it holds) and let only the parameters of the ``trainable`` ones require gradients (peft's activation
        unfreezes every active adapter; the others are frozen again here). No ``names``: the base model alone
        (every adapter layer off until adapters are used again)."""
        if names:
            self.lm.base_model.enable_adapter_layers()
            self.lm.base_model.set_adapter(list(names))
        else:
            self.lm.base_model.disable_adapter_layers()
        for adapter, A, B in self._lora_pairs():
            for p in (A, B):
                p.requires_grad_(adapter in trainable)

    def stack_adapters(self, names: Sequence[str]) -> str:
        """(Re)build :data:`STACK`, one frozen adapter equal to the sum of the adapters ``names`` (the module
        docstring's "cat" form: their A's rows and B's columns copied in order, rank Σr_i), and return its name.
        The adapters themselves are left as they are (the stack is a copy: build it again after changing one of
        them); the active adapters are undefined until the next :meth:`use_adapters`, which activates the stack.
        Draws no random numbers (peft initialises the new adapter on a forked generator; it is overwritten).

        Raises:
            ValueError: ``names`` is empty or names an adapter the model lacks (or :data:`STACK`).
        """
        from peft.tuners.lora import LoraLayer

        names = list(names)
        if not names or any(n not in self.adapter_names() for n in names):
            raise ValueError(f"stack_adapters: {names} are not adapters of the model {self.adapter_names()}")
        if STACK in self.lm.peft_config:
            with warnings.catch_warnings():  # deleting the active stack: peft activates another one, and says so
                warnings.filterwarnings("ignore", message=f"Adapter {STACK} was active")
                self.lm.delete_adapter(STACK)
        config = copy.deepcopy(self.lm.peft_config[names[0]])
        config.r = sum(self.lm.peft_config[n].r for n in names)
        config.lora_alpha = config.lora_alpha * config.r / self.lm.peft_config[names[0]].r  # s = the first's
        with torch.random.fork_rng(devices=[]):
            self.lm.add_adapter(STACK, config)
        assert isinstance(self, nn.Module)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, LoraLayer) and STACK in m.lora_A:
                    s = m.scaling[names[0]]
                    m.scaling[STACK] = s
                    m.lora_A[STACK].weight.copy_(torch.cat([m.lora_A[n].weight for n in names], 0))
                    m.lora_B[STACK].weight.copy_(torch.cat([m.lora_B[n].weight * (m.scaling[n] / s) for n in names],
                                                           1))
                    m.lora_A[STACK].weight.requires_grad_(False)
                    m.lora_B[STACK].weight.requires_grad_(False)
        self._stacked = names
        return STACK

    def stacked_adapters(self) -> list[str]:
        """The adapters :data:`STACK` holds, in its order (empty: no stack)."""
        if self.lora_config is None or STACK not in self.lm.peft_config:
            return []
        return list(getattr(self, "_stacked", []))

    def lora_factors(self, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (A, B)}`` of ``adapter``: A = ``lora_A`` weight (r × d_in), B = ``lora_B`` weight (d_out × r),
        by the wrapped layer's qualified name (the same keys for every adapter)."""
        from peft.tuners.lora import LoraLayer

        assert isinstance(self, nn.Module)
        return {name: (m.lora_A[adapter].weight, m.lora_B[adapter].weight) for name, m in self.named_modules()
                if isinstance(m, LoraLayer) and adapter in m.lora_A}

    def full_finetuning(self, on: bool) -> None:
        """``on``: train the whole model with every adapter layer off (the base weights trainable, the adapters
        frozen and bypassed). Off: peft's adapter training (the base frozen, the adapter layers on, the ``default``
        adapter active and trainable). Strategies that manage several adapters set theirs afterwards
        (:meth:`use_adapters`)."""
        from peft.tuners.lora import LoraLayer

        assert isinstance(self, nn.Module)
        lora = {id(p) for m in self.modules() if isinstance(m, LoraLayer)
                for part in (m.lora_A, m.lora_B) for p in part.parameters()}
        for p in self.parameters():
            if id(p) not in lora:
                p.requires_grad_(on)
        if on:
            self.use_adapters([])
        else:
            self.use_adapters(["default"], trainable=["default"])

    @contextlib.contextmanager
    def gated(self, weights: torch.Tensor | None) -> Iterator[None]:
        """Within the block, scale every adapter's output per input by ``weights`` (n,) (module docstring): a
        forward hook on each ``lora_B`` multiplies its output's row i by w_i. None: no gate.

        Raises:
            ValueError: (when a layer runs) an output whose first dimension is not n.
        """
        if weights is None:
            yield
            return
        from peft.tuners.lora import LoraLayer

        assert isinstance(self, nn.Module)
        w = weights.detach().flatten()

        def scale(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            if out.shape[0] != w.shape[0]:
                raise ValueError(f"adapter gate: {w.shape[0]} weights for a batch of {out.shape[0]} inputs")
            return out * w.to(out.device, out.dtype).view(-1, *([1] * (out.dim() - 1)))

        handles = [b.register_forward_hook(scale) for m in self.modules() if isinstance(m, LoraLayer)
                   for b in m.lora_B.values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _lora_pairs(self) -> Iterator[tuple[str, nn.Parameter, nn.Parameter]]:
        from peft.tuners.lora import LoraLayer

        assert isinstance(self, nn.Module)
        for m in self.modules():
            if isinstance(m, LoraLayer):
                for adapter in m.lora_A:
                    yield adapter, m.lora_A[adapter].weight, m.lora_B[adapter].weight
