"""Metrics over samples: Dist-n, 95% Wilson intervals of rates, means with their standard error,
and the report's convention of storing a value beside its interval (`key`, `key + "_ci"`)."""

from __future__ import annotations

import math

import torch

Z95 = 1.959964  # two-sided 95% normal quantile


def distinct_n(texts: list[str], n: int) -> float:
    """Dist-n (Li et al., 2016): distinct n-grams / total n-grams over all texts (whitespace words).

    0.0 when the texts hold no n-gram.
    """
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate k / n ((nan, nan) for n = 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"need 0 ≤ k ≤ n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value of a paired comparison of two success rates: `only_a`
    pairs where only A succeeded, `only_b` where only B did (a binomial test of the discordant
    pairs at 1/2; 1.0 when there are none)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"need counts ≥ 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def mean_interval(x, z: float = Z95) -> tuple[float, float, float]:
    """(mean, lower, upper): mean ± z·se of a 1-D sample (bounds nan for fewer than 2 values)."""
    m, se = mean_and_se(torch.as_tensor(x, dtype=torch.float64).flatten())
    return m, m - z * se, m + z * se


def mean_and_se(x: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of a 1-D sample (se nan for fewer than two values)."""
    x = x.double()
    n = x.numel()
    if n == 0:
        return float("nan"), float("nan")
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), se


def put_rate(m: dict, key: str, flags: list[bool]) -> None:
    """m[key] = share of True, m[key + "_ci"] = its 95% Wilson interval."""
    n, k = len(flags), sum(bool(f) for f in flags)
    m[key] = k / n if n else float("nan")
    m[key + "_ci"] = list(wilson_interval(k, n))


def put_mean(m: dict, key: str, values: list[float]) -> None:
    """m[key] = mean, m[key + "_ci"] = mean ± 1.96·se."""
    if not values:
        m[key], m[key + "_ci"] = float("nan"), [float("nan"), float("nan")]
        return
    mean, lo, hi = mean_interval(values)
    m[key], m[key + "_ci"] = mean, [lo, hi]
