"""Reward-model metrics with hand-computed expectations."""

from __future__ import annotations

import math

import pytest

from pipeline.core.reward_stats import mean_std, pair_metrics, pearson, ranks, spearman


def test_ranks_average_ties():
    assert ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]


def test_spearman_hand_computed():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = [1,2,3,4], y = [1,3,2,4]: d^2 = [0,1,1,0] -> 1 - 6*2/(4*15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_pair_metrics_hand_computed():
    m = pair_metrics([2.0, 1.0, 0.0], [1.0, 1.5, -1.0], [3, 5, 4], [6, 2, 1])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["margin"] == pytest.approx((1.0 - 0.5 + 1.0) / 3)
    assert m["chosen_mean"] == pytest.approx(1.0) and m["chosen_std"] == pytest.approx(math.sqrt(2 / 3))
    assert m["rejected_mean"] == pytest.approx(0.5)
    mean, std = mean_std([2.0, 1.0, 0.0, 1.0, 1.5, -1.0])
    assert (m["reward_mean"], m["reward_std"]) == (pytest.approx(mean), pytest.approx(std))
    # rewards [2,1,0,1,1.5,-1] ranks [6,3.5,2,3.5,5,1]; lengths [3,5,4,6,2,1] ranks [3,5,4,6,2,1]
    assert m["length_spearman"] == pytest.approx(pearson([6, 3.5, 2, 3.5, 5, 1], [3, 5, 4, 6, 2, 1]))
    assert m["pairs"] == 3


def test_ties_are_not_correct_and_empty_is_an_error():
    assert pair_metrics([1.0], [1.0], [1], [1])["accuracy"] == 0.0
    with pytest.raises(ValueError):
        pair_metrics([], [], [], [])
