"""Shared test set-up: one torch thread (other load on 2-core machines makes more threads collapse)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh directory, so MLflow stores and checkpoints land in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
