"""95% confidence intervals for evaluation scores, computed with scipy: Wilson's interval for a share of
examples answered right, and a seeded percentile bootstrap over examples for a mean F1 and for the
paired difference between two models scored on the same examples (a margin)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000  # bootstrap resamples; seeded, so a re-run gives the same interval


def wilson(correct: int, total: int) -> tuple[float, float]:
    """Wilson's 95% interval for `correct` of `total`; (0, 1) when nothing was scored."""
    from scipy.stats import binomtest

    if total == 0:
        return (0.0, 1.0)
    found = binomtest(correct, total).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return (round(float(found.low), 4), round(float(found.high), 4))


def bootstrap_mean(values: Sequence[float]) -> tuple[float, float]:
    """A percentile-bootstrap 95% interval of the mean of per-example values (resampling examples)."""
    from scipy.stats import bootstrap

    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return (float("nan"), float("nan"))
    if array.size == 1 or np.all(array == array[0]):  # every resample has the same mean
        return (round(float(array[0]), 4), round(float(array[0]), 4))
    found = bootstrap(
        (array,),
        np.mean,
        confidence_level=CONFIDENCE,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(0),
    ).confidence_interval
    return (round(float(found.low), 4), round(float(found.high), 4))


def score_interval(values: Sequence[float]) -> tuple[float, float]:
    """The interval of a metric's mean: Wilson where each example scores 0 or 1, else the bootstrap."""
    array = np.asarray(values, dtype=float)
    if np.isin(array, (0.0, 1.0)).all():
        return wilson(int(array.sum()), int(array.size))
    return bootstrap_mean(array)


def paired_margin(first: Sequence[float], second: Sequence[float]) -> tuple[float, float, float]:
    """(mean of first - second, its 95% interval) for two models' per-example scores on the same examples."""
    difference = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    low, high = bootstrap_mean(difference)
    return (round(float(difference.mean()), 4), low, high)
