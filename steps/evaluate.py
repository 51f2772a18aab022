"""Entry point ``evaluate``: score one training run's model on the unseen test set, register it, promote.

Parameters (an empty value keeps ``conf/``): ``run_id`` (required: a train child run with a
model, or a train parent run, whose ``best_run_id`` is then followed), ``threshold``,
``data_dir``, ``experiment``.

Writes, in experiment ``eval/<experiment>``, one run with:

- metrics ``test_accuracy``, ``precision``, ``recall``, ``f1``, ``roc_auc`` (defect is the
  positive class, cut-off 0.5 on the defect probability);
- tags ``source_run_id``, ``registered_model``, ``registered_version``, ``promoted`` (``true`` when
  ``prod`` now points at this version);
- artifacts ``metrics.json`` (with the confusion matrix), ``confusion_matrix.png``,
  ``roc_pr_curves.png``, ``misclassified.png`` (the most confidently wrong test images) and the
  test manifest, also logged as the run's dataset input with its digest.

In the registry: a new version of ``Production_Reg`` when test accuracy >= ``threshold``, else of
``Testing_Reg``, tagged ``acc`` (the test accuracy, as a string), ``test_digest``,
``source_run_id`` and ``eval_run_id``. Then the alias ``prod`` of ``Production_Reg`` is pointed at
the version with the highest ``acc`` (a tie keeps the current holder).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence

import mlflow
import numpy as np

from steps import cli, contract, plots
from steps.config import Config, RegistryConfig
from steps.data import load_images, manifest, scan_split
from steps.prepare import ensure_data
from steps.tracking import PipelineError, alias_version, get_run, log_config, log_dataset, stage_run

logger = logging.getLogger(__name__)


# --- Pure rules --------------------------------------------------------------------------


def score(y_true: np.ndarray, prob: np.ndarray, cutoff: float = 0.5) -> tuple[dict[str, float], list[list[int]]]:
    """Metrics with the defect class (label 1) as positive, and the confusion matrix [true][predicted]."""
    from sklearn import metrics

    y_pred = (prob >= cutoff).astype(int)
    result = {
        contract.METRIC_TEST_ACCURACY: float(metrics.accuracy_score(y_true, y_pred)),
        contract.METRIC_PRECISION: float(metrics.precision_score(y_true, y_pred, zero_division=0)),
        contract.METRIC_RECALL: float(metrics.recall_score(y_true, y_pred, zero_division=0)),
        contract.METRIC_F1: float(metrics.f1_score(y_true, y_pred, zero_division=0)),
    }
    if len(set(y_true.tolist())) == 2:  # ROC-AUC is undefined with one class
        result[contract.METRIC_ROC_AUC] = float(metrics.roc_auc_score(y_true, prob))
    return result, metrics.confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist()


def choose_registry(accuracy: float, threshold: float, registry: RegistryConfig) -> str:
    """Production at or above the threshold, testing below it."""
    return registry.production if accuracy >= threshold else registry.testing


def parse_acc(value: str | None) -> float | None:
    """A version's ``acc`` tag as a number, or None when it is missing or not a finite number."""
    try:
        acc = float(value) if value is not None else None
    except ValueError:
        return None
    return acc if acc is not None and math.isfinite(acc) else None


def pick_champion(versions: Sequence[tuple[str, str | None]], current: str | None) -> str | None:
    """The version with the highest ``acc``; a tie keeps ``current``, else the earliest version.

    ``versions`` holds ``(version, acc tag)``; versions without a usable ``acc`` never win.
    """
    scored = [(v, a) for v, a in ((v, parse_acc(a)) for v, a in versions) if a is not None]
    if not scored:
        return None
    best = max(a for _, a in scored)
    tied = [v for v, a in scored if a == best]
    return current if current in tied else min(tied, key=int)


# --- MLflow edge -------------------------------------------------------------------------


def resolve_model_run(run_id: str) -> str:
    """The run whose model to score: the run itself, or a train parent's ``best_run_id``."""
    run = get_run(run_id)
    best = run.data.tags.get(contract.TAG_BEST_RUN_ID)
    if best:
        logger.info("run %s is a train parent run; scoring its best run %s", run_id, best)
        get_run(best)
        return best
    return run_id


def load_model_info(run_id: str):
    uri = f"runs:/{run_id}/{contract.MODEL_ARTIFACT}"
    try:
        return mlflow.models.get_model_info(uri)
    except Exception:  # MLflow raises several types for "no such model"
        raise PipelineError(
            f"run {run_id!r} has no logged model '{contract.MODEL_ARTIFACT}'; pass a train run: the "
            "train parent run or its best_run_id tag (run `mlflow run . -e train` first)"
        ) from None


def promote(client: mlflow.MlflowClient, registry: RegistryConfig) -> str | None:
    """Point the alias at the production version with the highest ``acc``; return that version."""
    # Versions as strings: MLflow returns them as int from some calls and str from others.
    versions = client.search_model_versions(f"name = '{registry.production}'")
    current = alias_version(registry.production, registry.alias)
    champion = pick_champion([(str(v.version), v.tags.get(contract.VERSION_TAG_ACC)) for v in versions], current)
    if champion is not None and champion != current:
        client.set_registered_model_alias(registry.production, registry.alias, champion)
        logger.info("%s@%s: version %s -> %s", registry.production, registry.alias, current, champion)
    return champion


def log_figures(
    images: np.ndarray, y: np.ndarray, prob: np.ndarray, confusion: list[list[int]], classes: Sequence[str]
) -> None:
    """The confusion matrix, ROC and precision-recall curves, and the worst mistakes, as PNGs."""
    figures = {contract.CONFUSION_ARTIFACT: plots.confusion(confusion, classes)}
    if len(set(y.tolist())) == 2:  # curves need both classes
        figures[contract.CURVES_ARTIFACT] = plots.curves(y, prob)
    mistakes = plots.misclassified(images, y, prob, classes)
    if mistakes is not None:
        figures[contract.MISCLASSIFIED_ARTIFACT] = mistakes
    for name, fig in figures.items():
        mlflow.log_figure(fig, name)
        plots.close(fig)


def evaluate(config: Config, run_id: str) -> str:
    """Score, register and promote; return the eval run's ID."""
    if not run_id:
        raise PipelineError("evaluate needs -P run_id=<train run ID>; run `mlflow run . -e train` first")
    model_run_id = resolve_model_run(run_id)
    info = load_model_info(model_run_id)
    image_size = int(info.metadata["image_size"])
    classes = config.data.classes
    data_dir = ensure_data(config)
    samples = scan_split(data_dir, "test", classes)

    with stage_run(contract.STAGE_EVAL, config.experiment) as run:
        eval_run_id = run.info.run_id
        mlflow.set_tag(contract.TAG_SOURCE_RUN_ID, model_run_id)
        log_config(config)
        test_digest = log_dataset(manifest(samples, "test", data_dir), "test", data_dir, context="testing")

        logger.info("scoring run %s on %d test images", model_run_id, len(samples))
        model = mlflow.keras.load_model(info.model_uri)
        x = load_images([s.path for s in samples], image_size)
        prob = model.predict(x, batch_size=config.evaluate.batch_size, verbose=0).reshape(-1)
        y = np.array([s.label for s in samples])
        result, confusion = score(y, prob)
        mlflow.log_metrics(result)
        report = {**result, "confusion_matrix": confusion, "classes": list(classes), "n_test": len(samples)}
        mlflow.log_dict(report, contract.METRICS_ARTIFACT)
        log_figures(x, y, prob, confusion, classes)
        accuracy = result[contract.METRIC_TEST_ACCURACY]

        name = choose_registry(accuracy, config.evaluate.threshold, config.registry)
        version = mlflow.register_model(
            info.model_uri,
            name,
            tags={
                contract.VERSION_TAG_ACC: repr(accuracy),  # repr: float(tag) == the metric, exactly
                contract.VERSION_TAG_TEST_DIGEST: test_digest,
                contract.VERSION_TAG_SOURCE_RUN_ID: model_run_id,
                contract.VERSION_TAG_EVAL_RUN_ID: eval_run_id,
            },
        )
        registered = str(version.version)
        mlflow.set_tags({contract.TAG_REGISTERED_MODEL: name, contract.TAG_REGISTERED_VERSION: registered})
        if name == config.registry.production:
            champion = promote(mlflow.MlflowClient(), config.registry)
            promoted = champion == registered
        else:
            # Version numbers restart per registered model: Testing_Reg v1 is not Production_Reg v1.
            champion = alias_version(config.registry.production, config.registry.alias)
            promoted = False
        mlflow.set_tag(contract.TAG_PROMOTED, str(promoted).lower())

    prod = f"{config.registry.production}@{config.registry.alias}"
    where = f"now {prod}" if promoted else f"{prod} stays on version {champion}" if champion else f"no {prod} yet"
    threshold = config.evaluate.threshold
    print(f"test accuracy {accuracy:.4f} (threshold {threshold}) -> {name} version {registered}; {where}")
    print(json.dumps(result))
    return eval_run_id


OVERRIDES = {"threshold": "evaluate.threshold", "data_dir": "data.dir", "experiment": "experiment"}

if __name__ == "__main__":
    cli.main(
        evaluate,
        "Score a training run's model on the test set, register it and promote it.",
        OVERRIDES,
        own=("run_id",),
    )
