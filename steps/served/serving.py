"""The registered model: encoded image bytes in, one prediction per image out. Self-contained.

``train`` logs this file as the model's code (MLflow "models from code") beside the trained Keras
network and its exports, so a registered version loads wherever MLflow, Pillow and the runtime it
scores with (Keras/TensorFlow, onnxruntime or LiteRT) are installed, with no file of this
repository: ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and ``mlflow.pyfunc.spark_udf``
all run it. The pipeline's own steps import the same decoder and resize
(``steps.datasets.data``, ``steps.network.model``), so training, evaluation and serving treat an image identically.
Nothing here may import ``steps``: this file is all the model's code.

Input, a DataFrame with one of:

- ``image`` (binary): the encoded file, PNG, JPEG, BMP, TIFF, GIF or WebP (no other format is
  opened), any size, gray, RGB, RGBA, palette, 16- or 32-bit. Over REST, base64 in
  ``dataframe_split`` (MLflow decodes binary columns).
- ``path`` (string): a file to read. Only read when the model is loaded with
  ``model_config={"read_paths": True}``: a served model must not open files named by its callers.

Params: ``on_error`` = ``"raise"`` (default: an image that cannot be decoded fails the call with an
``MlflowException`` INVALID_PARAMETER_VALUE naming the row and the reason, HTTP 400 from the scoring
server) or ``"row"`` (that row gets the reason in ``error`` and no prediction; the rest are scored).

Output, one row per input row: ``predicted_class`` (the good or defect class name),
``defect_probability`` (None, JSON null, where the image could not be used),
``decision_threshold`` (the model's own cut-off, tuned on validation by train: defect when the
probability is at or above it) and ``error`` (empty, or why the image could not be used).

Model config (``train`` logs it; ``mlflow.pyfunc.load_model(..., model_config=...)`` overrides a key):
``classes`` ([good, defect] names), ``decision_threshold``, ``image_size``, ``predict_batch_size``,
``read_paths`` (true or false, nothing else), ``max_request_pixels`` (the most pixels one call may
decode, summed over its images from their headers before any is decoded; a call over it is refused
whole, HTTP 400; 0 for no limit), ``runtime`` (``keras``, the default: the Keras network; ``onnx``
or ``litert``: the network's export among the model's artifacts, scored by onnxruntime or LiteRT's
interpreter, with Pillow's resize, and TensorFlow never imported; same decoding, columns and errors,
probabilities within 1e-4).

Preprocessing is the training loader's, one image at a time: decode to 8-bit gray (``decode_gray``)
and at once resize to the trained size with the Keras resize (``resize``), so no more than one
full-size image is held at a time; the network scales 0..255 as it needs itself.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image, ImageOps, UnidentifiedImageError

# The Keras network's key among the model's artifacts.
KERAS_ARTIFACT = "keras_model"
SPEC_ARTIFACT = "preprocessing_spec"
# The served model's contract, whose one home this file is (the library imports it from here).
# The input columns: encoded bytes, or (where the loader allows) a file to read.
IMAGE, PATH = "image", "path"
# The output, one row per image: column and type (Spark's and MLflow's names for it).
PREDICTED_CLASS, DEFECT_PROBABILITY, DECISION_THRESHOLD, ERROR = (
    "predicted_class", "defect_probability", "decision_threshold", "error",
)  # fmt: skip
OUTPUT = {PREDICTED_CLASS: "string", DEFECT_PROBABILITY: "double", DECISION_THRESHOLD: "double", ERROR: "string"}
COLUMNS = tuple(OUTPUT)
ON_ERROR = ("raise", "row")
# The model's metadata and config keys train writes: its [good, defect] class names, its input size
# and its own cut-off (DECISION_THRESHOLD, tuned on validation).
CLASSES, IMAGE_SIZE = "classes", "image_size"
# The reference cut-off: every version's acc is measured at it, so versions compare alike; also the
# cut-off of a model logged without one of its own.
REFERENCE_CUTOFF = 0.5

# --- Decoding ----------------------------------------------------------------------------


class ImageError(ValueError):
    """One image cannot be used; the message says why, in words a person can act on."""


# An 8k x 8k line-scan frame (64 MP) fits; a decompression bomb does not. Checked from the header,
# before any pixel is decoded, and below Pillow's own limit (about 89 MP), which stays on as well.
MAX_PIXELS = 8192 * 8192
# Each side too: a 67,000,000 x 1 image is under the pixel cap, yet its resize took 15 GB.
MAX_SIDE = 16384
# Per call: sixteen 4k or four 8k frames. Each image is resized as soon as it is decoded, so memory
# does not grow with this; decoding time does, and a server keeps decoding after its own timeout.
MAX_REQUEST_PIXELS = 16 * 4096 * 4096
# The only formats opened. Pillow reads forty; each is parsing code an upload can reach, and EPS
# hands the file to Ghostscript where it is installed. (A JPEG may open as its MPO variant.)
# The one list of them, with their file suffixes (infer and the data folders pick files by these).
SUFFIXES = {
    "PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "BMP": (".bmp",), "TIFF": (".tif", ".tiff"), "GIF": (".gif",),
    "WEBP": (".webp",),
}  # fmt: skip
FORMATS = tuple(SUFFIXES)
FORMAT_NAMES = ", ".join(FORMATS[:-1]).replace("WEBP", "WebP") + " or " + FORMATS[-1].replace("WEBP", "WebP")
# Gray levels wider than 8 bits, scaled by their mode's full range, never by the file's own maximum,
# so one value decodes alike in every file. Pillow's "I" is 32-bit signed; negative values are 0.
_RANGE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 2**31 - 1}
# Rows converted at a time, so a 64 MP 16-bit frame never needs a full-size int64 copy.
_STRIP = 512


def decode_gray(source: Path | str | bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file (a path or its bytes) to a ``(height, width, 1)`` uint8 grayscale array.

    RGB, RGBA and palette images are converted to luminance (alpha is ignored); 16-bit images are
    scaled, not clipped, to 8 bits; EXIF orientation is applied, as a viewer would show the image;
    a multi-frame file gives its first frame. Anything that cannot be decoded raises ``ImageError``
    saying why: an empty file, not an image, truncated or corrupt data, too many pixels, 32-bit float.
    """
    try:
        data = bytes(source) if isinstance(source, bytes | bytearray) else Path(source).read_bytes()
    except OSError as err:
        raise ImageError(f"cannot read the file: {err.strerror or err}") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice that; a bomb is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ImageError(_too_large(width, height, max_pixels))
                if max(width, height) > MAX_SIDE:
                    raise ImageError(
                        f"{width}x{height} has a side over {MAX_SIDE:,} pixels (a decompression bomb, or an image "
                        "to downscale first)"
                    )
                if opened.mode == "F":
                    raise ImageError("32-bit float pixels have no fixed range; save the image as 8- or 16-bit")
                image = ImageOps.exif_transpose(opened)
                if image.mode in _RANGE:
                    # Pillow before 10.4 opens a 16-bit PNG as "I": its range is still 16 bits.
                    top = 65535 if image.format == "PNG" or opened.format == "PNG" else _RANGE[image.mode]
                    gray = _scale_wide(np.asarray(image), top)
                else:
                    gray = np.asarray(image.convert("L"), dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not a {FORMAT_NAMES} image ({len(data)} bytes); no other format is read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow's own limit (about 89 MP) fired before ours could: its message has the size.
        raise ImageError(f"a decompression bomb, or an image to downscale first ({err})") from None
    except Exception as err:  # noqa: BLE001 - corrupt data makes Pillow raise many types (OSError, SyntaxError, ...)
        raise ImageError(f"corrupt or truncated image data ({type(err).__name__}: {err})") from None
    if gray.ndim != 2 or gray.size == 0:
        raise ImageError(f"decoded to an unusable array of shape {gray.shape}")
    return gray[:, :, None]


def _scale_wide(wide: np.ndarray, top: int) -> np.ndarray:
    """16- or 32-bit gray levels to 0..255 by ``top``, the mode's full range, a strip of rows at a time."""
    gray = np.empty(wide.shape, dtype=np.uint8)
    for start in range(0, wide.shape[0], _STRIP):
        strip = wide[start : start + _STRIP].astype(np.int64)
        gray[start : start + _STRIP] = np.clip(strip * 255 // top, 0, 255)
    return gray


def header_pixels(source: Path | str | bytes | None) -> int:
    """Width x height from the header alone (no pixel decoded); 0 when it cannot be read (decoding says why)."""
    if source is None:
        return 0
    try:
        opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS)
    except Exception:  # noqa: BLE001 - decode_gray reports the reason for this row
        return 0
    with opened:
        return opened.size[0] * opened.size[1]


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return (
        f"{width}x{height} is {width * height:,} pixels, more than the limit of {max_pixels:,} "
        "(a decompression bomb, or an image to downscale first)"
    )


# --- Resizing ----------------------------------------------------------------------------

# One resize for the training loader, this model and the network's own Resizing layer.
RESIZE = {"interpolation": "bilinear", "antialias": True}
# A side more than this many times the network's input is first shrunk by Pillow's box reduction, by
# a whole factor, to between REDUCE_ABOVE and twice that: the antialiased resize of a full 64 MP
# frame held a float copy and intermediates of 0.8 GB, and 2.6 GB for a 4,000,000 x 1 line. Smaller
# images (every ELPV cell, at every trained size) are resized exactly as before.
REDUCE_ABOVE = 4


def shrink(gray: np.ndarray, image_size: int) -> np.ndarray:
    """A ``(h, w, 1)`` uint8 image whose sides are at most about ``2 * REDUCE_ABOVE * image_size``."""
    factors = [max(1, side // (REDUCE_ABOVE * image_size)) for side in (gray.shape[1], gray.shape[0])]
    if factors == [1, 1] or gray.dtype != np.uint8:
        return gray
    return np.asarray(Image.fromarray(gray[:, :, 0]).reduce(tuple(factors)))[:, :, None]


def resize_pil(gray: np.ndarray, image_size: int) -> np.ndarray:
    """``resize`` with Pillow, for the runtimes without TensorFlow: a ``(h, w, 1)`` image, float32.

    Pillow's bilinear filter widens with the scale when it shrinks, as the antialiased Keras resize
    does: on ELPV cells, 300 px to 32-224 px, the two differ by at most 0.002 gray levels of 255.
    """
    gray = shrink(gray, image_size)
    if gray.shape[0] == image_size and gray.shape[1] == image_size:
        return np.asarray(gray, dtype=np.float32)
    image = Image.fromarray(np.asarray(gray[:, :, 0], dtype=np.float32), mode="F")
    return np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.float32)[:, :, None]


def resize(images: np.ndarray, image_size: int) -> np.ndarray:
    """Resize ``(h, w, c)`` or ``(n, h, w, c)`` images as the network's first layer does; float32.

    Not rounded back to uint8, so a training image resized here and a raw image resized inside
    the served model reach the convolutions as the same numbers. One decoded image far larger than
    the input is ``shrink``-ed first.
    """
    if images.ndim == 3:
        images = shrink(images, image_size)
    images = np.asarray(images, dtype=np.float32)
    if images.shape[-3] == image_size and images.shape[-2] == image_size:
        return images
    import keras  # here, so that decoding alone does not start TensorFlow

    return keras.ops.convert_to_numpy(keras.ops.image.resize(images, (image_size, image_size), **RESIZE))


# --- The model ---------------------------------------------------------------------------


class BadInput(MlflowException):
    """A request the model refuses: HTTP 400 from the scoring server, with this reason alone.

    The scoring server rewrites an ``MlflowException``'s message to begin with the whole request
    ("Failed to predict data '<every uploaded byte>'"): a reply that echoes a caller's upload back,
    and can be megabytes long. The first message set is kept; later rewrites are ignored.
    """

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_reason"):
            self._reason = value


def _bad_input(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE: the scoring server answers HTTP 400 with this message.
    return BadInput(message, error_code=INVALID_PARAMETER_VALUE)


# --- The exports' runtimes and the model's config ------------------------------------------


class OnnxNetwork:
    """An ONNX export behind ``predict_on_batch``, the one call ``DefectModel`` makes, on onnxruntime."""

    def __init__(self, path: Path | str) -> None:
        import onnxruntime

        self._session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: np.ascontiguousarray(images, dtype=np.float32)})[0]


class LiteRTNetwork:
    """A LiteRT export behind ``predict_on_batch``, on LiteRT's interpreter."""

    def __init__(self, path: Path | str) -> None:
        from ai_edge_litert.interpreter import Interpreter

        # Every core, as onnxruntime and TensorFlow use: the interpreter's default is one thread.
        self._interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._shape: tuple[int, ...] = ()

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.shape != self._shape:  # the interpreter's tensors are sized per batch shape
            self._interpreter.resize_tensor_input(self._input, images.shape)
            self._interpreter.allocate_tensors()
            self._shape = images.shape
        self._interpreter.set_tensor(self._input, images)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output).copy()


class Export(NamedTuple):
    """An export of the network (steps.network.exports writes it): how it is run and where it is kept."""

    network: type[OnnxNetwork] | type[LiteRTNetwork]
    package: str  # the runtime's package
    artifact: str  # its key among the model's artifacts
    file: str  # its file name, in the model and in the train run's exports/


# The one table of exports. What scores the images (model config ``runtime``): the Keras network, or
# one of these (the same network, converted by train).
EXPORTS = {
    "onnx": Export(OnnxNetwork, "onnxruntime", "onnx_model", "model.onnx"),
    "litert": Export(LiteRTNetwork, "ai-edge-litert", "litert_model", "model.tflite"),
}
RUNTIMES = ("keras", *EXPORTS)
EXPORT_ARTIFACTS = {runtime: export.artifact for runtime, export in EXPORTS.items()}


def load_export(runtime: str, path: Path | str) -> OnnxNetwork | LiteRTNetwork:
    """The export at ``path`` in its own runtime; a missing runtime or an unreadable file raises an
    ``MlflowException`` with one line naming it."""
    network, package = EXPORTS[runtime].network, EXPORTS[runtime].package
    try:
        return network(path)
    except ImportError as err:
        raise MlflowException(f"runtime {runtime} needs the package {package} ({err}); pip install {package}") from None
    except Exception as err:  # noqa: BLE001 - each runtime raises its own types for a bad file
        line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise MlflowException(f"the {runtime} export {path} cannot be loaded: {line}") from None


def threshold_of(values: Mapping[str, Any] | None) -> float:
    """The decision threshold in a model's config or metadata (defect at or above it)."""
    return float((values or {}).get(DECISION_THRESHOLD, REFERENCE_CUTOFF))


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """The model config, its types checked: a wrong one fails at load time, naming the key."""
    read_paths = config.get("read_paths", False)
    if not isinstance(read_paths, bool):
        # The string "false" is truthy: only a real boolean may open files.
        raise MlflowException(
            f"model config read_paths: expected true or false, got {read_paths!r}", error_code=INVALID_PARAMETER_VALUE
        )
    cap = config.get("max_request_pixels", MAX_REQUEST_PIXELS)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise MlflowException(
            f"model config max_request_pixels: expected a whole number >= 0 (0: no limit), got {cap!r}",
            error_code=INVALID_PARAMETER_VALUE,
        )
    runtime = config.get("runtime", "keras")
    if runtime not in RUNTIMES:
        raise MlflowException(
            f"model config runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}",
            error_code=INVALID_PARAMETER_VALUE,
        )
    return config


class DefectModel(PythonModel):
    """Defect or good for encoded images; see the module docstring for the contract."""

    def __init__(self, network=None, config: dict[str, Any] | None = None) -> None:
        """MLflow builds it empty and calls ``load_context``; the pipeline passes a network directly."""
        self.network = network
        self.config: dict[str, Any] = check_config(dict(config or {}))

    def load_context(self, context) -> None:
        self.config = check_config(dict(context.model_config or {}))
        if self.runtime != "keras":
            if EXPORT_ARTIFACTS[self.runtime] not in context.artifacts:
                raise MlflowException(
                    f"model config runtime {self.runtime}: this model has no {self.runtime} export (trained "
                    "without it, or before train exported); retrain it, or use runtime keras"
                )
            self.network = load_export(self.runtime, context.artifacts[EXPORT_ARTIFACTS[self.runtime]])
            return
        import keras

        # safe_mode: a registered network is data; a layer that needs code to load is refused.
        # compile=False: serving needs no optimizer or loss.
        self.network = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False, safe_mode=True)

    @property
    def runtime(self) -> str:
        return str(self.config.get("runtime", "keras"))

    @property
    def classes(self) -> list[str]:
        return list(self.config[CLASSES])

    @property
    def threshold(self) -> float:
        return threshold_of(self.config)

    @property
    def image_size(self) -> int:
        return int(self.config[IMAGE_SIZE])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        on_error = (params or {}).get("on_error", "raise")
        if on_error not in ON_ERROR:
            raise _bad_input(f"param on_error: expected one of {', '.join(ON_ERROR)}, got {on_error!r}")
        sources = self.sources(model_input)
        self.check_pixels(sources)
        prob = np.full(len(sources), np.nan)
        errors: dict[int, str] = {}
        for start, images, failed in self.batches(sources):
            if failed and on_error == "raise":
                row = start + min(failed)
                raise _bad_input(
                    f"row {row} of {len(sources)} cannot be used: {failed[min(failed)]} (send {FORMAT_NAMES} "
                    "bytes; or pass params on_error=row to get a row each and the rest scored)"
                )
            usable = [i for i in range(len(images)) if i not in failed]
            if usable:
                prob[[start + i for i in usable]] = self.network.predict_on_batch(images[usable]).reshape(-1)
            errors.update({start + i: reason for i, reason in failed.items()})
        return self.frame(prob, errors)

    def batches(self, sources: list[Any]) -> Iterator[tuple[int, np.ndarray, dict[int, str]]]:
        """``(first row, images, {index in batch: reason})`` per batch, decoded ahead of the network.

        A thread decodes and resizes the next batches while the network scores this one: Pillow and
        TensorFlow release the GIL, and the network alone leaves part of the cores idle. (Two decoding
        threads measured no faster on 2 cores: they compete with TensorFlow's own threads.)
        """
        size = int(self.config.get("predict_batch_size", 64))
        if len(sources) <= size:  # one batch (a REST request): nothing to overlap, no thread to start
            yield 0, *self.preprocess(sources)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead: deque[tuple[int, Future]] = deque()
            for start in range(0, len(sources), size):
                ahead.append((start, pool.submit(self.preprocess, sources[start : start + size])))
                if len(ahead) > 2:  # at most two batches waiting: bounded memory
                    first, done = ahead.popleft()
                    yield first, *done.result()
            while ahead:
                first, done = ahead.popleft()
                yield first, *done.result()

    def check_pixels(self, sources: list[Any]) -> None:
        """Refuse a call whose images hold more pixels than ``max_request_pixels``, before decoding any."""
        cap = self.config.get("max_request_pixels", MAX_REQUEST_PIXELS)
        if not cap:
            return
        total = 0
        for source in sources:
            total += header_pixels(source)
            if total > cap:
                raise _bad_input(
                    f"the {len(sources)} images of this request hold more than {cap:,} pixels together (model "
                    "config max_request_pixels); send fewer or smaller images per request"
                )

    def sources(self, model_input) -> list[Any]:
        """The encoded bytes (or, if allowed, paths) of each row, from a DataFrame or a list of bytes."""
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame({IMAGE: list(model_input)})
        if IMAGE in model_input.columns:
            return [_as_bytes(v) for v in model_input[IMAGE]]
        if PATH in model_input.columns:
            if self.config.get("read_paths", False) is not True:
                raise _bad_input(
                    "column path: this model does not read files (a served model must not open files its "
                    "callers name); send the encoded bytes in column image, or load it with "
                    "model_config={'read_paths': True}"
                )
            return [str(v) for v in model_input[PATH]]
        raise _bad_input(f"expected a column image (encoded bytes) or path; got {list(model_input.columns)}")

    def preprocess(self, sources: list[Any]) -> tuple[np.ndarray, dict[int, str]]:
        """``(n, size, size, 1)`` float32 pixels, 0..255, and ``{row: reason}`` of those that failed (zeros)."""
        size = self.image_size
        out = np.zeros((len(sources), size, size, 1), dtype=np.float32)
        errors: dict[int, str] = {}
        for row, source in enumerate(sources):
            try:
                if source is None:
                    raise ImageError("no image in this row")
                # Resized as soon as decoded, as the training loader does: one full-size image at a
                # time, whatever the batch holds (stacking them first took 3.4 GB for four 8k frames).
                gray = decode_gray(source)
                # The exports' runtimes go without TensorFlow: Pillow's resize, the same to 0.002 of 255.
                out[row] = resize(gray, size) if self.runtime == "keras" else resize_pil(gray, size)
            except ImageError as err:
                errors[row] = str(err)
        return out, errors

    def frame(self, prob: np.ndarray, errors: dict[int, str]) -> pd.DataFrame:
        """The output rows: a class and probability for each usable image, the reason for the rest."""
        good, defect = self.classes
        rows = []
        for i in range(len(prob)):
            if i in errors:
                rows.append({PREDICTED_CLASS: "", DEFECT_PROBABILITY: None,
                             DECISION_THRESHOLD: self.threshold, ERROR: errors[i]})  # fmt: skip
            else:
                p = float(prob[i])
                rows.append({PREDICTED_CLASS: defect if p >= self.threshold else good, DEFECT_PROBABILITY: p,
                             DECISION_THRESHOLD: self.threshold, ERROR: ""})  # fmt: skip
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        if errors:
            # None, not NaN, for a row without a probability: NaN is not JSON, and the scoring server
            # would send it as is. Spark reads None as null too.
            frame[DEFECT_PROBABILITY] = frame[DEFECT_PROBABILITY].astype(object).where(frame[ERROR] == "", None)
        return frame


def _as_bytes(value: Any) -> bytes | None:
    """A cell of column image as bytes: bytes, bytearray or memoryview (Arrow and Spark give these)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise _bad_input(f"column image: expected encoded image bytes, got {type(value).__name__}")


# Run by MLflow when it loads the logged copy of this file; harmless when the pipeline imports it.
mlflow.models.set_model(DefectModel())
