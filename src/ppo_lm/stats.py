"""Small statistics for reporting results over seeds: a mean with its Student-t confidence interval."""

from __future__ import annotations

import math
from statistics import NormalDist

#: Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1..30 (standard tables).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: from the table up to 30 degrees of freedom, the normal quantile (1.960) beyond, where the
    two differ by under 2%."""
    if df < 1:
        raise ValueError("a confidence interval needs at least two values")
    return _T975[df - 1] if df <= len(_T975) else NormalDist().inv_cdf(0.975)


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its 95% confidence interval, ``mean +- t_{0.975, n-1} * s / sqrt(n)``
    with ``s`` the sample standard deviation (n - 1 in the denominator)."""
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    half = t_quantile_975(n - 1) * s / math.sqrt(n)
    return mean, mean - half, mean + half


def format_interval(values: list[float], digits: int = 3) -> str:
    """``+0.140 [+0.101, +0.179]`` (mean and 95% interval, signed)."""
    mean, lo, hi = mean_interval(values)
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
