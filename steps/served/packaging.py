"""The served model as train logs it: ``steps/served/serving.py`` as the model's code, the Keras network and
its ONNX and LiteRT exports with their preprocessing spec as its artifacts (model config ``runtime``
picks what scores), the model config built from the metadata (``serving.model_config``), the
signature (``serving.signature``), a PNG serving example and the pinned requirements of a serving
environment.
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
from steps.served import serving

# What a serving environment installs (these versions of what steps/served/serving.py imports); the Metal
# plugin with its environment marker, so that a model trained on a Mac still installs where it is
# served (Linux, most often). steps.served.provenance refuses a model whose environment holds anything else.
PACKAGES = ("mlflow", "keras", "tensorflow", "tensorflow-metal", "pillow", "pandas", "onnxruntime", "ai-edge-litert")
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
    network: Any, config: Config, metadata: dict[str, Any], example: np.ndarray, exports: Mapping[str, Path] | None
) -> Any:
    """Log the network as the served model (``steps/served/serving.py``): bytes in, predictions out; its ModelInfo.

    The file steps/served/serving.py is logged as the model's code ("models from code"), so loading
    needs no file of this repository. ``example``: one preprocessed image, the serving example.
    ``exports``: ``steps.network.exports.write_exports``'s files, by runtime and ``spec``; None (or none
    of them: ``train.exports`` none) logs a model without exports, as models were logged before them.
    """
    # predict_batch_size, not batch_size: MLflow logs the config's keys as params too.
    model_config = serving.model_config(metadata, predict_batch_size=config.infer.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        keras_file = Path(tmp) / "network.keras"
        network.save(keras_file)
        artifacts = {serving.KERAS_ARTIFACT: str(keras_file)}
        if exports:
            artifacts |= {key: str(exports[r]) for r, key in serving.EXPORT_ARTIFACTS.items() if r in exports}
            artifacts[serving.SPEC_ARTIFACT] = str(exports["spec"])
        return mlflow.pyfunc.log_model(
            name=contract.MODEL_ARTIFACT,
            python_model=str(Path(serving.__file__)),
            artifacts=artifacts,
            model_config=model_config,
            signature=serving.signature(),
            # A DataFrame of PNG bytes: MLflow stores it base64, as a REST client sends it (the
            # Keras flavor's input_example fails, MLflow #16183; this pyfunc's does not).
            input_example=pd.DataFrame({"image": [png_bytes(example)]}),
            pip_requirements=model_requirements(),
            metadata=metadata,
        )
