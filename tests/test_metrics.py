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


def test_forgetting_ignores_rows_from_before_the_task_was_trained():
    """Chaudhry et al. 2018's f_j = max_{l ∈ [j, T−2]} R[l, j] − R[T−1, j]: task 1 scored 70 before it was trained
    (row 0: transfer from task 0, not accuracy it once had) and 60 right after, 55 at the end, so f_1 = 5, not
    70 − 55 = 15 (the max over every earlier row, the old formula, gives (10 + 15) / 2 = 12.5)."""
    R3 = np.array([[90.0, 70.0, 10.0], [85.0, 60.0, 20.0], [80.0, 55.0, 95.0]])
    assert metrics.forgetting(R3) == pytest.approx((10 + 5) / 2)
    # an untrained task at chance-level 100 % (a 1-class head) is no accuracy it had: f_1 = 40 − 40 = 0
    R4 = np.array([[90.0, 100.0, 10.0], [88.0, 40.0, 30.0], [86.0, 40.0, 95.0]])
    assert metrics.forgetting(R4) == pytest.approx((4 + 0) / 2)
    # forgetting ≥ −BWT, equal when no task rose after it was trained
    assert metrics.forgetting(R3) == pytest.approx(-metrics.bwt(R3))
    assert metrics.forgetting(R) >= -metrics.bwt(R)


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


def test_evaluate_accumulates_in_float64_and_keeps_chosen_scores_per_sample():
    """The mean of values float32 cannot tell apart (1e8 + k) is exact; PerSample keeps the chosen score's values
    with their groups, in batch order."""
    import torch

    values = torch.tensor([1e8 + 1, 1e8 + 2, 1e8 + 4], dtype=torch.float64)
    batches = [{"v": values[:2], "group": torch.tensor([0, 1])}, {"v": values[2:], "group": torch.tensor([1])}]
    kept = metrics.PerSample(("v",))
    out = metrics.evaluate(lambda b: {"v": b["v"], "w": b["v"]}, batches, torch.device("cpu"), groups=("a", "b"),
                           kept=kept)
    assert out["v"] == (3e8 + 7) / 3 and out["v.b"] == 1e8 + 3 and out["v.a"] == 1e8 + 1
    lines = kept.lines(after=2, test_experience=1, group_names=("a", "b"))
    assert lines == ["v,2,1,a,100000001", "v,2,1,b,100000002", "v,2,1,b,100000004"]
    text = "\n".join([metrics.PER_SAMPLE_HEADER, *lines])
    assert metrics.per_sample_values(text, "v", 2, ["b"]).tolist() == [1e8 + 2, 1e8 + 4]
    assert metrics.per_sample_values(text, "v", None, ["a", "b"]).size == 3
    assert metrics.per_sample_values(text, "w", 2, ["a"]).size == 0  # not kept
    comma = metrics.PerSample(("v",))
    comma.add({"v": values[:1]}, torch.tensor([0]))
    quoted = "\n".join([metrics.PER_SAMPLE_HEADER, *comma.lines(0, 0, ("a, b",))])
    assert metrics.per_sample_values(quoted, "v", 0, ["a, b"]).tolist() == [1e8 + 1]  # a group name with a comma


def test_forget_quality_is_the_ks_test_p_value():
    """Identical samples: 1; fully separated samples of 5 and 5: 2 / C(10, 5); invariant under x → 1/x (TOFU's code
    inverts the truth ratio); refuses an empty side."""
    import math

    a = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert metrics.forget_quality(a, a) == 1.0
    assert metrics.forget_quality(a, a + 1) == pytest.approx(2 / math.comb(10, 5), rel=1e-9)
    b = np.array([0.15, 0.45, 0.9, 1.1, 2.0, 0.05])
    assert metrics.forget_quality(1 / a, 1 / b) == pytest.approx(metrics.forget_quality(a, b), rel=1e-12)
    assert 0.0 < metrics.forget_quality(a, b) < 1.0
    with pytest.raises(ValueError, match="samples on both sides"):
        metrics.forget_quality(a, np.array([]))
