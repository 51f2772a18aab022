"""Where the network looks: Grad-CAM heat maps (Selvaraju et al. 2017) for the defect probability.

Pure computation on a Keras network and preprocessed images; ``steps.network.plots.gradcam_grid`` draws them.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def last_feature_map(network: keras.Model) -> str:
    """The name of the last layer with a spatial (rank-4) output before the network pools it away.

    Grad-CAM reads the last convolutional features: the deepest that still have a position.
    """
    found = None
    pooling = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D, keras.layers.Flatten)
    for layer in network.layers:
        if isinstance(layer, pooling):
            break
        if isinstance(
            layer, keras.layers.Conv2D | keras.layers.Activation | keras.layers.ReLU | keras.layers.BatchNormalization
        ):
            found = layer.name
    if found is None:
        raise ValueError(f"network {network.name!r} has no convolutional feature map before its pooling")
    return found


def unwrap(network: keras.Model) -> keras.Model:
    """The network inside a test-time-augmentation wrapper (``steps.network.model.with_tta``), else itself:
    Grad-CAM explains the image as it is, not the average over its flipped views."""
    inner = [layer for layer in network.layers if isinstance(layer, keras.Model)]
    return inner[0] if len(inner) == 1 else network


def gradcam(network: keras.Model, images: np.ndarray, layer: str | None = None) -> np.ndarray:
    """Heat maps ``(n, height, width)`` in 0..1, the size of ``images`` (``(n, height, width, 1)``, 0..255).

    Each map is the ReLU of the feature maps of ``layer`` (default: ``last_feature_map``) weighted by
    the spatially averaged gradient of the defect probability, then scaled to its own maximum (a map
    with no positive evidence is all zeros) and resized to the image.
    """
    network = unwrap(network)
    layer = layer or last_feature_map(network)
    probe = keras.Model(network.inputs, [network.get_layer(layer).output, network.outputs[0]])
    x = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    with tf.GradientTape() as tape:
        features, prob = probe(x, training=False)  # inference: no augmentation, no dropout
        target = tf.reduce_sum(prob[:, 0])  # each image's probability depends on itself only
    grads = tape.gradient(target, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
    top = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    cam = np.divide(cam, top, out=np.zeros_like(cam), where=top > 0)
    size = images.shape[1:3]
    return tf.image.resize(cam[..., None], size, method="bilinear").numpy()[..., 0].clip(0.0, 1.0)
