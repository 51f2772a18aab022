"""How sure a test figure is, and whether two models differ: intervals from the confusion counts and the
exact McNemar test on paired predictions. Pure functions.

Intervals are a bootstrap over the test images with a fixed seed. Resampling n images with
replacement draws the four cells of the confusion matrix (true negatives, false positives, false
negatives, true positives) from a multinomial with the observed shares, so the interval is computed
from the counts alone, and is the same for a BENCHMARKS.md row that kept only its counts as for an
evaluation that kept every prediction. Each figure's 95% interval is the 2.5th and 97.5th
percentiles of that figure over ``ROUNDS`` resamples.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from steps.core import contract

ROUNDS = 4000
SEED = 20261206
LEVEL = 0.95
# The figures an interval is given for (accuracy, balanced accuracy, precision, recall, F1).
FIGURES = (
    contract.METRIC_TEST_ACCURACY,
    contract.METRIC_BALANCED_ACCURACY,
    contract.METRIC_PRECISION,
    contract.METRIC_RECALL,
    contract.METRIC_F1,
)


def figures(tn, fp, fn, tp) -> dict[str, np.ndarray]:
    """Every figure of ``FIGURES`` from confusion counts (numbers or arrays of them); 0 where undefined."""
    tn, fp, fn, tp = (np.asarray(c, dtype=np.float64) for c in (tn, fp, fn, tp))
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        specificity = np.where(tn + fp > 0, tn / (tn + fp), 0.0)
        both = (tp + fn > 0) & (tn + fp > 0)
        balanced = np.where(both, (recall + specificity) / 2, np.where(tp + fn > 0, recall, specificity))
        return {
            contract.METRIC_TEST_ACCURACY: np.where(tn + fp + fn + tp > 0, (tp + tn) / (tn + fp + fn + tp), 0.0),
            contract.METRIC_BALANCED_ACCURACY: balanced,
            contract.METRIC_PRECISION: np.where(tp + fp > 0, tp / (tp + fp), 0.0),
            contract.METRIC_RECALL: recall,
            contract.METRIC_F1: np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
        }


def intervals(
    tn: int, fp: int, fn: int, tp: int, rounds: int = ROUNDS, seed: int = SEED
) -> dict[str, tuple[float, float]]:
    """The 95% bootstrap interval of every figure of ``FIGURES``, from the confusion counts."""
    n = tn + fp + fn + tp
    if n == 0:
        return {name: (0.0, 0.0) for name in FIGURES}
    draws = np.random.default_rng(seed).multinomial(n, np.array([tn, fp, fn, tp]) / n, size=rounds)
    tail = (1 - LEVEL) / 2 * 100
    return {
        name: (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
        for name, values in figures(*draws.T).items()
    }


def accuracy_interval(right: int, n: int) -> tuple[float, float]:
    """The 95% interval of an accuracy of ``right`` of ``n`` images (all a table kept of older rows)."""
    return intervals(right, n - right, 0, 0)[contract.METRIC_TEST_ACCURACY]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion of ``k`` in ``n``: sound at 0 and n too, where the
    normal approximation collapses to a point."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def interval_metrics(counts: tuple[int, int, int, int], prefix: str = "") -> dict[str, float]:
    """The intervals as MLflow metrics: ``<prefix><figure>_ci_low`` and ``_ci_high``."""
    return {
        f"{prefix}{name}{suffix}": value
        for name, (low, high) in intervals(*counts).items()
        for suffix, value in ((contract.CI_LOW_SUFFIX, low), (contract.CI_HIGH_SUFFIX, high))
    }


# --- A paired comparison ------------------------------------------------------------------


class Paired(NamedTuple):
    """Two models on the same images: how often they agree, the discordant counts, McNemar's p."""

    n: int
    agree: int  # images both classify correctly, or both wrongly
    challenger_only: int  # the challenger right, the other wrong
    other_only: int  # the other right, the challenger wrong
    p_value: float  # exact McNemar (two-sided binomial on the discordant pairs)

    @property
    def agreement(self) -> float:
        return self.agree / self.n if self.n else 1.0


def mcnemar(challenger_right: np.ndarray, other_right: np.ndarray) -> Paired:
    """The exact McNemar test of two models' correctness on the same images (in the same order)."""
    a, b = np.asarray(challenger_right, dtype=bool), np.asarray(other_right, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired predictions must be on the same images: {a.shape} and {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return Paired(len(a), len(a) - only_a - only_b, only_a, only_b, exact_p(only_a, only_b))


def exact_p(b: int, c: int) -> float:
    """Two-sided p of ``b`` against ``c`` discordant pairs under the null of equal chances."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def significant_win(paired: Paired, alpha: float = 0.05) -> bool:
    """The challenger is right on more images than the other, and not by chance at ``alpha``."""
    return paired.challenger_only > paired.other_only and paired.p_value < alpha
