"""The subspace core: device-agnostic linear algebra for orthogonal-subspace / gradient-projection methods.

No knowledge of strategies, configs or tracking. Modules:

* :mod:`~clbench.subspace.inputs` — representation matrices of layer inputs (conv inputs unfolded), hooks.
* :mod:`~clbench.subspace.basis` — energy-threshold bases (GPM Eq. 5, Eqs. 8-9), union, complement.
* :mod:`~clbench.subspace.projection` — projection of gradients onto span(M)^⊥ (GPM Eqs. 6-7).
* :mod:`~clbench.subspace.angles` — principal angles between subspaces; aligned principal vectors (ROGO).
* :mod:`~clbench.subspace.hebbian` — the Hebbian route to a basis: Oja's subspace rule with frozen old rows (HLOP).
* :mod:`~clbench.subspace.overlap` — overlap of row spaces, the soft orthogonality penalties (O-LoRA, O3).
* :mod:`~clbench.subspace.gpse` — GPSE: residual sketches and their server-side basis extension (FOT).
* :mod:`~clbench.subspace.reference` — per-tensor bases of reference gradients and the projection off them (OGPSA).
"""

from clbench.subspace.angles import principal_angles, split_by_alignment
from clbench.subspace.basis import (
    basis_union,
    energy_rank,
    extend_basis,
    orthonormal_complement,
    threshold_basis,
    top_singular,
)
from clbench.subspace.hebbian import HebbianSubspace, hebbian_extend
from clbench.subspace.inputs import collect_layer_inputs, layer_input_matrix, unsupported_layers
from clbench.subspace.overlap import LayerOverlap, row_overlap
from clbench.subspace.projection import LayerProjector, project_out
from clbench.subspace.reference import project_gradients, reference_basis

__all__ = [
    "HebbianSubspace",
    "LayerOverlap",
    "LayerProjector",
    "basis_union",
    "collect_layer_inputs",
    "energy_rank",
    "extend_basis",
    "hebbian_extend",
    "layer_input_matrix",
    "orthonormal_complement",
    "principal_angles",
    "project_gradients",
    "project_out",
    "reference_basis",
    "row_overlap",
    "split_by_alignment",
    "threshold_basis",
    "top_singular",
    "unsupported_layers",
]
