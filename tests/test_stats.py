"""The interval every published gain is reported with, by hand."""

import pytest

from ppo_lm.stats import format_interval, mean_interval, t_quantile_975


def test_mean_interval_by_hand():
    # [1, 2, 3]: mean 2, s = sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1, half-width t_{0.975,2} * 1 / sqrt(3) = 4.303 / 1.7321
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.303 / 3 ** 0.5) and mean - lo == pytest.approx(4.303 / 3 ** 0.5)
    assert format_interval([0.1, 0.2, 0.3]) == "+0.200 [-0.048, +0.448]"


def test_t_quantiles():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(5) == 2.571 and t_quantile_975(30) == 2.042
    assert t_quantile_975(100) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile_975(0)
