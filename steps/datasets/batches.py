"""The input pipelines: decoded images streamed from disk, batched, augmented and prefetched by tf.data.

Images arrive decoded and resized once, in a memory-mapped file (``steps.datasets.data.load_split``,
cached on disk between runs; ``steps.datasets.stored``). Each step reads a shuffled batch's rows from
it and augments the whole batch with vectorised, stateless random ops in a parallel ``map``;
``prefetch`` prepares the next batches while the network trains on this one. Only the batches in
flight are in memory, whatever the size of the data set. No Python runs per image.

Augmentation is seeded by ``(seed, step)``, so with TensorFlow's deterministic ops one seed gives
the same batches on every rerun; the shuffle is reseeded each epoch the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from steps.datasets.stored import Rows, as_rows


def augment(
    images: tf.Tensor, seed: tf.Tensor, mode: str, positions: tf.Tensor | None = None, total: tf.Tensor | None = None
) -> tf.Tensor:
    """A batch ``(n, s, s, c)`` with each image independently flipped (``flips``) or also transposed
    (``dihedral``: all eight symmetries of the square); ``seed`` is a stateless seed, shape (2,).

    ``positions``: these images are those places of a batch of ``total`` (one worker's part of a
    global batch), and each gets the draw it would get there, so the parts add up to the whole.

    Cells and castings have no preferred side or orientation, so these are free extra data.
    """
    if mode == "none":
        return images
    n = tf.shape(images)[0] if total is None else total
    draw = tf.random.stateless_uniform([3, n, 1, 1, 1], seed=seed) < 0.5
    if positions is not None:
        draw = tf.gather(draw, positions, axis=1)
    images = tf.where(draw[0], tf.reverse(images, axis=[2]), images)
    images = tf.where(draw[1], tf.reverse(images, axis=[1]), images)
    if mode == "dihedral":
        images = tf.where(draw[2], tf.transpose(images, [0, 2, 1, 3]), images)
    return images


def training_batches(
    images: np.ndarray | Rows, labels: np.ndarray, batch_size: int, seed: int, mode: str
) -> tuple[tf.data.Dataset, int]:
    """An endless dataset of augmented ``(images, labels)`` batches, and the steps in one epoch.

    Every epoch sees every image once, in a new seeded order; the last batch of an epoch may be
    smaller. ``images`` are ``(n, s, s, 1)`` 0..255, square (the transpose needs it): an array, a
    memory map or ``Rows`` of one.
    """
    return _shuffled(images, labels, batch_size, seed, mode, None)


def shard_batches(
    images: np.ndarray | Rows, labels: np.ndarray, batch_size: int, seed: int, mode: str, shard: tuple[int, int]
) -> tuple[tf.data.Dataset, int]:
    """One worker's part of ``training_batches``: ``shard = (index, count)`` takes places ``index``,
    ``index + count``, ... of every global batch of ``batch_size``, augmented as there; elements are
    ``(images, labels, size of the global batch)``. The workers' parts of a step make its batch."""
    return _shuffled(images, labels, batch_size, seed, mode, shard)


def _shuffled(
    images: np.ndarray | Rows, labels: np.ndarray, batch_size: int, seed: int, mode: str, shard: tuple[int, int] | None
) -> tuple[tf.data.Dataset, int]:
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"training images must be square, got {images.shape[1]}x{images.shape[2]}")
    n = len(images)
    steps = max(1, math.ceil(n / batch_size))
    read = reader(images)
    targets = tf.constant(labels, tf.float32)

    def gather(step: tf.Tensor, batch: tf.Tensor) -> tuple[tf.Tensor, ...]:
        seeds = tf.stack([tf.constant(seed, tf.int64), step])
        if shard is None:
            return augment(read(batch), seeds, mode), tf.gather(targets, batch)
        total = tf.shape(batch)[0]
        positions = tf.range(shard[0], total, shard[1])
        mine = tf.gather(batch, positions)
        x = augment(read(mine), seeds, mode, positions=positions, total=total)
        return x, tf.gather(targets, mine), total

    # Shuffled, then batched within the epoch, then repeated: each repetition reshuffles, seeded.
    order = tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    dataset = (
        tf.data.Dataset.zip(tf.data.Dataset.counter(), order.repeat())
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return dataset, steps


def reader(images: np.ndarray | Rows) -> Callable[[tf.Tensor], tf.Tensor]:
    """A graph function from a batch of row numbers to those images, float32, read from ``images``."""
    source = as_rows(images)
    shape = source.shape[1:]

    def rows(batch: np.ndarray) -> np.ndarray:
        return source[batch].astype(np.float32, copy=False)

    def read(batch: tf.Tensor) -> tf.Tensor:
        x = tf.numpy_function(rows, [batch], tf.float32, stateful=False)
        x.set_shape([None, *shape])
        return x

    return read


def eval_batches(images: np.ndarray | Rows, labels: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """A split as batches of ``(images, labels)``, in order, unaugmented."""
    read, targets = reader(images), tf.constant(labels, tf.float32)
    return _in_order(len(images), batch_size, lambda batch: (read(batch), tf.gather(targets, batch)))


def image_batches(images: np.ndarray | Rows, batch_size: int) -> tf.data.Dataset:
    """Images only, as batches in order, unaugmented: for ``predict``."""
    return _in_order(len(images), batch_size, reader(images))


def _in_order(n: int, batch_size: int, read: Callable) -> tf.data.Dataset:
    return tf.data.Dataset.range(n).batch(batch_size).map(read).prefetch(tf.data.AUTOTUNE)
