"""Per-image predictions kept, and the paired comparison with the version holding ``prod``.

``evaluate`` logs each test image's defect probability for the version it scores, as
``predictions/<test digest>.csv`` in its run, and points the version's tag ``predictions.<digest>``
at it. To compare a new model with the holder of ``prod`` image by image, it reads the holder's
predictions on the same test set back, or scores the holder there when it has none (and keeps
those too). The comparison counts the images the two classify alike and those only one gets right,
at the reference cut-off (where ``acc`` is measured), and gives the exact McNemar p-value
(``steps.network.statistics``).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from steps.core import contract
from steps.core.config import RegistryConfig
from steps.core.errors import first_line
from steps.datasets.data import Sample
from steps.mlflow_io.registry import alias_version
from steps.network.statistics import Paired, mcnemar
from steps.served import serving

logger = logging.getLogger(__name__)

FILE, LABEL = "file", "label"


def predictions_tag(digest: str) -> str:
    return f"{contract.VERSION_TAG_PREDICTIONS_PREFIX}{digest}"


def predictions_frame(samples: Sequence[Sample], y: np.ndarray, prob: np.ndarray, data_dir: Path) -> pd.DataFrame:
    """One row per test image: its file (relative to the data folder), label and defect probability."""
    files = [Path(s.path).resolve().relative_to(data_dir.resolve()).as_posix() for s in samples]
    return pd.DataFrame({FILE: files, LABEL: np.asarray(y, int), serving.DEFECT_PROBABILITY: np.asarray(prob, float)})


def log_predictions(frame: pd.DataFrame, digest: str, suffix: str = "") -> str:
    """Log ``frame`` in the active run as ``predictions/<digest><suffix>.csv``; its ``runs:/`` URI."""
    name = f"{contract.PREDICTIONS_DIR}/{digest}{suffix}.csv"
    mlflow.log_text(frame.to_csv(index=False), name)
    run = mlflow.active_run()
    assert run is not None, "predictions are logged in the evaluation's run"
    return f"runs:/{run.info.run_id}/{name}"


def read_predictions(uri: str, files: Sequence[str]) -> np.ndarray | None:
    """The probabilities an artifact holds for ``files``, in their order; None when it does not hold
    every one of them (another test set) or cannot be read."""
    try:
        text = mlflow.artifacts.load_text(uri)
        frame = pd.read_csv(io.StringIO(text)).set_index(FILE)
        return frame.loc[list(files), serving.DEFECT_PROBABILITY].to_numpy(dtype=float)
    except (KeyError, ValueError, OSError, mlflow.exceptions.MlflowException) as err:
        logger.info("predictions at %s not usable here: %s", uri, first_line(err))
        return None


def holder_predictions(
    client: mlflow.MlflowClient, reg: RegistryConfig, holder: str, digest: str, frame: pd.DataFrame, score
) -> np.ndarray | None:
    """The holder's defect probabilities on this test set, in ``frame``'s order: read back from its
    ``predictions.<digest>`` tag, else scored now by ``score(model_uri, image_size)`` and kept (this
    run's ``predictions/<digest>-v<holder>.csv``, tagged on the holder). None when it cannot be
    scored (registered by hand, or its files unreadable): the comparison is then left out."""
    version = client.get_model_version(reg.production, holder)
    tag = version.tags.get(predictions_tag(digest))
    if tag:
        found = read_predictions(tag, frame[FILE].tolist())
        if found is not None:
            return found
    if contract.VERSION_TAG_EVAL_RUN_ID not in version.tags:
        return None  # registered by hand: never scored by the pipeline, not scored here either
    uri = f"models:/{reg.production}/{holder}"
    try:
        size = int((mlflow.models.get_model_info(uri).metadata or {})[serving.IMAGE_SIZE])
        prob = score(uri, size)
    except Exception as err:  # noqa: BLE001 - the comparison is a record, not a gate on registration
        logger.warning("prod version %s could not be scored for the paired comparison: %s", holder, first_line(err))
        return None
    kept = frame.assign(**{serving.DEFECT_PROBABILITY: prob})
    client.set_model_version_tag(
        reg.production, holder, predictions_tag(digest), log_predictions(kept, digest, f"-v{holder}")
    )
    return prob


def compare_with_holder(
    client: mlflow.MlflowClient,
    reg: RegistryConfig,
    y: np.ndarray,
    score,
    digest: str,
    frame: pd.DataFrame,
    prob: np.ndarray,
) -> tuple[str, Paired] | None:
    """The new model against the version holding ``prod``, image by image on this test set; None when
    nothing holds ``prod`` or the holder cannot be scored (then said in the log)."""
    holder = alias_version(reg.production, reg.alias)
    if holder is None:
        return None
    holder_prob = holder_predictions(client, reg, holder, digest, frame, score)
    if holder_prob is None:
        logger.warning("no paired comparison with prod version %s: it cannot be scored on this test set", holder)
        return None
    result = compare(y, prob, holder_prob)
    logger.info(
        "against prod version %s on the same %d images: %d alike, right only here %d, only there %d; McNemar p %.3g",
        holder, result.n, result.agree, result.challenger_only, result.other_only, result.p_value,
    )  # fmt: skip
    return holder, result


def compare(y: np.ndarray, challenger: np.ndarray, holder: np.ndarray) -> Paired:
    """The paired comparison at the reference cut-off, where ``acc`` is measured."""
    cut = serving.REFERENCE_CUTOFF
    return mcnemar((challenger >= cut) == (y == 1), (holder >= cut) == (y == 1))


def paired_metrics(paired: Paired) -> dict[str, float]:
    return {
        contract.METRIC_PAIRED_AGREEMENT: paired.agreement,
        contract.METRIC_PAIRED_CHALLENGER_ONLY: paired.challenger_only,
        contract.METRIC_PAIRED_CHAMPION_ONLY: paired.other_only,
        contract.METRIC_PAIRED_P_VALUE: paired.p_value,
    }


def paired_tags(holder: str, paired: Paired) -> dict[str, str]:
    """The comparison as version tags of the new version (numbers as strings)."""
    return {contract.TAG_PAIRED_WITH: holder, **{key: repr(value) for key, value in paired_metrics(paired).items()}}
