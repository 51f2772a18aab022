"""Training one hyperparameter set: the validation split, the Keras fit with its callbacks, and the nested
run that logs the set's metrics, cut-off, exports and served model with its drift reference (``fit_one``);
``fit`` alone has no MLflow."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import keras
import mlflow
import numpy as np

from steps.core import contract, memory, signals
from steps.core.config import Config, HParams
from steps.datasets.batches import eval_batches, image_batches, training_batches
from steps.datasets.data import (
    Sample,
    check_every_class_in,
    stratified_split,
)
from steps.datasets.stored import Rows
from steps.mlflow_io.runs import nested_run
from steps.monitoring.profile import Profile, build_profile
from steps.network import distributed, exports
from steps.network.model import (
    embedding_model,
    float32_copy,
    forward_flops,
    make_model,
    resolve_precision,
    schedule,
    set_seed,
    with_tta,
)
from steps.network.scoring import keras_loss_and_accuracy, objective, operating_point, parse_target
from steps.served import packaging, serving

logger = logging.getLogger(__name__)


def split_train_val(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded validation split of the training samples, stratified by class: (fit, val) indices."""
    return stratified_split([s.label for s in samples], val_fraction, seed)


def split_samples(samples: Sequence[Sample], config: Config) -> tuple[list[Sample], list[Sample]]:
    fit_rows, val_rows = split_train_val(samples, config.data.val_fraction, config.seed)
    return [samples[i] for i in fit_rows], [samples[i] for i in val_rows]


def training_targets(hp: HParams, labels: np.ndarray, soft: np.ndarray | None) -> np.ndarray:
    """What a set trains on: the folder labels, or with ``hp.soft_labels`` and the experts' probabilities
    (``soft``; None when the data has none) their mix, ``soft_weight`` of the probability."""
    if not hp.soft_labels or soft is None:
        return labels
    return (hp.soft_weight * soft + (1.0 - hp.soft_weight) * labels).astype("float32")


def check_split(fit: Sequence[Sample], val: Sequence[Sample], config: Config, data_dir: Path) -> None:
    """Every class in both the training and the validation part, or a ``DataError`` naming the counts."""
    hint = (
        f"add images to {data_dir / 'train'} (at least two per class) or change data.val_fraction "
        f"({config.data.val_fraction})"
    )
    check_every_class_in({"training": fit, "validation": val}, config.data.classes, hint)


def pick_best(results: Mapping[str, tuple[float, float]]) -> str:
    """The run ID with the highest validation accuracy; ties go to the lower validation loss.

    ``results`` maps run ID to ``(val_accuracy, val_loss)``.
    """
    if not results:
        raise ValueError("no training results to choose from")
    return max(results, key=lambda run_id: (results[run_id][0], -results[run_id][1]))


class EpochLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics to the active run: ``loss``, ``accuracy``, ``val_loss``,
    ``val_accuracy``, ``learning_rate`` and ``images_per_second`` (training images over the
    epoch's wall time, validation included)."""

    def __init__(self, n_images: int) -> None:
        super().__init__()
        self.n_images = n_images
        self.started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        speed = self.n_images / max(time.perf_counter() - self.started, 1e-9)
        rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))  # the schedule's, now
        extra = {contract.METRIC_IMAGES_PER_SECOND: speed, contract.METRIC_LEARNING_RATE: rate}
        epoch_metrics = {k: float(v) for k, v in (logs or {}).items() if k in contract.EPOCH_METRICS}
        mlflow.log_metrics({**epoch_metrics, **extra}, step=epoch)


class StopOnSignal(keras.callbacks.Callback):
    """Stops training at the next batch once a SIGTERM has arrived, even if an op swallowed it."""

    def on_train_batch_end(self, batch, logs=None):
        signals.check()

    def on_test_batch_end(self, batch, logs=None):
        signals.check()


def early_stopping(hp: HParams) -> keras.callbacks.EarlyStopping:
    """Stops after ``patience`` epochs without a better validation accuracy; the best epoch's
    weights are kept whether or not training stops early."""
    return keras.callbacks.EarlyStopping(
        monitor=contract.METRIC_VAL_ACCURACY, mode="max", patience=hp.patience or hp.epochs, restore_best_weights=True
    )


def weight_average(hp: HParams) -> list[keras.callbacks.Callback]:
    """With ``hp.ema``: the averaged weights in the model while it is validated and at each epoch's end,
    so that early stopping keeps the best epoch's average (it must come before ``early_stopping``)."""
    return [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if hp.ema else []


class Resolution(keras.callbacks.Callback):
    """Progressive resolution: the first ``hp.start_epochs`` epochs train at ``hp.start_size`` px, the rest at
    ``hp.image_size``; validation, and the network kept at the end, always at ``hp.image_size``.

    The size is the ``resize`` layer's (``make_model``). A traced step keeps the size it was traced with, so
    the training step is traced again when the size changes, and the test step, traced at its first call,
    sees the full size."""

    def __init__(self, hp: HParams) -> None:
        super().__init__()
        self.hp = hp
        self.traced = 0  # the size of the current training step's trace

    def _resize(self, size: int) -> None:
        layer = self.model.get_layer("resize")
        layer.height = layer.width = size

    def on_epoch_begin(self, epoch, logs=None):
        size = self.hp.start_size if epoch < self.hp.start_epochs else self.hp.image_size
        self._resize(size)
        if size != self.traced:
            self.model.make_train_function(force=True)
            self.traced = size
            logger.info("epoch %d on: training at %d px", epoch + 1, size)

    def on_test_begin(self, logs=None):
        self._resize(self.hp.image_size)

    def on_train_end(self, logs=None):
        self._resize(self.hp.image_size)


def resolution(hp: HParams) -> list[keras.callbacks.Callback]:
    return [Resolution(hp)] if hp.start_size else []


def fit(
    hp: HParams,
    seed: int,
    precision: str,
    train_xy: tuple[np.ndarray | Rows, np.ndarray],
    val_xy: tuple[np.ndarray | Rows, np.ndarray],
    eval_batch_size: int,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, int, int]:
    """Train one set as the pipeline does; return the network with its best epoch's weights (in
    float32 whatever ``precision`` trained it: ``steps.network.model.float32_copy``), that epoch and the
    epochs run (from 1; fewer than ``hp.epochs`` when ``patience`` stopped it).
    No MLflow here: ``fit_one`` logs around it, the benchmarks call it alone."""
    set_seed(seed)  # every set starts from the same seed, so sets differ only by their params
    batches, steps = training_batches(*train_xy, hp.batch_size, seed, hp.augment)
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = make_model(hp, seed)
    finally:
        keras.mixed_precision.set_global_policy("float32")  # the policy is global; the model keeps its own
    logger.info("training (%s, %d steps an epoch): %s", precision, steps, hp)
    best = early_stopping(hp)
    history = model.fit(
        batches,
        steps_per_epoch=steps,
        validation_data=eval_batches(*val_xy, eval_batch_size),
        epochs=hp.epochs,
        shuffle=False,  # the input pipeline shuffles, seeded
        callbacks=[StopOnSignal(), schedule(hp), *resolution(hp), *callbacks, *weight_average(hp), best],
        verbose=1 if sys.stdout.isatty() else 2,  # a progress bar on a terminal, a line per epoch in logs
    )
    return float32_copy(model), best.best_epoch + 1, len(history.epoch)


def fit_one(
    name: str,
    hp: HParams,
    config: Config,
    train_xy: tuple[np.ndarray | Rows, np.ndarray],
    val_xy: tuple[np.ndarray | Rows, np.ndarray],
    val_statistics: Mapping[str, np.ndarray] | None = None,
    session: distributed.Session | None = None,
) -> tuple[str, float, float]:
    """Train one set in a nested run; return ``(run_id, val_accuracy, val_loss)`` of its best epoch.

    ``val_statistics``: the validation images' statistics (``steps.monitoring.profile.stack``); with
    them the logged model carries its reference profile for the drift check, else none. ``session``:
    train on the cluster (``steps.network.distributed``; this process is its chief)."""
    parent = mlflow.active_run()
    assert parent is not None, "fit_one runs inside train's parent run"
    with nested_run(name, parent.info.experiment_id) as child:
        mlflow.set_tag(contract.TAG_HPARAM_SET, name)
        precision = resolve_precision(config.train.precision)
        mlflow.log_params(
            {
                **dataclasses.asdict(hp),
                "seed": config.seed,
                "precision": precision,
            }
        )
        logger.info("training %r", name)
        trainer = fit if session is None else functools.partial(distributed.fit_distributed, session)
        with memory.watch() as training:
            model, best_epoch, _ = trainer(
                hp,
                config.seed,
                precision,
                train_xy,
                val_xy,
                config.evaluate.batch_size,
                callbacks=[EpochLogger(len(train_xy[0]))],
            )
        if training.peak is not None:
            mlflow.log_metric(contract.METRIC_PEAK_ANON_FIT_MB, training.peak)
        flops = forward_flops(model)  # of one view: test-time augmentation runs it once a view
        network, model = model, with_tta(model, hp)  # what is logged and scored
        # One pass over the validation images: loss and accuracy come from the same predictions the
        # cut-off is tuned on (an evaluate() as well would trace and run the served network again).
        val_prob = model.predict(eval_batches(*val_xy, config.evaluate.batch_size), verbose=0).reshape(-1)
        val_loss, val_accuracy = keras_loss_and_accuracy(val_xy[1], val_prob, hp.label_smoothing)
        mlflow.log_metrics(
            {
                contract.METRIC_FLOPS: flops,
                contract.METRIC_BEST_EPOCH: best_epoch,
                contract.METRIC_BEST_VAL_ACCURACY: val_accuracy,
                contract.METRIC_BEST_VAL_LOSS: val_loss,
            }
        )
        goal = config.train.threshold_objective
        point = operating_point(val_xy[1], val_prob, goal)
        cutoff = point.cutoff
        tuned = {
            contract.METRIC_DECISION_THRESHOLD: cutoff,
            contract.METRIC_VAL_PRECISION_AT_CUTOFF: point.precision,
            contract.METRIC_VAL_RECALL_AT_CUTOFF: point.recall,
            contract.METRIC_OBJECTIVE_MET: float(point.met),
        }
        if parse_target(goal) is None:
            half = serving.REFERENCE_CUTOFF
            at_cutoff, at_half = (objective(val_xy[1], val_prob >= t, goal) for t in (cutoff, half))
            tuned |= {contract.METRIC_OBJECTIVE_AT_CUTOFF: at_cutoff, contract.METRIC_OBJECTIVE_AT_HALF: at_half}
            if cutoff == half:
                logger.info(
                    "cut-off kept at 0.5: no cut-off scored a higher validation %s than its %.4f", goal, at_half
                )
            else:
                logger.info("cut-off %.4f: validation %s %.4f, against %.4f at 0.5", cutoff, goal, at_cutoff, at_half)
        elif point.met:
            logger.info("cut-off %.4f for %s: validation precision %.3f, recall %.3f", cutoff, goal, point.precision,
                        point.recall)  # fmt: skip
        else:
            logger.warning(
                "%s: no cut-off meets %s on the validation split; kept the closest, %.4f (precision %.3f, recall %.3f)",
                name, goal, cutoff, point.precision, point.recall,
            )  # fmt: skip
        mlflow.log_metrics(tuned)
        good, defect = config.data.classes
        metadata = {
            serving.CLASSES: [good, defect],
            serving.IMAGE_SIZE: hp.image_size,
            "hparam_set": name,
            serving.DECISION_THRESHOLD: cutoff,
            contract.META_THRESHOLD_OBJECTIVE: goal,
            contract.META_VAL_PRECISION: point.precision,
            contract.META_VAL_RECALL: point.recall,
            contract.META_OBJECTIVE_MET: point.met,
        }
        with tempfile.TemporaryDirectory() as tmp, memory.watch() as logging_model:
            started = time.perf_counter()
            formats = config.train.export_formats
            paths = (
                exports.write_exports(network, hp.image_size, hp.tta, metadata, Path(tmp), formats) if formats else None
            )
            if paths:
                # The exports score validation images as the Keras model did, or the run fails: a
                # sample of them here (evaluate checks every test image before registering).
                sample = slice(0, exports.PARITY_SAMPLE)
                diffs = exports.check_parity(paths, val_xy[0][sample], val_prob[sample], cutoff)
                mlflow.log_metrics({contract.export_diff_metric(runtime): diff for runtime, diff in diffs.items()})
                mlflow.log_metric(contract.METRIC_EXPORT_SECONDS, time.perf_counter() - started)
                mlflow.log_artifacts(tmp, contract.EXPORTS_ARTIFACT)
            profile = None
            if val_statistics is not None:
                profile = reference_profile(network, val_statistics, val_prob, train_xy[0], val_xy[0], config)
            packaging.log_model(model, config, metadata, example=val_xy[0][0], exports=paths, profile=profile)
        if logging_model.peak is not None:
            mlflow.log_metric(contract.METRIC_PEAK_ANON_LOGGING_MB, logging_model.peak)
        return child.info.run_id, val_accuracy, val_loss


# Training images whose embeddings fit the profile's principal directions: spread over the split.
BASIS_IMAGES = 512


def reference_profile(
    network: keras.Model,
    val_statistics: Mapping[str, np.ndarray],
    val_prob: np.ndarray,
    train_images: np.ndarray | Rows,
    val_images: np.ndarray | Rows,
    config: Config,
) -> Profile:
    """The drift check's reference: the validation images' statistics, scores and embeddings, the
    embeddings on directions fitted to training images (so that validation images are as new to them
    as a later batch will be)."""
    embed = embedding_model(network)
    batch = config.evaluate.batch_size
    every = max(1, len(train_images) // BASIS_IMAGES)
    basis = embed.predict(train_images[::every].astype("float32"), batch_size=batch, verbose=0)
    embeddings = embed.predict(image_batches(val_images, batch), verbose=0)
    return build_profile(val_statistics, val_prob, embeddings, basis)
