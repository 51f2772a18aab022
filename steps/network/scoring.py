"""Pure scoring: metrics at a cut-off on the defect probability, and the cut-off tuned on validation for
the operating point the line chooses (``operating_point``).

Defect (label 1) is the positive class throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from steps.core import contract

# What the decision threshold can be tuned for (conf/pipeline.yaml: train.threshold_objective): the
# best of a figure, or a target the line sets: "min_recall:0.95" (catch at least 95% of defects: the
# highest precision that keeps validation recall at 0.95 or more), "min_precision:0.9" (at least 90%
# of the flagged parts are defects: the highest recall there) or "max_false_alarm:0.1" (flag at most
# 10% of good parts for re-inspection: the highest recall there).
OBJECTIVES = ("accuracy", "balanced_accuracy", "f1")
TARGETS = ("min_recall", "min_precision", "max_false_alarm")


def parse_target(spec: str) -> tuple[str, float] | None:
    """``("min_recall", 0.95)`` for ``"min_recall:0.95"``; None for one of ``OBJECTIVES``; a
    ``ValueError`` saying what is accepted for anything else."""
    if spec in OBJECTIVES:
        return None
    name, _, value = spec.partition(":")
    try:
        target = float(value)
    except ValueError:
        target = -1.0
    if name not in TARGETS or not 0 < target <= 1:
        raise ValueError(
            f"expected one of {', '.join(OBJECTIVES)}, or min_recall:R, min_precision:P or max_false_alarm:F "
            f"with R, P, F in (0, 1], got {spec!r}"
        )
    return name, target


def _counts(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[int, int, int, int]:
    """(true negatives, false positives, false negatives, true positives)."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    tp = int(np.sum((y_true == 1) & (y_pred == 1)))
    tn = int(np.sum((y_true == 0) & (y_pred == 0)))
    fp = int(np.sum((y_true == 0) & (y_pred == 1)))
    fn = int(np.sum((y_true == 1) & (y_pred == 0)))
    return tn, fp, fn, tp


def objective(y_true: np.ndarray, y_pred: np.ndarray, name: str) -> float:
    """Accuracy, balanced accuracy (mean of defect recall and good recall) or F1 of defect."""
    tn, fp, fn, tp = _counts(y_true, y_pred)
    if name == "accuracy":
        return (tp + tn) / max(tp + tn + fp + fn, 1)
    if name == "balanced_accuracy":
        rates = [tp / (tp + fn)] if tp + fn else []
        rates += [tn / (tn + fp)] if tn + fp else []
        return float(np.mean(rates)) if rates else 0.0
    if name == "f1":
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")


def keras_loss_and_accuracy(y_true: np.ndarray, prob: np.ndarray, label_smoothing: float) -> tuple[float, float]:
    """What Keras's ``evaluate`` reports for a sigmoid output trained with ``BinaryCrossentropy``
    and the "accuracy" metric, from predictions already made: no second pass over the data.

    The loss clips probabilities to [1e-7, 1 - 1e-7] (Keras's epsilon) and smooths the labels
    towards 0.5; accuracy counts ``prob > 0.5`` as defect, as ``binary_accuracy`` does. Exactly
    Keras's figures for a mean over views; for a bare sigmoid Keras uses the logits, the same figure
    unless a probability is saturated (0 or 1 in float32) on the wrong label.
    """
    y = np.asarray(y_true, dtype=np.float64)
    # Clipped in float32, as the model's output is: 1 - 1e-7 rounds to 1 - 1.19e-7 there.
    eps = np.float32(1e-7)
    p = np.clip(np.asarray(prob, dtype=np.float32), eps, np.float32(1) - eps).astype(np.float64)
    target = y * (1 - label_smoothing) + 0.5 * label_smoothing
    loss = -np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))
    return float(loss), float(np.mean((p > 0.5) == (y == 1)))


def score(y_true: np.ndarray, prob: np.ndarray, cutoff: float = 0.5) -> tuple[dict[str, float], list[list[int]]]:
    """Metrics at ``cutoff`` and the confusion matrix [true][predicted] (0 good, 1 defect)."""
    from sklearn import metrics

    y_pred = (prob >= cutoff).astype(int)
    tn, fp, fn, tp = _counts(y_true, y_pred)
    result = {
        contract.METRIC_TEST_ACCURACY: objective(y_true, y_pred, "accuracy"),
        contract.METRIC_BALANCED_ACCURACY: objective(y_true, y_pred, "balanced_accuracy"),
        contract.METRIC_PRECISION: tp / (tp + fp) if tp + fp else 0.0,
        contract.METRIC_RECALL: tp / (tp + fn) if tp + fn else 0.0,
        contract.METRIC_F1: objective(y_true, y_pred, "f1"),
    }
    if len(set(np.asarray(y_true).tolist())) == 2:  # ROC-AUC is undefined with one class
        result[contract.METRIC_ROC_AUC] = float(metrics.roc_auc_score(y_true, prob))
    return result, [[tn, fp], [fn, tp]]


@dataclass(frozen=True)
class OperatingPoint:
    """A cut-off and why: the objective it was tuned for, whether a target was met on validation, and
    validation precision and recall at it."""

    cutoff: float
    objective: str
    met: bool
    precision: float
    recall: float


def operating_point(y_true: np.ndarray, prob: np.ndarray, spec: str) -> OperatingPoint:
    """The cut-off for ``spec`` (an objective of ``OBJECTIVES`` or a target of ``TARGETS``) on these
    validation labels. A target no cut-off meets keeps the closest one (``met`` false): for
    ``min_precision``, the highest precision reached; for ``max_false_alarm``, the fewest good parts
    flagged."""
    y_true, prob = np.asarray(y_true).astype(int), np.asarray(prob, dtype=np.float64).reshape(-1)
    target = parse_target(spec)
    if target is None:
        cutoff = tune_threshold(y_true, prob, spec)
        met = True
    else:
        name, goal = target
        distinct = np.unique(prob)
        # Every distinct split, and one below them all (everything defect): recall 1 is always reachable.
        candidates = np.concatenate([[0.5], (distinct[:-1] + distinct[1:]) / 2, distinct[:1] - 1e-9])
        # (precision, recall, 1 - false-alarm rate) at each cut-off; the target is on one, the trade on another.
        rates = np.array([_rates(y_true, prob >= t) for t in candidates])
        reach, trade, bound = {"min_recall": (1, 0, goal), "min_precision": (0, 1, goal),
                               "max_false_alarm": (2, 1, 1 - goal)}[name]  # fmt: skip
        feasible = rates[:, reach] >= bound - 1e-12
        met = bool(feasible.any())
        pool = np.flatnonzero(feasible) if met else np.arange(len(candidates))
        key = (
            (lambda i: (rates[i, trade], rates[i, reach], -abs(candidates[i] - 0.5)))
            if met
            else (lambda i: (rates[i, reach], rates[i, trade], -abs(candidates[i] - 0.5)))
        )
        cutoff = float(candidates[max(pool, key=key)])
    precision, recall, _ = _rates(y_true, prob >= cutoff)
    return OperatingPoint(cutoff, spec, met, precision, recall)


def _rates(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall and specificity (1 - the share of good parts flagged)."""
    tn, fp, fn, tp = _counts(y_true, y_pred)
    return (
        (tp / (tp + fp) if tp + fp else 0.0),
        (tp / (tp + fn) if tp + fn else 0.0),
        (tn / (tn + fp) if tn + fp else 1.0),
    )


def tune_threshold(y_true: np.ndarray, prob: np.ndarray, name: str) -> float:
    """The cut-off on the defect probability that maximises ``name`` on these (validation) labels.

    Candidates are 0.5 and the midpoints between neighbouring distinct probabilities (a cut-off
    between two scores, not on one, so it does not hinge on a single image); ties go to the one
    nearest 0.5. With one class present nothing can be tuned and 0.5 is returned.
    """
    y_true, prob = np.asarray(y_true).astype(int), np.asarray(prob, dtype=np.float64).reshape(-1)
    objective(y_true[:0], y_true[:0], name)  # reject an unknown name before anything else
    if len(set(y_true.tolist())) < 2:
        return 0.5
    distinct = np.unique(prob)
    candidates = np.concatenate([[0.5], (distinct[:-1] + distinct[1:]) / 2])
    best = max(candidates, key=lambda t: (objective(y_true, prob >= t, name), -abs(t - 0.5)))
    return float(best)
