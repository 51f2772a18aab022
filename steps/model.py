"""The one model factory. Preprocessing lives inside the model, so training and serving cannot drift.

The model takes raw grayscale pixels, ``(batch, height, width, 1)`` floats in 0..255 at any size,
resizes them to ``image_size`` and scales them to 0..1 itself, and returns the defect probability
``(batch, 1)``. Augmentation layers are active only while training.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of logs

import keras
from keras import layers

from steps.config import HParams
from steps.serving import RESIZE  # the one resize, shared with the loader and the served model


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow for repeatable initialisation, shuffling and augmentation."""
    keras.utils.set_random_seed(seed)


def make_model(hp: HParams, image_size: int, seed: int) -> keras.Model:
    inputs = keras.Input(shape=(None, None, 1), name="image")
    x = layers.Resizing(image_size, image_size, name="resize", **RESIZE)(inputs)
    x = layers.Rescaling(1.0 / 255.0, name="scale")(x)
    # Cells and casting parts have no preferred orientation, so flips are free extra data.
    x = layers.RandomFlip("horizontal_and_vertical", seed=seed, name="augment_flip")(x)
    for block, filters in enumerate(hp.filters):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{block}")(x)
        x = layers.BatchNormalization(name=f"bn{block}")(x)
        x = layers.Activation("relu", name=f"relu{block}")(x)
        x = layers.MaxPooling2D(name=f"pool{block}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(hp.dropout, seed=seed, name="dropout0")(x)
    x = layers.Dense(hp.dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(hp.dropout, seed=seed, name="dropout1")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="defect_probability")(x)
    model = keras.Model(inputs, outputs, name="defect_cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=hp.learning_rate),
        loss="binary_crossentropy",
        metrics=["accuracy"],  # by keyword: Keras 3 compile's positional order is not (opt, loss, metrics)
    )
    return model
