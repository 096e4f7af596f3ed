"""Small statistics for the benchmarks' tables (no dependency beyond numpy): mean ± std over seeds, and the
difference of two means with its Welch t confidence interval."""

from __future__ import annotations

import math
import statistics


def mean_sd(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def welch_ci(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """mean(a) − mean(b) with its Welch t confidence interval; None with fewer than 2 values a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.mean(a) - statistics.mean(b)
    if va + vb == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, dof) * math.sqrt(va + vb)
    return diff, diff - half, diff + half


def t_quantile(p: float, dof: float) -> float:
    """Student's t quantile for p > 0.5 (any real dof): bisection on the CDF, integrated numerically."""
    import numpy as np

    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 20_001)
        pdf = np.exp(log_c - (dof + 1) / 2 * np.log1p(grid**2 / dof))
        return 0.5 + float(np.sum((pdf[1:] + pdf[:-1]) / 2) * (grid[1] - grid[0]))

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2
