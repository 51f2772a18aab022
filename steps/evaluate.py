"""Entry point ``evaluate``: score one training run's model on the unseen test set, register it, promote.

Parameters (an empty value keeps ``conf/``): ``run_id`` (required: a FINISHED train child run
with a model, or a train parent run, whose ``best_run_id`` is then followed), ``threshold`` (the
floor for ``Production_Reg``), ``min_improvement`` (over the champion), ``data_dir``,
``skip_bad_images``, ``experiment``.

Before any run is written, every test image is decoded and checked as ``train`` checks its own
(unusable files fail the stage, or with ``skip_bad_images`` are left out and counted; an image also
in ``train`` or under both classes is refused). Writes, in experiment ``eval/<experiment>``, one run with:

- metrics ``test_accuracy``, ``balanced_accuracy``, ``precision``, ``recall``, ``f1``, ``roc_auc``
  (defect is the positive class, cut-off 0.5 on the defect probability), the same prefixed
  ``tuned_`` at the model's own ``decision_threshold`` (tuned on the validation split by train,
  logged as a metric too), and ``champion_test_accuracy`` (the prod version it was compared with,
  on this test set); ``n_skipped``, ``n_test_good`` and ``n_test_defect``; ``onnx_max_abs_diff``
  and ``litert_max_abs_diff``, each export's largest difference from the Keras model's defect
  probability on the test images (over 1e-4, or a class that differs, fails the stage before
  anything is registered), and ``export_seconds``, the time that check took;
- tags ``source_run_id``, ``registered_model``, ``registered_version``, ``promoted`` (``true`` when
  ``prod`` now points at this version), ``promotion_reason`` (the numbers compared),
  ``champion_version``, and ``champion_rescored`` when the champion had to be scored on this test set;
- artifacts ``metrics.json`` (every metric, both confusion matrices, the decision and its reason),
  ``confusion_matrix.png`` (at 0.5 and at the tuned threshold), ``roc_pr_curves.png``,
  ``misclassified.png`` (the most confidently wrong test images at the tuned threshold, where the
  model operates in ``infer``), ``skipped_images.csv`` when any were skipped, and the test manifest,
  also logged as the run's dataset input with its digest.

In the registry: a new version of ``Production_Reg`` when test accuracy >= ``threshold``, else of
``Testing_Reg``, tagged ``acc`` (the test accuracy at 0.5, as a string), ``test_digest``,
``acc.<test_digest>``, ``decision_threshold``, ``source_run_id``, ``eval_run_id`` and, where
the run has them, ``export_onnx``, ``export_litert`` and ``export_spec`` (``runs:/`` URIs of the
exports and their preprocessing spec). Then, in
``Production_Reg`` only, ``steps.mlflow_io.registry.settle`` applies the promotion rule: scores are compared
on this test set only (a champion scored on another one is scored on this one first), a tie keeps
the champion, a challenger must gain at least ``min_improvement``; the alias is re-read and
re-decided until stable, and every move is recorded in the registry's history.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np

from steps.core import cli, contract, parameters
from steps.core.config import Config, RegistryConfig
from steps.core.errors import ModelError, PipelineError
from steps.datasets.data import (
    DataError,
    Sample,
    check_not_shared,
    class_balance,
    describe_balance,
    load_images,
    load_split,
    manifest,
    other_split,
    scan_split,
)
from steps.datasets.elpv import ensure_data
from steps.mlflow_io import registry
from steps.mlflow_io.records import log_config, log_dataset, log_skipped
from steps.mlflow_io.registry import alias_version, load_keras, pipeline_model_problem
from steps.mlflow_io.runs import get_run, stage_run
from steps.mlflow_io.tracking import first_line
from steps.network import accelerator, plots
from steps.network.scoring import score
from steps.served import provenance, serving

logger = logging.getLogger(__name__)

RUN_ID = re.compile(r"[0-9a-f]{32}")


# --- Pure rules --------------------------------------------------------------------------


def choose_registry(accuracy: float, threshold: float, registry: RegistryConfig) -> str:
    """Production at or above the threshold, testing below it."""
    return registry.production if accuracy >= threshold else registry.testing


def report(y: np.ndarray, prob: np.ndarray, cutoff: float) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Metrics at 0.5 (the contract's names) and at the model's own cut-off (``tuned_``), and the confusion matrices."""
    at_half, confusion = score(y, prob)
    tuned, tuned_confusion = score(y, prob, cutoff)
    metrics = {**at_half, contract.METRIC_DECISION_THRESHOLD: cutoff}
    # ROC-AUC does not depend on the cut-off: once is enough.
    metrics.update({contract.TUNED_PREFIX + k: v for k, v in tuned.items() if k != contract.METRIC_ROC_AUC})
    # Keyed by cut-off; one entry when the tuned cut-off is 0.5 itself.
    return metrics, {f"{c:.3f}": m for c, m in ((0.5, confusion), (cutoff, tuned_confusion))}


# --- MLflow edge -------------------------------------------------------------------------


def resolve_model_run(run_id: str) -> str:
    """The run whose model to score: the run itself, or a train parent's ``best_run_id``; finished only."""
    if not RUN_ID.fullmatch(run_id):
        raise PipelineError(f"parameter run_id: expected a 32-character MLflow run ID (0-9, a-f), got {run_id!r}")
    run = get_run(run_id)
    best = run.data.tags.get(contract.TAG_BEST_RUN_ID)
    if best:
        logger.info("run %s is a train parent run; scoring its best run %s", run_id, best)
        run = get_run(best)
    if run.info.status != "FINISHED":
        # A killed or failed training may have left a model file behind; it was never chosen.
        raise PipelineError(
            f"run {run.info.run_id} is {run.info.status}, not FINISHED: only a finished train run is "
            "evaluated; rerun `mlflow run . -e train`"
        )
    # best_run_id is a tag anyone can set: only this store's train runs are registered.
    experiment = mlflow.MlflowClient().get_experiment(run.info.experiment_id).name
    if not experiment.startswith(contract.experiment_name(contract.STAGE_TRAIN, "")):
        raise PipelineError(
            f"run {run.info.run_id} is in experiment {experiment!r}, not a train/ experiment: only models "
            "trained by `mlflow run . -e train` are evaluated and registered"
        )
    return run.info.run_id


def load_model_info(run_id: str):
    uri = f"runs:/{run_id}/{contract.MODEL_ARTIFACT}"
    try:
        info = mlflow.models.get_model_info(uri)
    except Exception:  # MLflow raises several types for "no such model"
        raise PipelineError(
            f"run {run_id!r} has no logged model '{contract.MODEL_ARTIFACT}'; pass a train run: the "
            "train parent run or its best_run_id tag (run `mlflow run . -e train` first)"
        ) from None
    problem = pipeline_model_problem(info)
    if problem:
        raise ModelError(f"run {run_id}'s model is not one train logged: {problem}; it is not registered")
    return info


def log_figures(
    images: np.ndarray,
    y: np.ndarray,
    prob: np.ndarray,
    confusions: Mapping[str, list[list[int]]],
    cutoff: float,
    classes: Sequence[str],
) -> None:
    """The confusion matrices, ROC and precision-recall curves, and the worst mistakes, as PNGs."""
    figures = {contract.CONFUSION_ARTIFACT: plots.confusion(confusions, classes)}
    if len(set(y.tolist())) == 2:  # curves need both classes
        figures[contract.CURVES_ARTIFACT] = plots.curves(y, prob, cutoffs=sorted({0.5, cutoff}))
    mistakes = plots.misclassified(images, y, prob, classes, cutoff=cutoff)
    if mistakes is not None:
        figures[contract.MISCLASSIFIED_ARTIFACT] = mistakes
    for name, fig in figures.items():
        mlflow.log_figure(fig, name)
        plots.close(fig)


def check_exports(
    info, model_uri: str, model_run_id: str, images: np.ndarray, prob: np.ndarray, cutoff: float, batch_size: int
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
        runtime: registry.model_artifact(model_uri, serving.EXPORT_ARTIFACTS[runtime], "", info.flavors)
        for runtime in present
    }
    diffs = exports.check_parity(paths, images, prob, cutoff, batch_size)
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
        self, samples: Sequence[Sample], batch_size: int, images: Mapping[int, np.ndarray], cache: bool = False
    ) -> None:
        """``samples`` checked by ``load_split``; ``images`` what it decoded, by image size."""
        self.samples = samples
        self.cache = cache
        self.y = np.array([s.label for s in samples])
        self.batch_size = batch_size
        self._images = dict(images)

    def images(self, size: int) -> np.ndarray:
        if size not in self._images:
            images, failures = load_images([s.path for s in self.samples], size, cache=self.cache)
            if failures:  # they all decoded a moment ago: a file changed under us
                raise DataError(f"test images changed during evaluation: {sorted(failures.values())[0]}")
            self._images[size] = images
        return self._images[size]

    def predict(self, model_uri: str, image_size: int) -> np.ndarray:
        model = load_keras(model_uri)
        return model.predict(self.images(image_size), batch_size=self.batch_size, verbose=0).reshape(-1)


@dataclass(frozen=True)
class Outcome:
    """Where the model went and what happened to ``prod``."""

    registered_model: str
    version: str
    promoted: bool
    reason: str
    champion: str | None  # the prod version the model was compared with (the holder, unless promoted)
    champion_acc: float | None  # its accuracy on this test set


def rescore(client: mlflow.MlflowClient, reg: RegistryConfig, test: TestSet, digest: str, version: str) -> float | None:
    """Score a production version on this test set and record it.

    None (and a warning) when the version was registered by hand (no ``eval_run_id``) or its
    ``MLmodel`` does not have the pipeline's layout: it can never be scored, and counts as
    unscored. A version whose files cannot be read (missing, no permission, the store or its
    artifacts did not answer) fails the stage with ``prod`` untouched, naming the way out: a
    champion must not lose ``prod`` because its files were moved or a download failed once.
    """
    uri = f"models:/{reg.production}/{version}"
    before = client.get_model_version(reg.production, version).tags
    prod = f"{reg.production}@{reg.alias}"
    way_out = (
        f"{prod} left on version {version}; restore its files (or rerun when the store answers), or move "
        f"{reg.alias} to another version: mlflow run . -e promote -P version=<N> -P reason=..."
    )
    try:
        if contract.VERSION_TAG_EVAL_RUN_ID not in before:  # registered by hand, not by evaluate
            raise ModelError(f"registered by hand (no {contract.VERSION_TAG_EVAL_RUN_ID} tag)")
        info = mlflow.models.get_model_info(uri)
        problem = pipeline_model_problem(info)
        if problem is None:
            size = int((info.metadata or {})["image_size"])  # checked by pipeline_model_problem
            acc = score(test.y, test.predict(uri, size))[0][contract.METRIC_TEST_ACCURACY]
    except ModelError as err:  # refused by load_keras: it never will load
        problem = str(err)
    except Exception as err:  # noqa: BLE001 - missing files, permissions, a store that did not answer
        raise ModelError(
            f"cannot read prod version {version} to score it on this test set ({type(err).__name__}: "
            f"{first_line(err)}); {way_out}"
        ) from None
    if problem is not None:
        logger.warning(
            "prod version %s cannot be scored on this test set (%s); it counts as unscored", version, problem
        )
        mlflow.set_tag(
            contract.TAG_CHAMPION_RESCORED, f"version {version}: not a model of this pipeline ({problem})"[:500]
        )
        return None
    registry.record_score(client, reg.production, version, acc, digest)
    was = f"{before.get(contract.VERSION_TAG_ACC)} on test set {before.get(contract.VERSION_TAG_TEST_DIGEST)}"
    mlflow.set_tag(contract.TAG_CHAMPION_RESCORED, f"version {version}: acc {acc!r} on test set {digest} (was {was})")
    logger.info("prod version %s scores %.4f on this test set (was %s)", version, acc, was)
    return acc


def register_and_promote(
    client: mlflow.MlflowClient,
    config: Config,
    model_uri: str,
    accuracy: float,
    digest: str,
    tags: Mapping[str, str],
    *,
    eval_run_id: str | None = None,
    rescore: Callable[[str], float | None] | None = None,
    verify: Callable[[str], object] | None = None,
    before_write: Callable[[], None] | None = None,
) -> Outcome:
    """Register by the threshold, then settle ``prod`` by the promotion rule (steps.mlflow_io.registry), unless
    ``evaluate.promote`` is false: then the version is tagged ``prod_ineligible`` and ``prod`` stays;
    ``verify`` checks the files of any other version before ``prod`` moves to it (this one's were
    checked before it was registered)."""
    reg = config.registry
    name = choose_registry(accuracy, config.evaluate.threshold, reg)
    version_tags = {
        contract.VERSION_TAG_ACC: repr(accuracy),  # repr: float(tag) == the metric, exactly
        contract.VERSION_TAG_TEST_DIGEST: digest,
        registry.score_tag(digest): repr(accuracy),
        **tags,
    }
    if not config.evaluate.promote:
        version_tags[contract.VERSION_TAG_INELIGIBLE] = (
            f"registered by eval run {eval_run_id} with evaluate.promote false"
        )
    version = str(mlflow.register_model(model_uri, name, tags=version_tags).version)
    if name == reg.production and not config.evaluate.promote:
        holder = alias_version(reg.production, reg.alias)
        reason = (
            f"evaluate.promote is false: version {version} (acc {accuracy:.4f}) is registered and marked "
            f"{contract.VERSION_TAG_INELIGIBLE}; {reg.alias} is left {f'on version {holder}' if holder else 'unset'}"
        )
        return Outcome(name, version, False, reason, holder, None)
    if name != reg.production:
        # Version numbers restart per registered model: Testing_Reg v1 is not Production_Reg v1.
        reason = (
            f"test accuracy {accuracy:.4f} is below the threshold {config.evaluate.threshold}: registered in "
            f"{name}, which never holds {reg.alias}"
        )
        return Outcome(name, version, False, reason, alias_version(reg.production, reg.alias), None)

    settled = registry.settle(
        client,
        reg,
        digest,
        config.evaluate.min_improvement,
        run_id=eval_run_id,
        rescore=rescore,
        verify=None if verify is None else (lambda other: other == version or verify(other)),
        before_write=before_write,
    )
    scored = {v.version: v for v in settled.versions}
    promoted = settled.holder == version
    # Promoted: compared with the holder before us. Not: with the holder that kept prod.
    champion = settled.start if promoted else settled.holder
    other = None if champion is None else scored.get(champion, registry.Scored(champion, None))
    _, reason = registry.judge(scored[version], other, config.evaluate.min_improvement)
    return Outcome(name, version, promoted, reason, champion, other.acc if other else None)


def evaluate(config: Config, run_id: str) -> str:
    """Score, register and promote; return the eval run's ID."""
    if not run_id:
        raise PipelineError("evaluate needs -P run_id=<train run ID>; run `mlflow run . -e train` first")
    model_run_id = resolve_model_run(run_id)
    info = load_model_info(model_run_id)
    # The run's own model, not the URI its MLmodel claims: its author wrote that file.
    model_uri = f"runs:/{model_run_id}/{contract.MODEL_ARTIFACT}"
    try:
        code_digest = provenance.verify(model_uri)
    except ModelError as err:
        raise ModelError(f"run {model_run_id}'s model is refused, nothing was registered: {err}") from None
    logger.info("%s", accelerator.describe())
    metadata = info.metadata or {}
    image_size = int(metadata["image_size"])
    cutoff = serving.threshold_of(metadata)
    classes = config.data.classes
    data_dir = ensure_data(config)
    samples = scan_split(data_dir, "test", classes)
    images, samples, skipped = load_split(
        samples, image_size, "test", config.data.skip_bad_images, cache=config.data.cache
    )
    check_not_shared({**other_split(data_dir, "train", classes), "test": samples})
    test = TestSet(samples, config.evaluate.batch_size, {image_size: images}, cache=config.data.cache)
    balance = class_balance(samples, "test")
    logger.info("class balance: test %s", describe_balance(balance, "test"))
    client = mlflow.MlflowClient()
    reg = config.registry

    with stage_run(contract.STAGE_EVAL, config.experiment) as run:
        eval_run_id = run.info.run_id
        mlflow.set_tag(contract.TAG_SOURCE_RUN_ID, model_run_id)
        log_config(config)
        log_skipped(skipped, data_dir)
        mlflow.log_metrics(balance)
        test_digest = log_dataset(manifest(test.samples, "test", data_dir), "test", data_dir, context="testing")

        logger.info("scoring run %s on %d test images (test set %s)", model_run_id, len(test.samples), test_digest)
        prob = test.predict(model_uri, image_size)
        metrics, confusions = report(test.y, prob, cutoff)
        mlflow.log_metrics(metrics)
        export_tags = check_exports(
            info, model_uri, model_run_id, test.images(image_size), prob, cutoff, test.batch_size
        )
        log_figures(test.images(image_size), test.y, prob, confusions, cutoff, classes)
        accuracy = metrics[contract.METRIC_TEST_ACCURACY]

        outcome = register_and_promote(
            client,
            config,
            model_uri,
            accuracy,
            test_digest,
            {
                contract.VERSION_TAG_SOURCE_RUN_ID: model_run_id,
                contract.VERSION_TAG_EVAL_RUN_ID: eval_run_id,
                contract.VERSION_TAG_DECISION_THRESHOLD: repr(cutoff),
                contract.VERSION_TAG_CODE_SHA256: code_digest,
                **export_tags,
            },
            eval_run_id=eval_run_id,
            rescore=functools.partial(rescore, client, reg, test, test_digest),
            verify=functools.partial(provenance.check_version, client, reg.production),
        )
        mlflow.set_tags(
            {
                contract.TAG_REGISTERED_MODEL: outcome.registered_model,
                contract.TAG_REGISTERED_VERSION: outcome.version,
                contract.TAG_PROMOTED: str(outcome.promoted).lower(),
                contract.TAG_PROMOTION_REASON: outcome.reason,
                contract.TAG_CHAMPION_VERSION: outcome.champion or "",
            }
        )
        if outcome.champion_acc is not None:
            mlflow.log_metric(contract.METRIC_CHAMPION_TEST_ACCURACY, outcome.champion_acc)
        everything: dict[str, Any] = {
            **metrics,
            contract.METRICS_JSON_CONFUSION: confusions,
            contract.METRICS_JSON_CLASSES: list(classes),
            contract.METRICS_JSON_N_TEST: len(test.samples),
            contract.VERSION_TAG_TEST_DIGEST: test_digest,
            contract.TAG_REGISTERED_MODEL: outcome.registered_model,
            contract.TAG_REGISTERED_VERSION: outcome.version,
            contract.TAG_PROMOTED: outcome.promoted,
            contract.TAG_PROMOTION_REASON: outcome.reason,
            contract.TAG_CHAMPION_VERSION: outcome.champion,
            contract.METRIC_CHAMPION_TEST_ACCURACY: outcome.champion_acc,
        }
        mlflow.log_dict(everything, contract.METRICS_ARTIFACT)

    prod = f"{reg.production}@{reg.alias}"
    holder = outcome.champion
    where = f"now {prod}" if outcome.promoted else f"{prod} stays on version {holder}" if holder else f"no {prod} yet"
    threshold = config.evaluate.threshold
    registered = f"{outcome.registered_model} version {outcome.version}"
    print(f"test accuracy {accuracy:.4f} (threshold {threshold}) -> {registered}; {where}")
    print(f"{'promoted' if outcome.promoted else 'not promoted'}: {outcome.reason}")
    print(json.dumps(metrics))
    return eval_run_id


OVERRIDES = parameters.overrides("evaluate")

if __name__ == "__main__":
    cli.main(
        evaluate,
        "Score a training run's model on the test set, register it and promote it.",
        OVERRIDES,
        own=parameters.own("evaluate"),
    )
