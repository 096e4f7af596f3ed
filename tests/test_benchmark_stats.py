"""The statistics behind the quality study's claims (benchmarks/stats.py): t quantiles and Welch intervals."""

import math

import pytest

from benchmarks.stats import mean_sd, t_quantile, welch_ci


@pytest.mark.parametrize(("dof", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (1000, 1.9623)])
def test_t_quantile_matches_the_table(dof, expected):
    assert t_quantile(0.975, dof) == pytest.approx(expected, abs=2e-4)


def test_welch_interval_by_hand():
    a, b = [80.0, 90.0, 70.0], [60.0, 65.0, 70.0]  # variances 100 and 25
    diff, low, high = welch_ci(a, b)
    se2 = 100 / 3 + 25 / 3
    dof = se2**2 / ((100 / 3) ** 2 / 2 + (25 / 3) ** 2 / 2)  # 2.94…
    half = t_quantile(0.975, dof) * math.sqrt(se2)
    assert diff == 15.0 and (low, high) == pytest.approx((15 - half, 15 + half))
    assert low < 0 < high  # 15 points apart, yet within three seeds' spread
    assert welch_ci([1.0, 2.0], [1.0]) is None  # one seed a side: no interval
    assert welch_ci([5.0, 5.0], [3.0, 3.0]) == (2.0, 2.0, 2.0)
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
