"""Paired comparisons over seeds: mean ± std per arm and the paired difference with a 95 % t-interval.

The project's evidence rule: two methods are compared on the SAME seeds (same data order, same
initialisation), and the claim is the mean of the per-seed differences with its Student-t interval
over n − 1 degrees of freedom. The t quantile is computed here (regularised incomplete beta by
continued fraction, then bisection) so that no SciPy is needed; it matches published tables to
1e-6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_std(values: Sequence[float]) -> dict[str, float | list[float]]:
    """``{"mean", "std" (sample, n − 1), "per_seed"}``; std is 0 for a single value."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_std: no values")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "per_seed": xs}


def paired_difference(arm: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> dict:
    """Mean of ``arm[i] − baseline[i]`` over paired seeds with its two-sided t-interval (n − 1 df).

    Returns ``{"mean", "ci95": [lo, hi], "n", "std", "per_seed"}``; with n = 1 the interval is
    unbounded (``[-inf, inf]``): one seed is no evidence.
    """
    if len(arm) != len(baseline):
        raise ValueError(f"paired_difference: {len(arm)} vs {len(baseline)} values; pair them by seed")
    diffs = [float(a) - float(b) for a, b in zip(arm, baseline)]
    s = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        half = math.inf
    else:
        half = t_quantile(0.5 + level / 2, n - 1) * s["std"] / math.sqrt(n)
    return {"mean": s["mean"], "ci95": [s["mean"] - half, s["mean"] + half], "n": n, "std": s["std"],
            "per_seed": diffs}
