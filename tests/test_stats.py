"""Paired intervals against hand computations and published t tables."""

from __future__ import annotations

import math

import pytest

from lavender.stats import mean_std, paired_difference, t_cdf, t_quantile


@pytest.mark.parametrize("df, q", [(1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157), (30, 2.042272)])
def test_t_quantile_matches_tables(df: int, q: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-5)
    assert t_cdf(q, df) == pytest.approx(0.975, abs=1e-7)
    assert t_cdf(0.0, df) == pytest.approx(0.5)


def test_paired_difference_by_hand() -> None:
    arm, base = [0.50, 0.60, 0.55, 0.70, 0.65], [0.40, 0.45, 0.50, 0.55, 0.50]
    # differences 0.10, 0.15, 0.05, 0.15, 0.15: mean 0.12; deviations -0.02, 0.03, -0.07, 0.03, 0.03
    d = paired_difference(arm, base)
    sd = math.sqrt((0.02**2 + 3 * 0.03**2 + 0.07**2) / 4)
    half = 2.776445 * sd / math.sqrt(5)
    assert d["mean"] == pytest.approx(0.12)
    assert d["std"] == pytest.approx(sd)
    assert d["ci95"] == pytest.approx([0.12 - half, 0.12 + half], abs=1e-6)
    assert d["n"] == 5 and d["per_seed"] == pytest.approx([0.10, 0.15, 0.05, 0.15, 0.15])


def test_one_seed_is_no_evidence_and_pairs_must_match() -> None:
    assert paired_difference([0.6], [0.5])["ci95"] == [-math.inf, math.inf]
    with pytest.raises(ValueError, match="pair them by seed"):
        paired_difference([0.1, 0.2], [0.1])
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "per_seed": [1.0, 3.0]}
