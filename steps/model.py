"""The one model factory. Preprocessing lives inside the model, so training and serving cannot drift.

The model takes raw grayscale pixels, ``(batch, height, width, 1)`` floats in 0..255 at any size,
resizes them to ``image_size`` and scales them to 0..1 itself, and returns the defect probability
``(batch, 1)``. Augmentation is not part of it: it runs in the training input pipeline
(``steps.dataset``), so the logged model does exactly what serving needs and nothing else.

Also here: the optimiser's schedule, the numeric precision (``resolve_precision``) and the
network's cost in floating-point operations (``forward_flops``), which the benchmark reports.
"""

from __future__ import annotations

import math
from pathlib import Path

import keras
from keras import layers

from steps.config import HParams
from steps.serving import RESIZE  # the one resize, shared with the loader and the served model


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow for repeatable initialisation, shuffling and augmentation."""
    keras.utils.set_random_seed(seed)


def make_model(hp: HParams, image_size: int, seed: int) -> keras.Model:
    """The compiled network of one hyperparameter set (train with ``schedule(hp)`` as a callback).

    A patchify stem (``stem_filters`` > 0) first turns each ``stem_stride``-pixel square into one
    feature vector: on two CPU cores most of the cost of a plain CNN is its 3x3 convolutions at full
    resolution on few channels, which run far below the machine's peak (BENCHMARKS.md). Then one
    stage per entry of ``filters``: ``convs_per_stage`` 3x3 convolutions (batch norm, ReLU), then
    2x2 max pooling; global average pooling, dropout, an optional dense layer and the sigmoid.
    The sigmoid computes in float32 under any mixed-precision policy, for a stable loss.
    """
    inputs = keras.Input(shape=(None, None, 1), name="image")
    x = layers.Resizing(image_size, image_size, name="resize", **RESIZE)(inputs)
    x = layers.Rescaling(1.0 / 255.0, name="scale")(x)
    if hp.stem_filters:
        x = layers.Conv2D(
            hp.stem_filters, hp.stem_stride, strides=hp.stem_stride, padding="same", use_bias=False, name="stem"
        )(x)
        x = layers.BatchNormalization(name="stem_bn")(x)
        x = layers.Activation("relu", name="stem_relu")(x)
    for stage, filters in enumerate(hp.filters):
        for conv in range(hp.convs_per_stage):
            name = f"{stage}_{conv}"
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{name}")(x)
            x = layers.BatchNormalization(name=f"bn{name}")(x)
            x = layers.Activation("relu", name=f"relu{name}")(x)
        x = layers.MaxPooling2D(name=f"pool{stage}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(hp.dropout, seed=seed, name="dropout0")(x)
    if hp.dense_units:
        x = layers.Dense(hp.dense_units, activation="relu", name="dense")(x)
        x = layers.Dropout(hp.dropout, seed=seed, name="dropout1")(x)
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="defect_probability")(x)
    model = keras.Model(inputs, outputs, name="defect_cnn")
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=learning_rate(hp, 0), weight_decay=hp.weight_decay),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=hp.label_smoothing),
        metrics=["accuracy"],  # by keyword: Keras 3 compile's positional order is not (opt, loss, metrics)
    )
    return model


def learning_rate(hp: HParams, epoch: int) -> float:
    """The step size for ``epoch`` (from 0): a linear warm-up over ``warmup_epochs``, then cosine
    decay towards zero at the last epoch: large steps once batch norm has settled, small ones to finish.

    Set once an epoch by ``schedule`` rather than compiled into the optimiser: a Keras schedule
    object costs about a second and a half more to trace, paid by every training."""
    if epoch < hp.warmup_epochs:
        return hp.learning_rate * (epoch + 1) / (hp.warmup_epochs + 1)
    done = (epoch - hp.warmup_epochs) / max(1, hp.epochs - hp.warmup_epochs)
    return hp.learning_rate * 0.5 * (1.0 + math.cos(math.pi * done))


def schedule(hp: HParams) -> keras.callbacks.Callback:
    """The callback that applies ``learning_rate`` at the start of each epoch."""
    return keras.callbacks.LearningRateScheduler(lambda epoch: learning_rate(hp, epoch))


def forward_flops(network: keras.Model) -> int:
    """Floating-point operations (a multiply-add counts two) of one image's forward pass through
    the convolutions and dense layers; batch norm, ReLU and pooling are left out (about 1% here).
    Shapes are static after the model's own resize. Training costs about three times this: the
    forward pass, and two products of the same size for the gradients."""
    total = 0
    for layer in network.layers:
        if isinstance(layer, layers.Conv2D):
            _, height, width, channels = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * height * width * channels * kh * kw * layer.input.shape[-1]
        elif isinstance(layer, layers.Dense):
            total += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)


def resolve_precision(requested: str) -> str:
    """The Keras dtype policy for ``train.precision``.

    ``auto`` picks mixed precision only where the hardware has the narrow type natively: on a CPU
    without it, TensorFlow emulates bfloat16 and trains several times slower than float32 (measured
    in BENCHMARKS.md), so the default must not assume it helps.
    """
    if requested != "auto":
        return requested
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if _cpu_has_native_bf16() else "float32"


def _cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False  # not Linux: no way to tell cheaply, and float32 is never the slow choice
    return bool({"amx_bf16", "avx512_bf16"} & set(flags.split()))
