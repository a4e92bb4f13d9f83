"""Models: multi-head routing, and which layers the projection family may protect (gpm.md §6.7)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from clbench.models.mlp import MLP


def test_single_head_protects_every_layer_including_the_shared_head():
    m = MLP((784,), [100, 100], (10,) * 10, multi_head=False, n_classes=10)
    assert list(m.protected_layers()) == ["hidden.0", "hidden.1", "head"]
    assert all(p.ndim == 2 for p in m.parameters())  # GPM's nets have no biases


def test_multi_head_never_protects_heads():
    m = MLP((64,), [100, 100], (2,) * 5, multi_head=True, n_classes=10)
    names = set(m.protected_layers())
    assert names == {"hidden.0", "hidden.1"}
    assert not names & m.head_names()


def test_mixed_task_batch_routes_each_sample_to_its_head():
    torch.manual_seed(0)
    m = MLP((8,), [16], (2, 3), multi_head=True, n_classes=5)
    x = torch.randn(6, 8)
    t = torch.tensor([0, 1, 0, 1, 1, 0])
    y = torch.tensor([1, 2, 0, 0, 1, 1])
    h = m.features(x)
    expected = sum(F.cross_entropy(m.heads[int(ti)](h[i:i + 1]), y[i:i + 1]) for i, ti in enumerate(t)) / 6
    torch.testing.assert_close(m.loss((x, y, t)), expected)
    pred = m.predict((x, y, t))
    for i, ti in enumerate(t):
        assert pred[i] == m.heads[int(ti)](h[i:i + 1]).argmax()
