"""The drift check around a scoring run: its collector and reference from the model (``watcher``), the
verdict and what the run records of it (``judge``: the tag ``drift``, the figures as metrics and JSON, the
histograms, one line in the log), and the stage's failure on an alert when asked (``enforce``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import mlflow
import numpy as np

from steps.core import contract
from steps.core.errors import DRIFT, PipelineError
from steps.mlflow_io.loading import load_profile
from steps.monitoring import drift
from steps.monitoring.collect import BatchFeatures
from steps.monitoring.profile import Profile
from steps.served.serving import DefectModel

logger = logging.getLogger(__name__)


class DriftAlert(PipelineError):
    """The images do not look like the model's validation images, and the stage was told to fail (drift=fail)."""

    failure = DRIFT


def watcher(model: DefectModel, uri: str, engine: str) -> tuple[BatchFeatures | None, Profile | None, str]:
    """``(collector, reference, "")`` for scoring ``uri`` with ``model``, or ``(None, None, why not)``."""
    if engine != "local":
        return None, None, f"engine {engine} scores on its workers; run infer with engine local to check drift"
    try:
        profile = load_profile(uri, mlflow.models.get_model_info(uri).flavors)
    except ValueError as err:
        return None, None, f"the reference profile of {uri} cannot be read ({err})"
    if profile is None:
        return None, None, f"{uri} was logged without a reference profile (trained before the drift check)"
    embed = None
    if model.runtime == "keras" and profile.embedding is not None:
        from steps.network.model import embedding_model

        network = embedding_model(model.network)
        batch_size = int(model.config.get("predict_batch_size", 64))

        def embed(images: np.ndarray) -> np.ndarray:
            return network.predict(images, batch_size=batch_size, verbose=0)

    return BatchFeatures(model.image_size, embed, profile.embedding), profile, ""


def log_drift(
    report: drift.DriftReport, reference: Mapping[str, np.ndarray] | None, batch: Mapping[str, np.ndarray], parts: str
) -> None:
    """Record the check on the active run, and say it in the log (a warning on an alert)."""
    from steps.network import plots

    mlflow.set_tags({contract.TAG_DRIFT: report.verdict, contract.TAG_DRIFT_PARTS: parts})
    if report.tests:
        mlflow.log_metrics(report.metrics())
    body = {
        "verdict": report.verdict,
        "n_images": report.n_images,
        "alpha": report.alpha,
        "compared": parts,
        "not_checked": list(report.not_checked),
        "reason": report.reason,
        "tests": [dataclasses.asdict(t) | {"alert": t.alert(report.alpha)} for t in report.tests],
    }
    mlflow.log_dict(body, contract.DRIFT_ARTIFACT)
    if report.tests and reference is not None:
        p_values = {t.feature: t.p_holm for t in report.tests}
        fig = plots.drift_histograms(reference, batch, p_values, report.alpha)
        mlflow.log_figure(fig, contract.DRIFT_FIGURE)
        plots.close(fig)
    (logger.warning if report.verdict == drift.ALERT else logger.info)("%s", report.summary())


def judge(collector: BatchFeatures | None, profile: Profile | None, why_not: str) -> drift.DriftReport:
    """The batch's verdict against the reference, recorded on the active run (``log_drift``)."""
    batch = collector.features() if collector else {}
    report = drift.check(profile.reference, batch) if profile else drift.unavailable(why_not)
    parts = ",".join(collector.parts if collector else [])
    log_drift(report, profile.reference if profile else None, batch, parts)
    return report


def enforce(report: drift.DriftReport, mode: str, written: str) -> None:
    """With ``mode`` fail, an alert fails the stage, after everything (``written``) is in place."""
    if mode == "fail" and report.verdict == drift.ALERT:
        raise DriftAlert(
            f"{report.summary()}; {written}; see {contract.DRIFT_FIGURE} in the run's artifacts "
            "(-P drift=report only reports)"
        )
