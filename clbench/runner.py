"""Where a run starts: in this process (:func:`clbench.experiment.run`) or, for a federated run with
``federated.engine=flower``, on Flower (:func:`clbench.flower.launch.launch`), whose ServerApp calls
:func:`~clbench.experiment.run` again with its SuperNodes as clients. Above both, so neither imports the other."""

from __future__ import annotations

from clbench.config import RunConfig
from clbench.experiment import RunResult, run
from strategies import is_federated


def execute(cfg: RunConfig) -> RunResult:
    """Run ``cfg`` where its config says."""
    if is_federated(cfg.strategy.name) and cfg.federated.engine == "flower":
        from clbench.flower.launch import launch

        return launch(cfg)
    return run(cfg)
