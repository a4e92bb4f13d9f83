"""Communication accounting for FedAvg and FOT (fot.md §3), in bytes, summed over the clients of a round.

Per round, FedAvg and FOT cost the same: each of the C sampled clients downloads θ and uploads θ_k
(|θ| floats each way; the official code also resends every basis each round, which is not needed).
At a task end FOT adds GPSE (fot.md §2 step 5-6):

* down: the bases U_l (Σ_l d_l·k_l floats) to each client of the round, for its residuals;
* up: per client Σ_l d_l·m_l floats (the sketches) + 2 scalars per layer (the ratio sums), independent
  of the client's sample count. The code's widths: m = d (MLP, AlexNet convs), 5d (AlexNet fc, ResNets).

Example (fot.md §3): MLP 784-400-400-400-10 with all 4 weights projected and m = d: |θ| = 638 810 floats,
sketch upload 784² + 3·400² + 8 = 1 094 664 floats ≈ 1.7 |θ| per client and task.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Traffic", "gpse_traffic", "round_traffic", "tensor_bytes"]


def tensor_bytes(tensors: Tensor | Mapping[str, Tensor] | Iterable[Tensor]) -> int:
    """Σ numel·element_size over a tensor, a state dict (its values) or an iterable of tensors."""
    if isinstance(tensors, Tensor):
        return tensors.numel() * tensors.element_size()
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return sum(t.numel() * t.element_size() for t in values)


@dataclass(frozen=True)
class Traffic:
    """Bytes sent client → server (``up``) and server → client (``down``), summed over the clients."""

    up: int
    down: int

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.up + other.up, self.down + other.down)

    def __mul__(self, times: int) -> Traffic:
        return Traffic(self.up * times, self.down * times)

    @property
    def total(self) -> int:
        """up + down."""
        return self.up + self.down


def round_traffic(model_bytes: int, num_clients: int, basis_bytes: int = 0) -> Traffic:
    """One training round of FedAvg or FOT with C = ``num_clients`` clients (fot.md §2 steps 1-2).

    up = C·|θ|, down = C·(|θ| + ``basis_bytes``); ``basis_bytes`` > 0 models the official code, which sends
    all bases with the model every round (FOT needs them only at a task end, see :func:`gpse_traffic`).
    """
    if num_clients < 0:
        raise ValueError(f"num_clients must be >= 0, got {num_clients}")
    return Traffic(up=num_clients * model_bytes, down=num_clients * (model_bytes + basis_bytes))


def gpse_traffic(
    shapes: Mapping[str, tuple[int, int]],
    num_clients: int,
    bases: Mapping[str, Tensor | None] | None = None,
    bytes_per_float: int = 4,
    scalars_per_layer: int = 2,
) -> Traffic:
    """One GPSE exchange at a task end with C = ``num_clients`` clients (fot.md §3).

    up = C·(Σ_l d_l·m_l + ``scalars_per_layer``·L)·b over the L layers of ``shapes`` ((d_l, m_l), see
    :func:`sketch_shapes`); down = C·(Σ_l d_l·k_l)·b for the current ``bases`` (None or empty on task 1);
    b = ``bytes_per_float`` (4 for float32 as in the code, 8 for :func:`.gpse.pack_sketches`' float64).
    """
    if num_clients < 0:
        raise ValueError(f"num_clients must be >= 0, got {num_clients}")
    up_floats = sum(d * m for d, m in shapes.values()) + scalars_per_layer * len(shapes)
    down_floats = sum(U.numel() for U in (bases or {}).values() if U is not None)
    return Traffic(up=num_clients * up_floats * bytes_per_float, down=num_clients * down_floats * bytes_per_float)
