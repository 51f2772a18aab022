"""The training input pipeline: decoded images in memory, batched, augmented and prefetched by tf.data.

Images arrive decoded and resized once (``steps.datasets.data.load_split``, cached on disk between runs).
Each step gathers a shuffled batch from one in-memory tensor and augments the whole batch with
vectorised, stateless random ops in a parallel ``map``; ``prefetch`` prepares the next batch while
the network trains on this one. No Python runs per image or per batch once training starts.

Augmentation is seeded by ``(seed, step)``, so with TensorFlow's deterministic ops one seed gives
the same batches on every rerun; the shuffle is reseeded each epoch the same way.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf


def augment(images: tf.Tensor, seed: tf.Tensor, mode: str) -> tf.Tensor:
    """A batch ``(n, s, s, c)`` with each image independently flipped (``flips``) or also transposed
    (``dihedral``: all eight symmetries of the square); ``seed`` is a stateless seed, shape (2,).

    Cells and castings have no preferred side or orientation, so these are free extra data.
    """
    if mode == "none":
        return images
    n = tf.shape(images)[0]
    draw = tf.random.stateless_uniform([3, n, 1, 1, 1], seed=seed) < 0.5
    images = tf.where(draw[0], tf.reverse(images, axis=[2]), images)
    images = tf.where(draw[1], tf.reverse(images, axis=[1]), images)
    if mode == "dihedral":
        images = tf.where(draw[2], tf.transpose(images, [0, 2, 1, 3]), images)
    return images


def training_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, mode: str
) -> tuple[tf.data.Dataset, int]:
    """An endless dataset of augmented ``(images, labels)`` batches, and the steps in one epoch.

    Every epoch sees every image once, in a new seeded order; the last batch of an epoch may be
    smaller. ``images`` are ``(n, s, s, 1)`` 0..255, square (the transpose needs it).
    """
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"training images must be square, got {images.shape[1]}x{images.shape[2]}")
    n = len(images)
    steps = max(1, math.ceil(n / batch_size))
    pixels = tf.constant(images, tf.float32)
    targets = tf.constant(labels, tf.float32)

    def gather(step: tf.Tensor, batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = augment(tf.gather(pixels, batch), tf.stack([tf.constant(seed, tf.int64), step]), mode)
        return x, tf.gather(targets, batch)

    # Shuffled, then batched within the epoch, then repeated: each repetition reshuffles, seeded.
    order = tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    dataset = (
        tf.data.Dataset.zip(tf.data.Dataset.counter(), order.repeat())
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return dataset, steps


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """The validation split as batches, in order, unaugmented."""
    return tf.data.Dataset.from_tensor_slices((images.astype("float32"), labels.astype("float32"))).batch(batch_size)
