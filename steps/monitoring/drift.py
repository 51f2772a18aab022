"""Does a batch of images look like the ones the model was validated on? One verdict per batch.

Each feature of the reference profile (``steps.monitoring.profile``) is compared with the batch's by
the two-sample Kolmogorov-Smirnov test (scipy), whose p-value takes both sample sizes into account;
the family of tests is corrected by Holm's step-down method, so a batch drawn like the reference
raises an alert with probability at most ``alpha`` in all, not ``alpha`` per feature. A batch of
fewer than ``min_images`` usable images is not judged. Pure computation: infer and monitor log it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

OK, ALERT, TOO_FEW, UNAVAILABLE = "ok", "alert", "too_few", "unavailable"
VERDICTS = (OK, ALERT, TOO_FEW, UNAVAILABLE)
ALPHA = 0.05
# Below this a batch is not judged: the test could only see a shift of most of the distribution.
MIN_IMAGES = 20


@dataclass(frozen=True)
class FeatureTest:
    feature: str
    statistic: float  # the KS distance: the largest gap between the two cumulative distributions
    p_value: float
    p_holm: float  # adjusted for the family: alert where it is below alpha

    def alert(self, alpha: float) -> bool:
        return self.p_holm < alpha


@dataclass(frozen=True)
class DriftReport:
    verdict: str
    n_images: int
    alpha: float
    tests: tuple[FeatureTest, ...] = ()
    not_checked: tuple[str, ...] = ()  # reference features the batch could not give (an export's scores)
    reason: str = ""  # why there is no verdict (too_few, unavailable)

    @property
    def alerts(self) -> list[FeatureTest]:
        return sorted((t for t in self.tests if t.alert(self.alpha)), key=lambda t: t.p_holm)

    def summary(self) -> str:
        """One line for the log."""
        if self.verdict in (TOO_FEW, UNAVAILABLE):
            return f"drift {self.verdict}: {self.reason}"
        head = f"drift {self.verdict} over {self.n_images} images, {len(self.tests)} features at alpha {self.alpha:g}"
        if self.alerts:
            shown = ", ".join(f"{t.feature} (KS {t.statistic:.2f}, p {t.p_holm:.1g})" for t in self.alerts[:5])
            head += f": {shown}" + (f" and {len(self.alerts) - 5} more" if len(self.alerts) > 5 else "")
        if self.not_checked:
            head += f"; not checked: {', '.join(self.not_checked)}"
        return head

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: the batch size, the number of features in alert, and each feature's KS distance
        and Holm-adjusted p-value."""
        out = {"drift_n_images": float(self.n_images), "drift_n_alerts": float(len(self.alerts))}
        for t in self.tests:
            out[f"drift_ks_{t.feature}"] = t.statistic
            out[f"drift_p_{t.feature}"] = t.p_holm
        return out


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment: the family-wise error is at most alpha under any dependence."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def check(
    reference: Mapping[str, np.ndarray],
    batch: Mapping[str, np.ndarray],
    alpha: float = ALPHA,
    min_images: int = MIN_IMAGES,
) -> DriftReport:
    """Compare each feature the batch has with the reference (``batch``: one array per feature, one
    value per usable image)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: expected a number in (0, 1), got {alpha!r}")
    features = [name for name in reference if name in batch]
    not_checked = tuple(name for name in reference if name not in batch)
    n = len(next(iter(batch.values()))) if batch else 0
    if not features:
        return DriftReport(UNAVAILABLE, n, alpha, not_checked=not_checked, reason="no feature of the profile to check")
    if n < min_images:
        return DriftReport(
            TOO_FEW, n, alpha, not_checked=not_checked,
            reason=f"{n} usable images, fewer than the {min_images} needed to judge a batch",
        )  # fmt: skip
    raw = [stats.ks_2samp(reference[name], batch[name]) for name in features]
    adjusted = holm(np.array([float(r.pvalue) for r in raw]))
    tests = tuple(
        FeatureTest(name, float(r.statistic), float(r.pvalue), float(a))
        for name, r, a in zip(features, raw, adjusted, strict=True)
    )
    verdict = ALERT if any(t.alert(alpha) for t in tests) else OK
    return DriftReport(verdict, n, alpha, tests, not_checked)


def unavailable(reason: str) -> DriftReport:
    return DriftReport(UNAVAILABLE, 0, ALPHA, reason=reason)
