"""Entry point ``train``: fit the CNN once per hyperparameter set and record the best.

Parameters (an empty value keeps ``conf/``): ``hparams`` (comma-separated set names of
``conf/hparams.yaml``), ``epochs`` and ``image_size`` (each overrides every set's), ``data_dir``, ``seed``,
``skip_bad_images``, ``exports`` (``onnx,litert``, one of them, or ``none``), ``precision`` (auto,
float32, mixed_bfloat16, mixed_float16),
``deterministic`` (true: TensorFlow's deterministic ops), ``experiment``.

Before any run is written, every image of ``<data_dir>/train`` is decoded and checked
(``steps.datasets.data.load_split``): a file that cannot be used fails the stage with the list of them, or,
with ``skip_bad_images``, is left out and counted; a class without usable images, and an image also
in ``test`` or under both classes, are refused. A seeded validation split stratified by class is
then kept out of the usable images; ``test`` is never used for training (only hashed, for that check).
Writes, in experiment ``train/<experiment>``:

- the parent run: tags ``best_run_id`` (the child with the highest ``best_val_accuracy``; ties go
  to the lower ``best_val_loss``), ``data_digest`` and ``pipeline.process``; metrics ``best_val_accuracy``,
  ``n_skipped`` and the class balance ``n_train_good``, ``n_train_defect``, ``n_val_good``,
  ``n_val_defect``; artifacts ``config.yaml`` (the resolved configuration), the train/val manifests,
  also logged as the run's dataset inputs with their digests, and ``skipped_images.csv`` (file,
  class, reason) when any were skipped;
- one nested child run per set: tag ``hparam_set``; its hyperparameters (``arch``, ``image_size``...), ``seed``
  and the resolved ``precision`` as params; per epoch ``loss``, ``accuracy``, ``val_loss``,
  ``val_accuracy``, ``learning_rate`` and ``images_per_second``; ``best_epoch``, whose weights are
  kept (the highest ``val_accuracy``; ``patience`` epochs without a better one stop training), and
  its ``best_val_accuracy`` and ``best_val_loss`` (of the logged model: with the set's ``tta``,
  the mean over the symmetric views), which pick the best set; ``flops_per_image``
  (forward); metric ``decision_threshold`` (the cut-off on the defect probability that maximises
  ``train.threshold_objective`` on the validation split, never the test set) with that objective
  there and at 0.5 (``val_objective_at_cutoff``, ``val_objective_at_0.5``); the model under
  ``model``: the served pyfunc of ``steps/served/serving.py`` (encoded image bytes in, class, probability
  and cut-off out), logged as its code beside the Keras network (which resizes and scales its
  input itself, and averages over the set's ``tta`` views), with a signature, a serving input
  example (a validation image as PNG bytes) and, in its metadata and model config, the class
  names, image size and ``decision_threshold``; beside the network among the model's artifacts,
  and under ``exports`` in the run's, its ONNX (``model.onnx``) and LiteRT (``model.tflite``)
  exports (those of ``exports``: both by default, or ``none``) and their ``preprocessing.json``
  (``steps.network.exports``), each checked against the Keras
  model on the first 64 validation images (over 1e-4 apart, or a class that differs, fails the
  run), the largest difference logged as ``onnx_max_abs_diff`` and ``litert_max_abs_diff``, and
  the time making and checking them took as ``export_seconds``;
- on every run, tags ``versions.<package>`` (Python, TensorFlow, Keras, MLflow, NumPy, ...).

Training reads the decoded images from memory through ``steps.datasets.batches`` (seeded shuffle, batch
gather, vectorised augmentation in a parallel map, prefetch). With ``deterministic`` on, TensorFlow's
deterministic ops make a rerun with the same seed give the same metrics.

Interrupted (Ctrl-C, SIGTERM), the parent and the running child end KILLED; nothing is registered
here in any case (``evaluate`` registers, and only from a FINISHED run).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

from steps.core import cli, contract, parameters, signals
from steps.core.config import Config, HParams
from steps.datasets.batches import eval_batches, training_batches
from steps.datasets.data import (
    Sample,
    check_every_class_in,
    check_not_shared,
    class_balance,
    describe_balance,
    load_images,
    load_split,
    manifest,
    other_split,
    scan_split,
    stratified_split,
)
from steps.datasets.elpv import ensure_data
from steps.mlflow_io.records import log_config, log_dataset, log_skipped
from steps.mlflow_io.runs import nested_run, stage_run
from steps.network import accelerator, exports
from steps.network.model import float32_copy, forward_flops, make_model, resolve_precision, schedule, set_seed, with_tta
from steps.network.scoring import keras_loss_and_accuracy, objective, tune_threshold
from steps.served import packaging

logger = logging.getLogger(__name__)


def split_train_val(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded validation split of the training samples, stratified by class: (fit, val) indices."""
    return stratified_split([s.label for s in samples], val_fraction, seed)


def split_samples(samples: Sequence[Sample], config: Config) -> tuple[list[Sample], list[Sample]]:
    fit_rows, val_rows = split_train_val(samples, config.data.val_fraction, config.seed)
    return [samples[i] for i in fit_rows], [samples[i] for i in val_rows]


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


def fit(
    hp: HParams,
    seed: int,
    precision: str,
    train_xy: tuple[np.ndarray, np.ndarray],
    val_xy: tuple[np.ndarray, np.ndarray],
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
    # The best epoch's weights are kept whether or not training stops early.
    best = keras.callbacks.EarlyStopping(
        monitor=contract.METRIC_VAL_ACCURACY, mode="max", patience=hp.patience or hp.epochs, restore_best_weights=True
    )
    history = model.fit(
        batches,
        steps_per_epoch=steps,
        validation_data=eval_batches(*val_xy, eval_batch_size),
        epochs=hp.epochs,
        shuffle=False,  # the input pipeline shuffles, seeded
        callbacks=[StopOnSignal(), schedule(hp), *callbacks, best],
        verbose=1 if sys.stdout.isatty() else 2,  # a progress bar on a terminal, a line per epoch in logs
    )
    return float32_copy(model), best.best_epoch + 1, len(history.epoch)


def served_network(network: keras.Model, hp: HParams) -> keras.Model:
    """What is logged and scored: the trained network, inside its test-time augmentation if the set
    has one (``steps.network.model.with_tta``). Only predicted with: its loss and accuracy are computed from
    its predictions (``steps.network.scoring.keras_loss_and_accuracy``)."""
    return with_tta(network, hp)


def fit_one(
    name: str,
    hp: HParams,
    config: Config,
    train_xy: tuple[np.ndarray, np.ndarray],
    val_xy: tuple[np.ndarray, np.ndarray],
) -> tuple[str, float, float]:
    """Train one set in a nested run; return ``(run_id, val_accuracy, val_loss)`` of its best epoch."""
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
        model, best_epoch, _ = fit(
            hp,
            config.seed,
            precision,
            train_xy,
            val_xy,
            config.evaluate.batch_size,
            callbacks=[EpochLogger(len(train_xy[0]))],
        )
        flops = forward_flops(model)  # of one view: test-time augmentation runs it once a view
        network, model = model, served_network(model, hp)
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
        cutoff = tune_threshold(val_xy[1], val_prob, goal)
        at_cutoff, at_half = (objective(val_xy[1], val_prob >= t, goal) for t in (cutoff, 0.5))
        mlflow.log_metrics(
            {
                contract.METRIC_DECISION_THRESHOLD: cutoff,
                contract.METRIC_OBJECTIVE_AT_CUTOFF: at_cutoff,
                contract.METRIC_OBJECTIVE_AT_HALF: at_half,
            }
        )
        if cutoff == 0.5:
            logger.info("cut-off kept at 0.5: no cut-off scored a higher validation %s than its %.4f", goal, at_half)
        else:
            logger.info("cut-off %.4f: validation %s %.4f, against %.4f at 0.5", cutoff, goal, at_cutoff, at_half)
        good, defect = config.data.classes
        metadata = {
            "classes": [good, defect],
            "image_size": hp.image_size,
            "hparam_set": name,
            "decision_threshold": cutoff,
        }
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            formats = config.train.export_formats
            paths = (
                exports.write_exports(network, hp.image_size, hp.tta, metadata, Path(tmp), formats) if formats else None
            )
            if paths:
                # The exports score validation images as the Keras model did, or the run fails: a
                # sample of them here (evaluate checks every test image before registering).
                sample = slice(0, exports.PARITY_SAMPLE)
                diffs = exports.check_parity(
                    paths, val_xy[0][sample], val_prob[sample], cutoff, config.evaluate.batch_size
                )
                mlflow.log_metrics({contract.export_diff_metric(runtime): diff for runtime, diff in diffs.items()})
                mlflow.log_metric(contract.METRIC_EXPORT_SECONDS, time.perf_counter() - started)
                mlflow.log_artifacts(tmp, contract.EXPORTS_ARTIFACT)
            packaging.log_model(model, config, metadata, example=val_xy[0][0], exports=paths)
        return child.info.run_id, val_accuracy, val_loss


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
    balance = {**class_balance(fit_samples, "train"), **class_balance(val_samples, "val")}
    logger.info("class balance: train %s; val %s", describe_balance(balance, "train"), describe_balance(balance, "val"))

    if config.train.deterministic:
        # Same seed, same metrics: deterministic kernels and tf.data order, at some cost in speed.
        tf.config.experimental.enable_op_determinism()
    with stage_run(contract.STAGE_TRAIN, config.experiment) as parent:
        log_config(config)
        log_skipped(skipped, data_dir)
        mlflow.log_metrics(balance)
        data_digest = log_dataset(manifest(fit_samples, "train", data_dir), "train", data_dir, context="training")
        log_dataset(manifest(val_samples, "val", data_dir), "val", data_dir, context="validation")
        mlflow.set_tag(contract.TAG_DATA_DIGEST, data_digest)

        results = {}
        for name, hp in sets.items():
            train_xy = (at_size[hp.image_size][fit_rows], labels[fit_rows])
            val_xy = (at_size[hp.image_size][val_rows], labels[val_rows])
            run_id, val_accuracy, val_loss = fit_one(name, hp, config, train_xy, val_xy)
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
