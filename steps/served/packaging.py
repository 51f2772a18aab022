"""The served model as train logs it: ``steps/served/serving.py`` as the model's code; as its artifacts the
Keras network, its ONNX and LiteRT exports with their preprocessing spec (model config ``runtime`` picks
what scores) and the drift check's reference profile; the model config built from the metadata
(``model_config``), the signature, a PNG serving example and the pinned requirements of a serving
environment; and the preprocessing spec written beside the exports. What the model computes is
``serving``'s alone.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from steps.core import contract
from steps.core.config import Config
from steps.monitoring.profile import PROFILE_ARTIFACT, PROFILE_FILE, Profile
from steps.served import serving

# What a serving environment installs (these versions of what steps/served/serving.py imports); the Metal
# plugin with its environment marker, so that a model trained on a Mac still installs where it is
# served (Linux, most often). steps.served.provenance refuses a model whose environment holds anything else.
PACKAGES = (
    "mlflow",
    "keras",
    "tensorflow",
    "tensorflow-metal",
    "pillow",
    "pandas",
    *(e.package for e in serving.EXPORTS.values()),
)
APPLE_SILICON = '; sys_platform == "darwin" and platform_machine == "arm64"'


def model_requirements() -> list[str]:
    """``PACKAGES`` pinned at the versions installed here (tensorflow-metal exists on Apple silicon only)."""
    requirements = []
    for name in PACKAGES:
        try:
            requirements.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    return [r + (APPLE_SILICON if r.startswith("tensorflow-metal==") else "") for r in requirements]


def png_bytes(image: np.ndarray) -> bytes:
    """A ``(h, w, 1)`` 0..255 image as PNG bytes: the served model's input example."""
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(image[:, :, 0]), 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def log_model(
    network: Any,
    config: Config,
    metadata: dict[str, Any],
    example: np.ndarray,
    exports: Mapping[str, Path] | None,
    profile: Profile | None = None,
) -> Any:
    """Log the network as the served model (``steps/served/serving.py``): bytes in, predictions out; its ModelInfo.

    The file steps/served/serving.py is logged as the model's code ("models from code"), so loading
    needs no file of this repository. ``example``: one preprocessed image, the serving example.
    ``exports``: ``steps.network.exports.write_exports``'s files, by runtime and ``spec``; None (or none
    of them: ``train.exports`` none) logs a model without exports, as models were logged before them.
    ``profile``: the validation images' reference for the drift check (``steps.monitoring.profile``),
    stored as the artifact ``PROFILE_ARTIFACT``; None logs a model without one.
    """
    # predict_batch_size, not batch_size: MLflow logs the config's keys as params too.
    served_config = model_config(metadata, predict_batch_size=config.infer.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        keras_file = Path(tmp) / "network.keras"
        network.save(keras_file)
        artifacts = {serving.KERAS_ARTIFACT: str(keras_file)}
        if exports:
            artifacts |= {key: str(exports[r]) for r, key in serving.EXPORT_ARTIFACTS.items() if r in exports}
            artifacts[serving.SPEC_ARTIFACT] = str(exports["spec"])
        if profile is not None:
            profile_file = Path(tmp) / PROFILE_FILE
            profile_file.write_text(profile.to_json())
            artifacts[PROFILE_ARTIFACT] = str(profile_file)
        return mlflow.pyfunc.log_model(
            name=contract.MODEL_ARTIFACT,
            python_model=str(Path(serving.__file__)),
            artifacts=artifacts,
            model_config=served_config,
            signature=signature(),
            # A DataFrame of PNG bytes: MLflow stores it base64, as a REST client sends it (the
            # Keras flavor's input_example fails, MLflow #16183; this pyfunc's does not).
            input_example=pd.DataFrame({serving.IMAGE: [png_bytes(example)]}),
            pip_requirements=model_requirements(),
            metadata=metadata,
        )


def preprocessing_spec(metadata: Mapping[str, Any], tta: str, files: Mapping[str, str]) -> dict[str, Any]:
    """What a caller without this repository, TensorFlow or MLflow needs to score with an export
    (``files``: its file name by runtime) as this model does: the spec train writes beside them."""
    size = int(metadata[serving.IMAGE_SIZE])
    return {
        "spec_version": 1,
        "files": dict(files),
        "input": {
            "name": "image",
            "shape": [None, size, size, 1],
            "layout": "NHWC",
            "dtype": "float32",
            "height": size,
            "width": size,
            "channels": 1,
        },
        "decode": (
            "8-bit gray: Pillow's convert('L') (ITU-R 601-2 luma; alpha ignored); 16-bit gray scaled by "
            "255/65535; EXIF orientation applied; the first frame of a multi-frame file"
        ),
        "resize": {
            "to": [size, size],
            "interpolation": "bilinear",
            "antialias": True,
            "pillow": "Image.fromarray(gray.astype('float32'), 'F').resize((width, height), Image.BILINEAR)",
        },
        # input = (gray * scale - mean) / std, gray in 0..255: the network normalises inside itself.
        "scale": 1.0,
        "mean": 0.0,
        "std": 1.0,
        "inside_the_model": f"the network's own normalisation; test-time augmentation: {tta}",
        "output": {"shape": [None, 1], "meaning": "defect probability"},
        "decision_threshold": serving.threshold_of(metadata),
        "classes": list(metadata[serving.CLASSES]),
        "rule": "defect (classes[1]) when the probability is at or above decision_threshold, else classes[0]",
    }


def model_config(
    metadata: Mapping[str, Any], predict_batch_size: int, *, read_paths: bool = False,
    max_request_pixels: int = serving.MAX_REQUEST_PIXELS, runtime: str = "keras",
) -> dict[str, Any]:  # fmt: skip
    """The model config, from a logged model's metadata: as train logs it, and as infer rebuilds it
    around a version's network. A served model does not open files its callers name (``read_paths``)."""
    return serving.check_config(
        {
            serving.CLASSES: list(metadata[serving.CLASSES]),  # [good, defect], as the model was trained
            serving.DECISION_THRESHOLD: serving.threshold_of(metadata),
            serving.IMAGE_SIZE: int(metadata[serving.IMAGE_SIZE]),
            "predict_batch_size": int(predict_batch_size),
            "read_paths": read_paths,
            "max_request_pixels": max_request_pixels,
            "runtime": runtime,
        }
    )


def signature():
    """Encoded image bytes in (or, where the loader allows, file paths), one ``OUTPUT`` row out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec(DataType.binary, serving.IMAGE, required=False),
                ColSpec(DataType.string, serving.PATH, required=False),
            ]
        ),
        outputs=Schema([ColSpec(DataType[kind], name) for name, kind in serving.OUTPUT.items()]),
        params=ParamSchema([ParamSpec("on_error", DataType.string, serving.ON_ERROR[0])]),
    )


def spark_result_type() -> str:
    """``OUTPUT`` as Spark's DDL schema, for ``mlflow.pyfunc.spark_udf``."""
    return ", ".join(f"{name} {kind}" for name, kind in serving.OUTPUT.items())
