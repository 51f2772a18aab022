"""Entry point ``evaluate``: score one training run's model on the unseen test set, register it, promote.

Every test image is decoded and checked before any run is written, as ``train`` checks its own. The
model (a FINISHED train child run, or a train parent's ``best_run_id``) is scored at 0.5 and at its
own cut-off, its exports on every test image, and its files checked (``steps.served.provenance``);
then it is registered in ``Production_Reg`` (test accuracy >= ``threshold``) or ``Testing_Reg``, and
``prod`` is settled by the promotion rule (``steps.mlflow_io.registry``, docs/promotion.md).
Parameters: ``MLproject``. What the run and the version hold: docs/mlflow.md.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import mlflow

from steps.core import cli, contract, parameters
from steps.core.config import Config
from steps.core.errors import ModelError, PipelineError
from steps.datasets.data import (
    check_not_shared,
    class_balance,
    describe_balance,
    load_split,
    manifest,
    other_split,
    scan_split,
)
from steps.datasets.elpv import ensure_data
from steps.mlflow_io import cards, paired
from steps.mlflow_io.records import log_config, log_dataset, log_skipped
from steps.mlflow_io.registration import load_model_info, register_and_promote, rescore, resolve_model_run
from steps.mlflow_io.runs import name_run, stage_run
from steps.network import accelerator
from steps.network.evaluation import TestSet, check_exports, log_figures, report
from steps.served import provenance, serving

logger = logging.getLogger(__name__)


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
    image_size = int(metadata[serving.IMAGE_SIZE])
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
        export_tags = check_exports(info, model_uri, model_run_id, test.images(image_size), prob, cutoff)
        log_figures(test.images(image_size), test.y, prob, confusions, cutoff, classes)
        accuracy = metrics[contract.METRIC_TEST_ACCURACY]
        frame = paired.predictions_frame(test.samples, test.y, prob, data_dir)
        predictions_uri = paired.log_predictions(frame, test_digest)
        comparison = paired.compare_with_holder(client, reg, test.y, test.predict, test_digest, frame, prob)

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
                paired.predictions_tag(test_digest): predictions_uri,
                **export_tags,
                **(paired.paired_tags(*comparison) if comparison else {}),
            },
            eval_run_id=eval_run_id,
            rescore=functools.partial(rescore, client, reg, test, test_digest),
            verify=functools.partial(provenance.check_version, client, reg.production),
            paired=comparison,
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
        if comparison is not None:
            mlflow.set_tag(contract.TAG_PAIRED_WITH, comparison[0])
            mlflow.log_metrics(paired.paired_metrics(comparison[1]))
        name_run(
            f"evaluate {metadata.get('hparam_set', model_run_id[:8])} -> {outcome.registered_model} v{outcome.version}"
        )
        cards.describe(
            client,
            config,
            outcome,
            cards.Card(
                model_run_id=model_run_id,
                metadata=metadata,
                test_digest=test_digest,
                n_test=len(test.samples),
                metrics=metrics,
                paired=comparison,
                exports=sorted(export_tags),
            ),
        )
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
            contract.TAG_PAIRED_WITH: comparison[0] if comparison else None,
            **(paired.paired_metrics(comparison[1]) if comparison else {}),
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
