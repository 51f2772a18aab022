"""Entry point ``train``: fit each selected hyperparameter set in a nested run and tag the parent with the best.

Every training image is decoded and checked before any run is written (``steps.datasets.data``); a
seeded, stratified validation split is kept out of ``<data_dir>/train``, and ``test`` is only hashed,
to refuse images shared with it. Each set is trained and logged by ``steps.network.training.fit_one``;
the best is the highest validation accuracy, ties to the lower validation loss. Parameters:
``MLproject``. What the runs hold: docs/mlflow.md. Interrupted, its runs end KILLED; nothing is
registered here (``evaluate`` registers, and only from a FINISHED run). Given a cluster (``-P workers=N``,
or ``TF_CONFIG``), this process is its chief and the others run ``work``: ``steps.network.distributed``,
docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import tensorflow as tf

from steps.core import cli, contract, parameters
from steps.core.config import Config, ConfigError, HParams
from steps.core.errors import PipelineError, classify
from steps.core.loader import config_from_dict
from steps.datasets.data import (
    Rejected,
    Sample,
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
from steps.datasets.stored import Rows
from steps.mlflow_io.records import log_config, log_dataset, log_skipped
from steps.mlflow_io.runs import name_run, stage_run
from steps.monitoring.profile import image_statistics, stack
from steps.network import accelerator, distributed
from steps.network.model import resolve_precision
from steps.network.training import check_split, fit_one, pick_best, split_samples, split_train_val, training_targets

logger = logging.getLogger(__name__)


class Prepared(NamedTuple):
    """The training data of every selected set, decoded and checked: what the chief and workers share."""

    data_dir: Path
    samples: list[Sample]
    skipped: list[Rejected]
    fit_rows: list[int]
    val_rows: list[int]
    at_size: dict[int, Rows]
    labels: np.ndarray
    soft: np.ndarray | None

    def parts(self) -> tuple[list[Sample], list[Sample]]:
        """The training and the validation samples."""
        return [self.samples[i] for i in self.fit_rows], [self.samples[i] for i in self.val_rows]

    def xy(self, hp: HParams) -> tuple[tuple[Rows, np.ndarray], tuple[Rows, np.ndarray]]:
        """One set's training and validation images (rows of the decoded file) and targets."""
        targets = training_targets(hp, self.labels, self.soft)
        images = self.at_size[hp.image_size]
        return (images.take(self.fit_rows), targets[self.fit_rows]), (
            images.take(self.val_rows),
            self.labels[self.val_rows],
        )


def prepare(config: Config) -> Prepared:
    """Decode and check every training image, once per image size, and split off validation."""
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
        at_size[size] = Rows(load_images([s.path for s in samples], size, cache=config.data.cache)[0])
    check_not_shared({"train": samples, **other_split(data_dir, "test", classes)})
    fit_rows, val_rows = split_train_val(samples, config.data.val_fraction, config.seed)
    check_split([samples[i] for i in fit_rows], [samples[i] for i in val_rows], config, data_dir)
    labels = np.array([s.label for s in samples], "float32")
    # The experts' probabilities, for the sets that train on them (soft_labels); else the folder labels.
    soft = expert_probabilities(data_dir, samples) if any(hp.soft_labels for hp in sets.values()) else None
    if soft is None and any(hp.soft_labels for hp in sets.values()):
        logger.info(
            "soft_labels: %s/manifest.csv has no probability for every image; training on folder labels", data_dir
        )
    return Prepared(data_dir, samples, skipped, fit_rows, val_rows, at_size, labels, soft)


def train(config: Config) -> str:
    """Train every selected set; return the parent run's ID (its ``best_run_id`` tag names the best).

    On a cluster (``steps.network.distributed``) this process is its chief: it starts the local workers
    (``train.workers``), trains each set with them, and alone writes to MLflow."""
    cluster = distributed.resolve(config)
    if cluster is not None and not cluster.chief:
        raise ConfigError("TF_CONFIG", f"task.index {cluster.index}: only worker 0 runs train as a stage; start "
                          "the others as `python -m steps.train` (docs/distributed.md)")  # fmt: skip
    local = distributed.start_local_workers(cluster, config) if cluster and config.train.workers > 1 else []
    grace = config.train.worker_timeout  # after the last sync the workers exit at once
    try:
        # Before anything else runs a TensorFlow op: the collectives are set up at start-up.
        session = distributed.Session(cluster, config.train.worker_timeout) if cluster else None
        return _train(config, session)
    except BaseException:
        grace = distributed.FAILED_GRACE  # a worker that lost the chief exits by itself; a stuck one never will
        raise
    finally:
        distributed.stop_local_workers(local, grace)


def _train(config: Config, session: distributed.Session | None) -> str:
    logger.info("%s", accelerator.describe())
    data = prepare(config)
    sets = config.selected_hparams()
    fit_samples, val_samples = data.parts()
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
        log_skipped(data.skipped, data.data_dir)
        mlflow.log_metrics(balance)
        data_digest = log_dataset(manifest(fit_samples, "train", data.data_dir), "train", data.data_dir,
                                  context="training")  # fmt: skip
        log_dataset(manifest(val_samples, "val", data.data_dir), "val", data.data_dir, context="validation")
        mlflow.set_tag(contract.TAG_DATA_DIGEST, data_digest)

        results = {}
        for name, hp in sets.items():
            train_xy, val_xy = data.xy(hp)
            try:
                run_id, val_accuracy, val_loss = fit_one(name, hp, config, train_xy, val_xy, val_statistics, session)
            except BaseException as err:
                if session is not None and session.waiting:  # the workers wait for this set's end: tell them
                    with contextlib.suppress(PipelineError):
                        session.sync(classify(err).exit_code)
                raise
            if session is not None:
                session.sync()  # the workers go on to the next set
            results[run_id] = (val_accuracy, val_loss)
            logger.info("%s: val_accuracy=%.4f val_loss=%.4f (run %s)", name, val_accuracy, val_loss, run_id)

        best = pick_best(results)
        mlflow.set_tag(contract.TAG_BEST_RUN_ID, best)
        mlflow.log_metric(contract.METRIC_BEST_VAL_ACCURACY, results[best][0])
        logger.info("best run %s with val_accuracy %.4f", best, results[best][0])
        return parent.info.run_id


def work(config: Config) -> int:
    """A worker other than the chief: train every set with the cluster, log nothing to MLflow, and
    return the chief's status (0 when it logged every set)."""
    cluster = distributed.resolve(config)
    if cluster is None or cluster.chief:
        raise ConfigError("TF_CONFIG", "a worker needs TF_CONFIG with its task.index > 0 (docs/distributed.md)")
    session = distributed.Session(cluster, config.train.worker_timeout)
    data = prepare(config)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    precision = resolve_precision(config.train.precision)
    for name, hp in config.selected_hparams().items():
        train_xy, val_xy = data.xy(hp)
        logger.info("worker %d: training %r", cluster.index, name)
        distributed.fit_distributed(session, hp, config.seed, precision, train_xy, val_xy, config.evaluate.batch_size)
        status = session.sync()
        if status:
            logger.error(
                "worker %d: the chief failed after %r (exit %d); stopping with it", cluster.index, name, status
            )
            return status
    return 0


OVERRIDES = parameters.overrides("train")

if __name__ == "__main__":
    handed = distributed.worker_config()
    if handed is not None or distributed.is_worker(os.environ):
        # A worker other than the chief writes nothing to MLflow. Started by a chief on this machine, it
        # trains the chief's configuration; started by hand on another, the -P values given to it.
        step = work if handed is None else (lambda _: work(config_from_dict(handed)))
        sys.exit(cli.main(step, "A training worker (TF_CONFIG task.index > 0).", OVERRIDES, store=False))
    cli.main(train, "Train the defect CNN once per hyperparameter set.", OVERRIDES)
