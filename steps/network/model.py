"""The one model factory. Preprocessing lives inside the model, so training and serving cannot drift.

The model takes raw grayscale pixels, ``(batch, height, width, 1)`` floats in 0..255 at any size,
resizes them to the set's ``image_size`` and scales them as its network expects (``FEATURES``), and
returns the defect probability ``(batch, 1)``. Augmentation is not part of it: it runs in the training input pipeline
(``steps.datasets.batches``), so the logged model does exactly what serving needs and nothing else.

Also here: the optimiser's schedule, the numeric precision (``resolve_precision``) and the
network's cost in floating-point operations (``forward_flops``), which the benchmark reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from steps.core.config import ARCHS, HParams
from steps.network import pretrained
from steps.served.serving import RESIZE  # the one resize, shared with the loader and the served model

# The pooled features, the network's embedding of an image (the drift check summarises it).
EMBEDDING_LAYER = "gap"


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow for repeatable initialisation, shuffling and augmentation."""
    keras.utils.set_random_seed(seed)


def make_model(hp: HParams, seed: int) -> keras.Model:
    """The compiled network of one hyperparameter set (train with ``schedule(hp)`` as a callback).

    Gray pixels in 0..255 at any size are resized to ``hp.image_size``; the arch's features
    (``FEATURES[hp.arch]``) are averaged over the image, then dropout and, for the from-scratch
    network, an optional dense layer, and the sigmoid. The sigmoid computes in float32 under any
    mixed-precision policy, for a stable loss.
    """
    inputs = keras.Input(shape=(None, None, 1), name="image")
    x = layers.Resizing(hp.image_size, hp.image_size, name="resize", **RESIZE)(inputs)
    x = FEATURES[hp.arch](hp, x, seed)
    x = layers.GlobalAveragePooling2D(name=EMBEDDING_LAYER)(x)
    x = layers.Dropout(hp.dropout, seed=seed, name="dropout0")(x)
    if hp.dense_units:
        x = layers.Dense(hp.dense_units, activation="relu", name="dense")(x)
        x = layers.Dropout(hp.dropout, seed=seed, name="dropout1")(x)
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="defect_probability")(x)
    model = keras.Model(inputs, outputs, name=f"defect_{hp.arch}")
    if hp.arch in pretrained.WEIGHTS:
        pretrained.load_imagenet_weights(model, pretrained.load_state_dict(hp.arch))
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate=learning_rate(hp, 0),
            weight_decay=hp.weight_decay,
            **({"use_ema": True, "ema_momentum": hp.ema} if hp.ema else {}),
        ),
        loss=(
            RankedCrossentropy(hp.rank_weight, hp.label_smoothing)
            if hp.rank_weight
            else keras.losses.BinaryCrossentropy(label_smoothing=hp.label_smoothing)
        ),
        metrics=["accuracy"],  # by keyword: Keras 3 compile's positional order is not (opt, loss, metrics)
    )
    # Without a distribution strategy, Keras creates the optimizer's and the metrics' variables
    # inside the first trace of the training step, and TensorFlow then traces that step a second
    # time (a traced function that created variables is traced again). Created here, from a batch's
    # shapes, the step is traced once: a set's first epoch 1.4-1.7x sooner (BENCHMARKS.md, "First
    # epoch"), the same weights (tests/integration/test_model.py).
    batch = (np.zeros((1, hp.image_size, hp.image_size, 1), "float32"), np.zeros(1, "float32"))
    model._symbolic_build(data_batch=batch)
    return model


@keras.saving.register_keras_serializable(package="defects")
class RankedCrossentropy(keras.losses.Loss):
    """Binary cross-entropy plus ``rank_weight`` times a pairwise ranking term.

    Cross-entropy scores each image alone; precision at a high recall depends on the order of the scores.
    The ranking term takes every pair of a batch's images whose targets differ and adds the softplus of the
    lower target's logit minus the higher one's (large when the pair is scored the wrong way round), weighted
    by how far apart the targets are: 1 for a defect against a good cell, 1/3 between the experts' 2/3 and
    1/3 (soft labels). The term is the batch's weighted mean over its pairs."""

    def __init__(self, rank_weight: float, label_smoothing: float = 0.0, name: str = "ranked_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.rank_weight = rank_weight
        self.label_smoothing = label_smoothing
        self.crossentropy = keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing, reduction=None)

    def call(self, y_true, y_pred):
        per_image = self.crossentropy(y_true, y_pred)
        target = keras.ops.reshape(keras.ops.cast(y_true, "float32"), (-1,))
        prob = keras.ops.clip(keras.ops.reshape(keras.ops.cast(y_pred, "float32"), (-1,)), 1e-7, 1 - 1e-7)
        logit = keras.ops.log(prob) - keras.ops.log1p(-prob)
        above = keras.ops.relu(target[:, None] - target[None, :])  # [i, j]: how far i's target is above j's
        wrong_way = keras.ops.softplus(logit[None, :] - logit[:, None])  # [i, j]: large when j outscores i
        rank = keras.ops.sum(above * wrong_way) / keras.ops.maximum(keras.ops.sum(above), 1e-7)
        return per_image + self.rank_weight * rank  # one batch term, shared by its images' mean

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rank_weight": self.rank_weight, "label_smoothing": self.label_smoothing}


def embedding_model(network: keras.Model) -> keras.Model:
    """The network's pooled features of an image, one view (inside a test-time-augmentation wrapper, the
    network it averages): ``(batch, features)``."""
    from steps.network.explain import unwrap

    inner = unwrap(network)
    return keras.Model(inner.inputs, inner.get_layer(EMBEDDING_LAYER).output, name=f"{inner.name}_embedding")


def cnn_features(hp: HParams, x, seed: int):
    """Trained from scratch: scale to 0..1; a patchify stem (``stem_filters`` > 0) first turns each
    ``stem_stride``-pixel square into one feature vector (on two CPU cores most of the cost of a
    plain CNN is its 3x3 convolutions at full resolution on few channels, which run far below the
    machine's peak: BENCHMARKS.md); then one stage per entry of ``filters``: ``convs_per_stage``
    3x3 convolutions (batch norm, ReLU), then 2x2 max pooling."""
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
    return x


def _lite_features(hp: HParams, x, seed: int):
    """EfficientNet-Lite ``hp.arch`` with ImageNet weights (``steps.network.pretrained``): the gray image as
    the three equal channels of an RGB one, normalised as the weights expect, inside the model so that
    serving does the same."""
    x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
    mean, std = pretrained.INPUT_MEAN, pretrained.INPUT_STD
    x = layers.Normalization(mean=list(mean), variance=[s * s for s in std], name="normalise")(x)
    return pretrained.lite_features(x, hp.arch, hp.freeze_blocks, hp.drop_connect, seed)


efficientnet_lite0_features = efficientnet_lite1_features = _lite_features


# Every network make_model can build: ``<arch>_features`` above for each name of steps.core.config.ARCHS
# (the names' one home: it validates conf/ before anything imports Keras). A missing function fails here.
FEATURES: dict[str, Callable[[HParams, Any, int], Any]] = {arch: globals()[f"{arch}_features"] for arch in ARCHS}


# The test-time views, in the order their mean is taken: (flip up-down, flip left-right, transpose)
# each. The one table: with_tta builds them from Keras layers, steps.network.exports from plain ops.
_FLIPS = ((False, False, False), (False, True, False), (True, False, False), (True, True, False))
TTA_VIEWS = {
    "none": ((False, False, False),),
    "flips": _FLIPS,
    "dihedral": _FLIPS + tuple((up_down, left_right, True) for up_down, left_right, _ in _FLIPS),
}


def with_tta(network: keras.Model, hp: HParams) -> keras.Model:
    """The trained network averaged over symmetric views of each image (test-time augmentation).

    ``hp.tta``: ``none`` (the network itself), ``flips`` (as is, flipped left-right, up-down and
    both) or ``dihedral`` (all eight symmetries of the square, as ``augment: dihedral`` trains on).
    Built from Keras's own layers so the logged model still loads with ``safe_mode``: a transpose is
    a ``Permute``, and a flip a ``Dense`` over one axis whose frozen kernel is the exchange matrix
    (ones on the anti-diagonal: an exact copy in reverse order, computed in float32).
    """
    if hp.tta == "none":
        return network
    size = hp.image_size
    inputs = keras.Input(shape=(None, None, 1), name="image")
    x = layers.Resizing(size, size, name="tta_resize", **RESIZE)(inputs)
    exchange = np.eye(size, dtype="float32")[::-1]

    def flip(view, name):  # reverse the width axis
        view = layers.Permute((1, 3, 2), name=f"{name}_to_last")(view)
        reverse = layers.Dense(size, use_bias=False, trainable=False, dtype="float32", name=name)
        view = reverse(view)
        reverse.set_weights([exchange])
        return layers.Permute((1, 3, 2), name=f"{name}_back")(view)

    def transpose(view, name):
        return layers.Permute((2, 1, 3), name=name)(view)

    views = []
    for i, (up_down, left_right, diagonal) in enumerate(TTA_VIEWS[hp.tta]):
        view = x
        if up_down:  # a flip of the height axis: the width flip between two transposes
            view = transpose(flip(transpose(view, f"view{i}_t1"), f"view{i}_flip_ud"), f"view{i}_t2")
        if left_right:
            view = flip(view, f"view{i}_flip_lr")
        if diagonal:
            view = transpose(view, f"view{i}_transpose")
        views.append(view)
    outputs = layers.Average(name="tta_mean", dtype="float32")([network(view) for view in views])
    return keras.Model(inputs, outputs, name=f"{network.name}_tta")


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
        if isinstance(layer, layers.Conv2D | layers.DepthwiseConv2D):
            _, height, width, channels = layer.output.shape
            kh, kw = layer.kernel_size
            inputs = 1 if isinstance(layer, layers.DepthwiseConv2D) else layer.input.shape[-1]  # one filter a channel
            total += 2 * height * width * channels * kh * kw * inputs
        elif isinstance(layer, layers.Dense):
            total += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)


def resolve_precision(requested: str) -> str:
    """The Keras dtype policy for ``train.precision``.

    ``auto`` picks mixed precision only where the hardware has matrix units for the narrow type: a
    GPU (``mixed_float16``) or a CPU with AMX (``mixed_bfloat16``). Elsewhere float32: without
    bfloat16 at all, TensorFlow emulates it and trains several times slower; with AVX512-BF16 alone
    (AMD Zen 4, Intel Cooper Lake) it is native, yet EfficientNet-Lite0 trained slower than in
    float32 in five of six measured settings (0.46-1.25 times its speed: BENCHMARKS.md).
    """
    if requested != "auto":
        return requested
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if _cpu_has_amx() else "float32"


def float32_copy(network: keras.Model) -> keras.Model:
    """``network`` with every layer in float32 and the same weights; itself when it already is.

    Mixed precision only speeds up training: the network that is scored, logged and exported is
    float32, so the Keras model, its ONNX and LiteRT exports (whose converters do not take bfloat16
    graphs) and every score computed from it agree.
    """
    if network.dtype_policy.name == "float32":  # built under the float32 policy, as make_model builds it
        return network

    def clone(layer):
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(network, clone_function=clone, recursive=True)
    copy.set_weights(network.get_weights())
    return copy


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()  # not Linux: no way to tell cheaply, and float32 is never the slow choice
    return set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())


def _cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    return "amx_bf16" in cpu_flags(cpuinfo)
