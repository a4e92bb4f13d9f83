"""In-process secure summation by pairwise additive masking (Bonawitz et al., CCS 2017, without dropouts).

FOT sums the clients' GPSE sketches under secure aggregation ([P]; fot.md §2 step 6, pitfall 6). Flower's
SecAgg+ only sums model parameters on its legacy path, so clbench masks the sketches itself.

**Protocol.** The participants P (the clients of the round, ids i) agree pairwise on a seed s_ij, i < j (a
key agreement in a deployment; here derived from a master seed known to the clients only). Every array x_i
(same keys and shapes at every client) is uploaded as

    x̃_i = x_i + Σ_{j ∈ P, j > i} m_ij − Σ_{j ∈ P, j < i} m_ji,     m_ij ~ U[−scale, scale) from seed s_ij

so Σ_i x̃_i = Σ_i x_i: each m_ij is added once by i and subtracted once by j. Arithmetic is float64; the
masks cancel up to rounding, an absolute error of about |P|·scale·2⁻⁵² per entry.

**What each party sees.**

* *Without masking* (honest-but-curious server): every client's x_i itself. For GPSE that is Y_k, n_k ρ_k and
  n_k, and Y_k Y_kᵀ ≈ m·R_k R_kᵀ reveals client k's local second moment of its (residual) layer inputs
  (exactly so in gram mode).
* *With masking*: the server sees each x̃_i, which without the seeds it cannot tell from noise of width
  ``scale``, and the sum Σ_i x_i — for GPSE, Y = R G, Σ n_k ρ_k and Σ n_k, i.e. only the pooled
  statistics it needs (Y Yᵀ ≈ m·R Rᵀ of all clients together). A client sees its own data and the seeds
  of its pairs, never another client's x̃_j or x_j. Any coalition of the server and all but one
  participant can still subtract their own inputs from the sum, as with any exact sum.

**Limits of this mock.** Masks are real numbers, so they hide x_i statistically (for |x_i| ≪ scale), not
perfectly as masks in a finite group do; there is no dropout recovery (a client that masks and then does not
upload leaves its masks in the sum); the seeds come from one master seed instead of a key exchange.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["PairwiseMasking", "secure_sum"]


class PairwiseMasking:
    """Pairwise additive masks for the participants ``clients`` of one secure sum.

    Args:
        clients: distinct non-negative client ids taking part in this sum (a fresh instance per sum, or
            the masks of two sums with the same participants would be equal).
        seed: the master seed (non-negative) from which every pair seed s_ij is derived
            (``numpy.random.SeedSequence([seed, i, j])``); unknown to the server.
        scale: masks are uniform on [−scale, scale).
    """

    def __init__(self, clients: Sequence[int], seed: int, scale: float = 1e4):
        ids = [int(c) for c in clients]
        if len(set(ids)) != len(ids):
            raise ValueError(f"PairwiseMasking: clients must be distinct, got {ids}")
        if any(c < 0 for c in ids):
            raise ValueError(f"PairwiseMasking: clients must be non-negative ids, got {ids}")
        if seed < 0:
            raise ValueError(f"PairwiseMasking: seed must be non-negative, got {seed}")
        if not scale > 0:
            raise ValueError(f"PairwiseMasking: scale must be > 0, got {scale}")
        self.clients = sorted(ids)
        self.seed = seed
        self.scale = scale

    def pair_seed(self, i: int, j: int) -> int:
        """s_ij = s_ji, the seed shared by clients i and j."""
        lo, hi = min(i, j), max(i, j)
        return int(np.random.SeedSequence([self.seed, lo, hi]).generate_state(1, np.uint64)[0])

    def mask(self, client: int, arrays: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Client ``client``'s masked upload x̃_i (float64, same keys and shapes), see the module docstring.

        The masks of a pair are drawn from its seed key by key in sorted key order, so both members of the
        pair draw the same m_ij as long as they upload the same keys and shapes.
        """
        if client not in self.clients:
            raise ValueError(f"PairwiseMasking.mask: client {client} is not among the participants {self.clients}")
        keys = sorted(arrays)
        out = {key: arrays[key].detach().to(torch.float64).clone() for key in keys}
        for other in self.clients:
            if other == client:
                continue
            sign = 1.0 if client < other else -1.0
            gen = torch.Generator().manual_seed(self.pair_seed(client, other))
            for key in keys:
                x = out[key]
                m = (torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * self.scale
                x += sign * m.to(x.device)
        return out


def secure_sum(uploads: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The server's side: Σ_i x̃_i key by key (float64), equal to Σ_i x_i when every participant uploaded.

    Raises:
        ValueError: if there are no uploads or they differ in keys or shapes.
    """
    total: dict[str, Tensor] | None = None
    for upload in uploads:
        if total is None:
            total = {key: value.to(torch.float64).clone() for key, value in upload.items()}
            continue
        if set(upload) != set(total):
            raise ValueError(f"secure_sum: uploads have different keys, {sorted(total)} vs {sorted(upload)}")
        for key, value in upload.items():
            if value.shape != total[key].shape:
                raise ValueError(
                    f"secure_sum: {key!r} has shape {tuple(value.shape)}, expected {tuple(total[key].shape)}"
                )
            total[key] += value.to(device=total[key].device, dtype=torch.float64)
    if total is None:
        raise ValueError("secure_sum: no uploads")
    return total
