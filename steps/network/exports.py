"""Exports of a trained network for scoring without TensorFlow: ONNX and LiteRT, with a preprocessing spec.

``write_exports`` turns the trained network into the graph both formats hold and writes, into one
folder, those of ``train.exports`` (both by default): ``model.onnx`` (Keras's
``export(format="onnx")``, through tf2onnx) and ``model.tflite`` (``export(format="litert")``),
with ``preprocessing.json`` (``packaging.preprocessing_spec``). Each file takes float32 gray
levels, ``(n, size, size, 1)`` in 0..255, already resized, and returns the defect probability
``(n, 1)``: the network's normalisation and its test-time augmentation are inside.

What the exported graph leaves out of the Keras model, and why:

- the ``Resizing`` layers: their antialiased resize is TensorFlow's ``ScaleAndTranslate``, which
  neither tf2onnx nor the LiteRT converter supports (both exports fail with it). The caller resizes
  (the spec says how; ``serving.resize_pil`` does it without TensorFlow, to within 0.002 of 255);
- ``Normalization``'s constants become a ``Rescaling``: the layer keeps its mean and variance as
  tensors made outside the traced function, which tf2onnx leaves as inputs of the graph;
- the test-time views are stacked along the batch and scored by one copy of the network, then
  averaged, where the Keras model calls it once a view: the same numbers, and an eighth of the
  graph to convert (53 s against 5 s for EfficientNet-Lite0 with eight views, AMD EPYC Zen 4).

``check_parity`` scores images with each export's own runtime (``serving.load_export``) and compares
the defect probabilities with Keras's: a difference over ``PARITY_TOLERANCE``, or any predicted
class that differs, raises ``PipelineError`` with one line naming the export.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from steps.core.errors import PipelineError, first_line
from steps.datasets.stored import Rows
from steps.network.model import TTA_VIEWS
from steps.served import packaging, serving

logger = logging.getLogger(__name__)

# The largest difference from Keras's defect probability an export may have.
PARITY_TOLERANCE = 1e-4
# Validation images train checks each export on: 64 take 5 s with EfficientNet-Lite0 and eight
# views on 2 cores, all 394 of ELPV took 30 s a set; evaluate checks every test image.
PARITY_SAMPLE = 64
# Images per batch of the parity check, whatever the stages' batch size. The views multiply a batch
# by eight, and each runtime keeps its largest batch's buffers while it lives: 64 images at 192 px
# held 4.4 GiB in onnxruntime and 2.3 in LiteRT, 8 held 0.7 and 0.3, and ran faster (make bench-parity).
PARITY_BATCH = 8
# The files in an export folder, by runtime; the spec beside them.
FILES = {runtime: export.file for runtime, export in serving.EXPORTS.items()}
SPEC_FILE = "preprocessing.json"


def tta_views(x, tta: str) -> list:
    """The test-time views of ``steps.network.model.with_tta`` (its ``TTA_VIEWS``), by plain tensor ops."""
    views = []
    for up_down, left_right, diagonal in TTA_VIEWS[tta]:
        view = keras.ops.flip(x, 1) if up_down else x
        view = keras.ops.flip(view, 2) if left_right else view
        views.append(keras.ops.transpose(view, (0, 2, 1, 3)) if diagonal else view)
    return views


class ExportGraph(keras.Model):
    """The graph the exports hold: the views along the batch, the network once, their mean.

    Only traced, never saved as a Keras file: it needs no ``safe_mode``-loadable layers.
    """

    def __init__(self, network: keras.Model, tta: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.network = network
        self.tta = tta

    def call(self, x):
        views = tta_views(x, self.tta)
        # training=False by name: a bare call would let Resizing's training=True default reach
        # batch norm (Keras 3.15), and the traced graph would normalise by the batch's statistics.
        prob = self.network(keras.ops.concatenate(views, axis=0), training=False)
        return keras.ops.mean(keras.ops.reshape(prob, (len(views), -1, 1)), axis=0)


def fixed_size(network: keras.Model, size: int) -> keras.Model:
    """A copy of ``network`` on ``(size, size, 1)`` input with its weights, its ``Resizing`` layers
    as ``Identity`` and its ``Normalization`` as the equal ``Rescaling`` (see the module docstring)."""

    def clone(layer):
        if isinstance(layer, layers.Resizing):
            return layers.Identity(name=layer.name)
        if isinstance(layer, layers.Normalization):
            mean = np.asarray(layer.mean, dtype="float64").reshape(-1)
            std = np.maximum(np.sqrt(np.asarray(layer.variance, dtype="float64").reshape(-1)), keras.config.epsilon())
            return layers.Rescaling(scale=(1 / std).tolist(), offset=(-mean / std).tolist(), name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(network, clone_function=clone, input_tensors=keras.Input((size, size, 1)))
    copy.set_weights(network.get_weights())
    return copy


def export_graph(network: keras.Model, size: int, tta: str) -> keras.Model:
    """The trained ``network`` (without its test-time views) as the exports' graph."""
    graph = ExportGraph(fixed_size(network, size), tta, name="defect_export")
    graph(np.zeros((1, size, size, 1), dtype="float32"))  # built before export traces it
    return graph


def write_exports(
    network: keras.Model, size: int, tta: str, metadata: Mapping[str, Any], folder: Path, formats: Sequence[str]
) -> dict[str, Path]:
    """Write the exports in ``formats`` (runtimes of ``FILES``) and the spec into ``folder``; their
    paths by runtime (and ``spec``)."""
    folder.mkdir(parents=True, exist_ok=True)
    graph = export_graph(network, size, tta)
    signature = [keras.InputSpec(shape=(None, size, size, 1), dtype="float32", name="image")]
    paths = {}
    for runtime in formats:
        name = FILES[runtime]
        paths[runtime] = folder / name
        logger.info("exporting the network to %s", runtime)
        try:
            graph.export(str(paths[runtime]), format=runtime, input_signature=signature, verbose=False)
        except Exception as err:  # noqa: BLE001 - a converter raises many types; the run must say which failed
            raise PipelineError(f"the {runtime} export failed: {type(err).__name__}: {first_line(err, 300)}") from None
    paths["spec"] = folder / SPEC_FILE
    spec = packaging.preprocessing_spec(metadata, tta, {runtime: FILES[runtime] for runtime in formats})
    paths["spec"].write_text(json.dumps(spec, indent=2) + "\n")
    return paths


def check_parity(
    paths: Mapping[str, Path], images: np.ndarray | Rows, keras_prob: np.ndarray, threshold: float
) -> dict[str, float]:
    """Each export's largest difference from Keras's defect probabilities on ``images`` (resized,
    0..255), by runtime; ``PipelineError`` naming the export when one is over the tolerance or
    predicts another class."""
    keras_prob = np.asarray(keras_prob, dtype="float64").reshape(-1)
    worst = {}
    for runtime in (r for r in FILES if r in paths):
        network = serving.load_export(runtime, paths[runtime])
        prob = np.concatenate(
            [
                network.predict_on_batch(images[i : i + PARITY_BATCH]).reshape(-1)
                for i in range(0, len(images), PARITY_BATCH)
            ]
        ).astype("float64")
        worst[runtime] = float(np.max(np.abs(prob - keras_prob))) if len(prob) else 0.0
        flipped = int(np.sum((prob >= threshold) != (keras_prob >= threshold)))
        if worst[runtime] > PARITY_TOLERANCE or flipped:
            raise PipelineError(
                f"the {runtime} export {paths[runtime].name} does not match Keras on {len(prob)} images: "
                f"largest difference {worst[runtime]:.2e} (tolerance {PARITY_TOLERANCE:.0e}), {flipped} classes differ"
            )
        logger.info("%s export: largest difference from Keras %.2e on %d images", runtime, worst[runtime], len(prob))
    return worst
