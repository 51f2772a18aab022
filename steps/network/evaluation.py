"""Scoring a model on the test set: the test images decoded once per size (``TestSet``), the metrics at 0.5 and at
the model's own cut-off, the evaluation figures, and the exports' parity on every test image."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import mlflow
import numpy as np

from steps.core import contract
from steps.datasets.batches import image_batches
from steps.datasets.data import (
    DataError,
    Sample,
    load_images,
)
from steps.datasets.stored import Rows
from steps.mlflow_io import loading
from steps.mlflow_io.loading import load_keras
from steps.network import plots, statistics
from steps.network.scoring import score
from steps.served import serving

logger = logging.getLogger(__name__)


def report(y: np.ndarray, prob: np.ndarray, cutoff: float) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Metrics at 0.5 (the contract's names) and at the model's own cut-off (``tuned_``), each with its 95%
    interval (``<name>_ci_low``, ``<name>_ci_high``: ``steps.network.statistics``), and the confusion matrices."""
    at_half, confusion = score(y, prob)
    tuned, tuned_confusion = score(y, prob, cutoff)
    metrics = {**at_half, contract.METRIC_DECISION_THRESHOLD: cutoff}
    # ROC-AUC does not depend on the cut-off: once is enough.
    metrics.update({contract.TUNED_PREFIX + k: v for k, v in tuned.items() if k != contract.METRIC_ROC_AUC})
    metrics.update(statistics.interval_metrics(cells(confusion)))
    metrics.update(statistics.interval_metrics(cells(tuned_confusion), prefix=contract.TUNED_PREFIX))
    # Keyed by cut-off; one entry when the tuned cut-off is 0.5 itself.
    return metrics, {f"{c:.3f}": m for c, m in ((serving.REFERENCE_CUTOFF, confusion), (cutoff, tuned_confusion))}


def cells(confusion: list[list[int]]) -> tuple[int, int, int, int]:
    """``[[tn, fp], [fn, tp]]`` as ``(tn, fp, fn, tp)``."""
    (tn, fp), (fn, tp) = confusion
    return tn, fp, fn, tp


def caption(counts: tuple[int, int, int, int]) -> str:
    """Accuracy, precision and recall at one cut-off, each with its 95% interval, one per line."""
    found, spans = statistics.figures(*counts), statistics.intervals(*counts)
    names = {contract.METRIC_TEST_ACCURACY: "accuracy", contract.METRIC_PRECISION: "precision",
             contract.METRIC_RECALL: "recall"}  # fmt: skip
    return "\n".join(
        f"{label} {float(found[key]):.3f} [{spans[key][0]:.3f}, {spans[key][1]:.3f}]" for key, label in names.items()
    )


def log_figures(
    images: np.ndarray | Rows,
    y: np.ndarray,
    prob: np.ndarray,
    confusions: Mapping[str, list[list[int]]],
    cutoff: float,
    classes: Sequence[str],
) -> None:
    """The confusion matrices, ROC and precision-recall curves, and the worst mistakes, as PNGs."""
    captions = {cut: caption(cells(matrix)) for cut, matrix in confusions.items()}
    figures = {contract.CONFUSION_ARTIFACT: plots.confusion(confusions, classes, captions)}
    if len(set(y.tolist())) == 2:  # curves need both classes
        figures[contract.CURVES_ARTIFACT] = plots.curves(y, prob, cutoffs=sorted({serving.REFERENCE_CUTOFF, cutoff}))
    mistakes = plots.misclassified(images, y, prob, classes, cutoff=cutoff)
    if mistakes is not None:
        figures[contract.MISCLASSIFIED_ARTIFACT] = mistakes
    for name, fig in figures.items():
        mlflow.log_figure(fig, name)
        plots.close(fig)


def check_exports(
    info, model_uri: str, model_run_id: str, images: np.ndarray | Rows, prob: np.ndarray, cutoff: float
) -> dict[str, str]:
    """Score the model's ONNX and LiteRT exports on the test images against its Keras ``prob``
    (``steps.network.exports.check_parity``: a mismatch fails the stage), log each one's largest difference,
    and return the version tags that say where the exports are; none for a model logged without them."""
    artifacts = (info.flavors or {}).get("python_function", {}).get("artifacts", {})
    present = [runtime for runtime, key in serving.EXPORT_ARTIFACTS.items() if key in artifacts]
    if not present:
        logger.info("run %s's model has no ONNX or LiteRT export (train.exports none, or logged before)", model_run_id)
        return {}
    from steps.network import exports  # Keras and the converters: only a model with exports needs them

    started = time.perf_counter()
    paths = {
        runtime: loading.model_artifact(model_uri, serving.EXPORT_ARTIFACTS[runtime], "", info.flavors)
        for runtime in present
    }
    diffs = exports.check_parity(paths, images, prob, cutoff)
    mlflow.log_metrics({contract.export_diff_metric(runtime): diff for runtime, diff in diffs.items()})
    mlflow.log_metric(contract.METRIC_EXPORT_SECONDS, time.perf_counter() - started)
    files = {**{runtime: exports.FILES[runtime] for runtime in present}, "spec": exports.SPEC_FILE}
    return {
        contract.export_tag(kind): f"runs:/{model_run_id}/{contract.EXPORTS_ARTIFACT}/{name}"
        for kind, name in files.items()
    }


class TestSet:
    """The test images, decoded once per image size, and the models scored on them."""

    __test__ = False  # not a pytest class

    def __init__(
        self, samples: Sequence[Sample], batch_size: int, images: Mapping[int, Rows], cache: bool = False
    ) -> None:
        """``samples`` checked by ``load_split``; ``images`` what it decoded, by image size."""
        self.samples = samples
        self.cache = cache
        self.y = np.array([s.label for s in samples])
        self.batch_size = batch_size
        self._images = dict(images)

    def images(self, size: int) -> Rows:
        """The test images at ``size``, rows of the decoded file (read as they are used)."""
        if size not in self._images:
            images, failures = load_images([s.path for s in self.samples], size, cache=self.cache)
            if failures:  # they all decoded a moment ago: a file changed under us
                raise DataError(f"test images changed during evaluation: {sorted(failures.values())[0]}")
            self._images[size] = Rows(images)
        return self._images[size]

    def predict(self, model_uri: str, image_size: int) -> np.ndarray:
        model = load_keras(model_uri)
        return model.predict(image_batches(self.images(image_size), self.batch_size), verbose=0).reshape(-1)
