"""Representation matrices of a layer's inputs (GPM, Saha et al. ICLR 2021, §4, Eqs. 3-4, Fig. 1).

Inside one layer every SGD update lies in the span of the layer's inputs. For a fully connected layer
``y = x Wᵀ`` (W: out × d) the weight gradient over a batch is ``∇W = δᵀ x`` (Eq. 3), so its rows lie in
span{x_1, …, x_n}. For a convolution, ``conv2d(x, W)`` equals ``W.view(out, -1) @ P`` where the columns of
``P`` are the input patches at every output position (Eq. 4), so the gradient rows lie in the span of the
patches. The *representation matrix* R (d × N) collects those vectors as columns:

* ``nn.Linear``: R = [x_1 … x_n] = xᵀ, d = in_features.
* ``nn.Conv2d``: R = [patches of sample 1 | … | patches of sample n], d = C_in·kh·kw, N = n·L with L the
  number of output positions; the row order is (C_in, kh, kw), i.e. that of ``weight.view(out, -1)``.

Spiking nets (:mod:`clbench.models.snn`, :mod:`clbench.models.snn_conv`) feed their layers activity with time at
dim 1, (n, T, d) or (n, T, C, H, W): every time step of every sample is one more input, so R gets n·T columns
(n·T·L for a convolution), sample-major, while dim 0 still counts samples.

This module knows nothing about strategies: it turns tensors into matrices and collects them with hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["collect_layer_inputs", "layer_input_matrix"]


def _same_padding(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Explicit (left, right, top, bottom) zero padding of ``padding="same"`` (the odd one on the right)."""
    pads: list[int] = []
    for k, dil in zip(reversed(kernel), reversed(dilation), strict=True):  # last dim (width) first for F.pad
        total = dil * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads[0], pads[1], pads[2], pads[3]


def unsupported_layers(layers: Mapping[str, nn.Module]) -> list[str]:
    """Names of the ``layers`` whose inputs :func:`layer_input_matrix` cannot read (neither ``nn.Linear`` nor
    ``nn.Conv2d``), each with its type."""
    return [f"{name} ({type(m).__module__}.{type(m).__name__})" for name, m in layers.items()
            if not isinstance(m, nn.Linear | nn.Conv2d)]


def layer_input_matrix(module: nn.Module, x: Tensor) -> Tensor:
    """Return the representation matrix R (d × N) of ``module``'s input ``x`` (GPM Eqs. 3-4).

    * ``nn.Linear``: ``x`` of shape (n, d) — or (…, d), leading dims flattened — gives ``R = xᵀ`` (d × n);
      a spiking layer's (n, T, d) gives d × n·T, column n'·T + t for sample n', step t.
    * ``nn.Conv2d``: ``x`` of shape (n, C, H, W) is unfolded with the module's own kernel size, dilation,
      padding and stride, ``F.unfold(x) : (n, C·kh·kw, L)``, and the samples are concatenated along columns:
      ``R : (C·kh·kw, n·L)``. The rows follow ``weight.view(out, -1)``, so
      ``conv2d(x, W) == (W.view(out, -1) @ R).view(out, n, L).transpose(0, 1)`` reshaped to (n, out, H', W').
      ``padding="same"``/``"valid"`` are supported; padding modes other than ``"zeros"`` and grouped
      convolutions raise ``NotImplementedError``.
    * ``nn.Conv2d`` on a spiking net's (n, T, C, H, W) (a time-distributed convolution): the time steps are
      flattened into samples, (n·T, C, H, W), before unfolding, so ``R : (C·kh·kw, n·T·L)``, column
      (n'·T + t)·L + l for sample n', step t, output position l.

    The result is detached and keeps ``x``'s dtype and device.

    Raises:
        TypeError: for any other module type.
    """
    x = x.detach()
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t()
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise NotImplementedError(
                f"layer_input_matrix: Conv2d padding_mode={module.padding_mode!r} is not supported "
                "(only 'zeros')"
            )
        if module.groups != 1:
            raise NotImplementedError(
                f"layer_input_matrix: grouped Conv2d (groups={module.groups}) is not supported"
            )
        if x.dim() == 3:  # unbatched (C, H, W)
            x = x.unsqueeze(0)
        elif x.dim() == 5:  # (n, T, C, H, W): every time step is one more input
            x = x.flatten(0, 1)
        padding: tuple[int, ...] | int
        if isinstance(module.padding, str):
            if module.padding == "same":
                x = F.pad(x, _same_padding(module.kernel_size, module.dilation))
            padding = 0
        else:
            padding = module.padding
        patches = F.unfold(
            x, kernel_size=module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
        )  # (n, C·kh·kw, L)
        return patches.transpose(0, 1).reshape(patches.shape[1], -1)
    raise TypeError(
        f"layer_input_matrix: unsupported module type {type(module).__name__} (Linear or Conv2d only)"
    )


def collect_layer_inputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    run: Callable[[], Any],
    samples: Mapping[str, int] | None = None,
    transform: Callable[[nn.Module, Tensor], Tensor] | None = None,
    positions: Tensor | None = None,
) -> dict[str, Tensor]:
    """Collect the representation matrix R of every layer in ``layers`` during ``run()`` (GPM §4, step 2).

    Forward pre-hooks are registered on the given modules, ``run()`` is called (the caller controls the
    forward pass: eval mode, ``torch.no_grad()``, which samples), and the hooks are removed — always, also
    when ``run()`` raises. Each layer's inputs are turned into R by :func:`layer_input_matrix`.

    ``samples[name]`` (GPM's per-layer n_s; e.g. CIFAR AlexNet uses 24/100/100/125/125 of 125 samples) keeps
    only the first ``samples[name]`` samples (rows of dim 0 of the input) that the layer sees during
    ``run()``, counted over all its calls. When a layer is called more than once, the columns of the calls
    are concatenated in call order. A spiking layer's input (n, T, …) counts n samples, and keeps all T steps
    of each (n·T columns, n·T·L for a convolution).

    ``transform(module, x)``, if given, maps each recorded input before it becomes R (e.g. HLOP's firing rate
    over time of a spiking layer's input); the sample limit applies to the untransformed input.

    ``positions`` (n × L booleans), if given, keeps of a Linear layer's sequence input (n, L, d) only the rows
    it marks (a language model's real tokens, not its padding): sample k of the layer's calls takes row k of
    ``positions``, so each layer must see the batch once, in order.

    Returns:
        ``{name: R}`` with R of shape (d, N), in the dtype/device of the layer's input.

    Raises:
        ValueError: if a module in ``layers`` is not a submodule of ``model`` or a sample count is < 1.
        RuntimeError: if a layer received no input during ``run()``.
    """
    owned = {id(m) for m in model.modules()}
    for name, module in layers.items():
        if id(module) not in owned:
            raise ValueError(f"collect_layer_inputs: layer {name!r} is not a submodule of the model")
    limits: dict[str, int | None] = {name: None for name in layers}
    for name, count in (samples or {}).items():
        if name not in layers:
            raise ValueError(f"collect_layer_inputs: samples names an unknown layer {name!r}")
        if count < 1:
            raise ValueError(f"collect_layer_inputs: samples[{name!r}] must be >= 1, got {count}")
        limits[name] = count

    chunks: dict[str, list[Tensor]] = {name: [] for name in layers}
    seen: dict[str, int] = dict.fromkeys(layers, 0)

    def make_hook(name: str, module: nn.Module) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            limit = limits[name]
            if limit is not None:
                left = limit - seen[name]
                if left <= 0:
                    return
                x = x[:left]
            first = seen[name]
            seen[name] += x.shape[0]
            if positions is not None and x.dim() == 3 and isinstance(module, nn.Linear):
                keep = positions[first:first + x.shape[0], : x.shape[1]]
                if keep.shape != x.shape[:2]:
                    raise ValueError(f"collect_layer_inputs: positions {tuple(keep.shape)} do not match the input "
                                     f"{tuple(x.shape)} of layer {name!r}")
                x = x[keep.to(torch.bool)]
            with torch.no_grad():
                chunks[name].append(layer_input_matrix(module, x if transform is None else transform(module, x)))

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name, module)) for name, module in layers.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()

    missing = [name for name, parts in chunks.items() if not parts]
    if missing:
        raise RuntimeError(f"collect_layer_inputs: no input reached layer(s) {missing} during run()")
    return {name: parts[0] if len(parts) == 1 else torch.cat(parts, dim=1) for name, parts in chunks.items()}
