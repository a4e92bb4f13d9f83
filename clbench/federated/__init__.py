"""Continual federated learning: FOT's building blocks (Federated Orthogonal Training, Bakman et al., ICLR
2024; see /work/shared/methods/fot.md), engine-agnostic, and the in-process loop that uses them.

Modules:

* :mod:`~clbench.federated.partition` — one task's samples split over K clients: IID, FOT's 2-shard
  non-IID split, per-class Dirichlet(α).
* :mod:`clbench.subspace.gpse` (the subspace core's, re-exported) — GPSE: the client's residual sketch
  Y_k = (A_k − U Uᵀ A_k) G_k and ratio,
  the server's basis extension from Σ_k Y_k; FedProject of the aggregated update.
* :mod:`~clbench.federated.secure_sum` — pairwise additive masking, so the server sees only the sum.
* :mod:`~clbench.federated.comm` — bytes per round (FedAvg = FOT) and per GPSE exchange.
* :mod:`~clbench.federated.messages`, :mod:`~clbench.federated.client`, :mod:`~clbench.federated.loop` — the
  in-process federated continual loop (imported on use: it needs the engine): the messages it moves, a client's
  local training and report, the server's rounds. The methods' server steps are strategy code
  (``strategies/fedavg.py``, ``strategies/fot.py``).

The linear algebra (energy rule, basis extension, projection) is :mod:`clbench.subspace`'s.
"""

from clbench.federated.comm import Traffic, gpse_traffic, round_traffic, tensor_bytes
from clbench.federated.partition import dirichlet_partition, iid_partition, partition, shard_partition
from clbench.federated.secure_sum import PairwiseMasking, secure_sum
from clbench.subspace.gpse import (
    GPSEConfig,
    LayerSketch,
    ResidualSketcher,
    client_sketch,
    effective_threshold,
    expand_basis,
    mean_ratio,
    pack_sketches,
    project_update,
    sketch_shapes,
    sum_sketches,
    unpack_sketches,
)

__all__ = [
    "GPSEConfig",
    "LayerSketch",
    "PairwiseMasking",
    "ResidualSketcher",
    "Traffic",
    "client_sketch",
    "dirichlet_partition",
    "effective_threshold",
    "expand_basis",
    "gpse_traffic",
    "iid_partition",
    "mean_ratio",
    "pack_sketches",
    "partition",
    "project_update",
    "round_traffic",
    "secure_sum",
    "shard_partition",
    "sketch_shapes",
    "sum_sketches",
    "tensor_bytes",
    "unpack_sketches",
]
