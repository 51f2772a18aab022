"""Entry point ``train``: fit each selected hyperparameter set in a nested run and tag the parent with the best.

Every training image is decoded and checked before any run is written (``steps.datasets.data``); a
seeded, stratified validation split is kept out of ``<data_dir>/train``, and ``test`` is only hashed,
to refuse images shared with it. Each set is trained and logged by ``steps.network.training.fit_one``;
the best is the highest validation accuracy, ties to the lower validation loss. Parameters:
``MLproject``. What the runs hold: docs/mlflow.md. Interrupted, its runs end KILLED; nothing is
registered here (``evaluate`` registers, and only from a FINISHED run).
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import tensorflow as tf

from steps.core import cli, contract, parameters
from steps.core.config import Config
from steps.datasets.data import (
    check_not_shared,
    class_balance,
    describe_balance,
    expert_probabilities,
    load_images,
    load_split,
    manifest,
    other_split,
    scan_split,
)
from steps.datasets.elpv import ensure_data
from steps.mlflow_io.records import log_config, log_dataset, log_skipped
from steps.mlflow_io.runs import name_run, stage_run
from steps.monitoring.profile import image_statistics, stack
from steps.network import accelerator
from steps.network.training import check_split, fit_one, pick_best, split_samples, split_train_val

logger = logging.getLogger(__name__)


def train(config: Config) -> str:
    """Train every selected set; return the parent run's ID (its ``best_run_id`` tag names the best)."""
    logger.info("%s", accelerator.describe())
    data_dir = ensure_data(config)
    classes = config.data.classes
    samples = scan_split(data_dir, "train", classes)
    check_split(*split_samples(samples, config), config, data_dir)  # before decoding: with every image usable
    sets = config.selected_hparams()
    first, *more = sorted({hp.image_size for hp in sets.values()})
    logger.info("decoding and checking %d training images at %dx%d", len(samples), first, first)
    # Decoded once per image size, checked before any work, shared by the sets of that size.
    images, samples, skipped = load_split(samples, first, "train", config.data.skip_bad_images, config.data.cache)
    at_size = {first: images}
    for size in more:
        logger.info("decoding the %d usable training images at %dx%d", len(samples), size, size)
        at_size[size], _ = load_images([s.path for s in samples], size, cache=config.data.cache)
    check_not_shared({"train": samples, **other_split(data_dir, "test", classes)})
    fit_rows, val_rows = split_train_val(samples, config.data.val_fraction, config.seed)
    fit_samples, val_samples = split_samples(samples, config)
    check_split(fit_samples, val_samples, config, data_dir)
    labels = np.array([s.label for s in samples], "float32")
    # The experts' probabilities, for the sets that train on them (soft_labels); else the folder labels.
    soft = expert_probabilities(data_dir, samples) if any(hp.soft_labels for hp in sets.values()) else None
    if soft is None and any(hp.soft_labels for hp in sets.values()):
        logger.info(
            "soft_labels: %s/manifest.csv has no probability for every image; training on folder labels", data_dir
        )
    # The drift check's reference: what the validation images look like (steps.monitoring.profile).
    val_statistics = stack([image_statistics(s.path.read_bytes()) for s in val_samples])
    balance = {**class_balance(fit_samples, "train"), **class_balance(val_samples, "val")}
    logger.info("class balance: train %s; val %s", describe_balance(balance, "train"), describe_balance(balance, "val"))

    if config.train.deterministic:
        # Same seed, same metrics: deterministic kernels and tf.data order, at some cost in speed.
        tf.config.experimental.enable_op_determinism()
    with stage_run(contract.STAGE_TRAIN, config.experiment) as parent:
        name_run(f"train {', '.join(sets)}")
        log_config(config)
        log_skipped(skipped, data_dir)
        mlflow.log_metrics(balance)
        data_digest = log_dataset(manifest(fit_samples, "train", data_dir), "train", data_dir, context="training")
        log_dataset(manifest(val_samples, "val", data_dir), "val", data_dir, context="validation")
        mlflow.set_tag(contract.TAG_DATA_DIGEST, data_digest)

        results = {}
        for name, hp in sets.items():
            targets = soft if hp.soft_labels and soft is not None else labels
            train_xy = (at_size[hp.image_size][fit_rows], targets[fit_rows])
            val_xy = (at_size[hp.image_size][val_rows], labels[val_rows])
            run_id, val_accuracy, val_loss = fit_one(name, hp, config, train_xy, val_xy, val_statistics)
            results[run_id] = (val_accuracy, val_loss)
            logger.info("%s: val_accuracy=%.4f val_loss=%.4f (run %s)", name, val_accuracy, val_loss, run_id)

        best = pick_best(results)
        mlflow.set_tag(contract.TAG_BEST_RUN_ID, best)
        mlflow.log_metric(contract.METRIC_BEST_VAL_ACCURACY, results[best][0])
        logger.info("best run %s with val_accuracy %.4f", best, results[best][0])
        return parent.info.run_id


OVERRIDES = parameters.overrides("train")

if __name__ == "__main__":
    cli.main(train, "Train the defect CNN once per hyperparameter set.", OVERRIDES)
