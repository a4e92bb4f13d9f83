"""Federated runs on Flower (``federated.engine=flower``): clbench's server as a ServerApp and its clients as
ClientApps (:mod:`clbench.flower.app`), and the launcher that starts a local federation or submits to a named one
(:mod:`clbench.flower.launch`). Above the continual loop (:mod:`clbench.experiment`), which they run."""
