"""Hydra config groups of clbench (a package so Hydra finds them when clbench is installed)."""
