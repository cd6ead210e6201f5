"""Metrics from summable counts, checked by hand."""

import numpy as np
import pytest

from common.evaluation import EvalCounts, majority_baseline, metrics


def test_metrics_by_hand():
    # true 0: 2 right, 1 wrong; true 1: 3 right.  F1(0) = 4/5, F1(1) = 6/7.
    result = metrics(EvalCounts(3.0, np.array([[2, 1], [0, 3]])))
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert result["macro_f1"] == pytest.approx((4 / 5 + 6 / 7) / 2)
    assert result["loss"] == pytest.approx(0.5) and result["examples"] == 6


def test_counts_add_up_across_sites():
    a, b = EvalCounts(1.0, np.array([[1, 0], [0, 1]])), EvalCounts(2.0, np.array([[0, 1], [1, 0]]))
    total = a + b
    assert total.loss_sum == 3.0 and total.examples == 4 and metrics(total)["accuracy"] == 0.5


def test_majority_baseline_and_classes_never_seen():
    labels = np.array([2, 2, 2, 0])
    baseline = majority_baseline(labels, 3)
    assert baseline["accuracy"] == 0.75
    # class 1 is neither present nor predicted: it does not count towards macro-F1
    assert baseline["macro_f1"] == pytest.approx((0 + 2 * 3 / 7) / 2)
    assert np.isnan(metrics(EvalCounts.zeros(3))["accuracy"])
