"""Forgetting metrics on hand-made accuracy matrices (DESIGN.md definitions, GPM Eq. 10)."""

import numpy as np
import pytest

from clbench import metrics

R = np.array([
    [90.0, 10.0, 12.0],
    [80.0, 95.0, 20.0],
    [70.0, 85.0, 99.0],
])
b = np.array([11.0, 9.0, 10.0])


def test_acc_is_mean_of_last_row():
    assert metrics.acc(R) == pytest.approx((70 + 85 + 99) / 3)


def test_bwt_eq10():
    # (R[2,0]-R[0,0] + R[2,1]-R[1,1]) / 2 = (-20 - 10) / 2
    assert metrics.bwt(R) == pytest.approx(-15.0)


def test_fwt_against_initial_model():
    # (R[0,1]-b1 + R[1,2]-b2) / 2 = (1 + 10) / 2
    assert metrics.fwt(R, b) == pytest.approx(5.5)


def test_forgetting_max_minus_last():
    # task 0: max(90, 80) - 70 = 20; task 1: max(10, 95) - 85 = 10
    assert metrics.forgetting(R) == pytest.approx(15.0)


def test_forgetting_uses_the_best_earlier_row_not_the_diagonal():
    R2 = np.array([[50.0, 0.0, 0.0], [80.0, 90.0, 0.0], [60.0, 90.0, 90.0]])
    assert metrics.forgetting(R2) == pytest.approx((20 + 0) / 2)
    assert metrics.bwt(R2) == pytest.approx((10 + 0) / 2)


def test_per_experience_scores():
    assert metrics.acc_seen(R, 1) == pytest.approx((80 + 95) / 2)
    assert metrics.bwt_seen(R, 1) == pytest.approx(-10.0)
    assert metrics.bwt_seen(R, 0) == 0.0


def test_single_task_is_defined():
    one = np.array([[42.0]])
    assert metrics.summary(one, np.array([10.0])) == {"acc": 42.0, "bwt": 0.0, "fwt": 0.0, "forgetting": 0.0}


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="T × T"):
        metrics.acc(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="initial accuracies"):
        metrics.fwt(R, np.zeros(2))
