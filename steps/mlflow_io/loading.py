"""Loading a registered model's network safely: only from this store, only the layout ``train`` logs, Keras in
safe mode, no file outside the model's folder (``load_keras``, ``pipeline_model_problem``, ``model_artifact``), and
the drift check's reference profile (``load_profile``)."""

from __future__ import annotations

import logging
import re
from pathlib import Path, PurePosixPath

import mlflow

from steps.core.errors import ModelError
from steps.monitoring.profile import PROFILE_ARTIFACT, Profile
from steps.served import serving
from steps.served.provenance import flavor_problem

logger = logging.getLogger(__name__)


def load_keras(model_uri: str):
    """The Keras network of a model in the configured store, with Keras's ``safe_mode`` on.

    Safe mode refuses a file that needs code to run to load (a ``Lambda`` layer's pickled
    bytecode): a model in the registry is data, never a program. Keras defaults to it; we insist.
    A served model (``steps.served.serving``) holds the network as an artifact, which is loaded on its
    own, so none of the model's logged code runs here; models logged before it are Keras models.
    Refused as well, before anything is loaded: a Keras model saved as a TensorFlow SavedModel
    (``tf.saved_model.load`` knows no safe mode) and a file named outside the model's directory.
    """
    import keras

    flavors = mlflow.models.get_model_info(model_uri).flavors
    try:
        if "keras" in flavors:
            conf = flavors["keras"]
            if conf.get("save_exported_model"):
                raise ModelError(
                    f"refused to load {model_uri}: a Keras model saved as a TensorFlow SavedModel "
                    "(save_exported_model), which loads without Keras's safe_mode; register a .keras model"
                )
            _inside_model(model_uri, str(conf.get("data", "data")))
            return mlflow.keras.load_model(model_uri, load_model_kwargs={"safe_mode": True})
        path = model_artifact(
            model_uri, serving.KERAS_ARTIFACT, "is not a model of this pipeline: it holds no Keras network", flavors
        )
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as err:
        if "safe_mode" not in str(err):
            raise
        raise ModelError(
            f"refused to load {model_uri}: it needs code execution to load (Keras safe_mode); "
            "register models built from the pipeline's own layers"
        ) from None


def model_artifact(model_uri: str, key: str, missing: str, flavors: dict | None = None) -> Path:
    """The local copy of a served model's artifact ``key`` (the Keras network, an export), after
    checking that the path its ``MLmodel`` gives stays inside the model; ``missing`` ends the error
    when the model has no such artifact."""
    if flavors is None:
        flavors = mlflow.models.get_model_info(model_uri).flavors
    artifact = flavors.get("python_function", {}).get("artifacts", {}).get(key, {}).get("path")
    if not artifact:
        raise ModelError(f"{model_uri} {missing}")
    _inside_model(model_uri, artifact)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri)).resolve()
    if not (local / artifact).resolve().is_relative_to(local):  # a link inside that leads out
        raise ModelError(f"refused to load {model_uri}: its file {artifact!r} leads outside the model")
    return local / artifact


def _inside_model(model_uri: str, path: str) -> None:
    """Refuse an ``MLmodel`` path that is absolute or climbs out of the model's directory."""
    parts = PurePosixPath(path.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or re.match(r"^[A-Za-z]:", path) or path.startswith("~"):
        raise ModelError(f"refused to load {model_uri}: its MLmodel names {path!r}, outside the model's directory")


def pipeline_model_problem(info) -> str | None:
    """Why a logged model is not one ``train`` logged (None when it is): its ``MLmodel`` must have
    this pipeline's layout: the served model's code, the Keras network as an artifact inside the
    model, and the metadata evaluate needs."""
    pyfunc = (info.flavors or {}).get("python_function", {})
    wrong = flavor_problem(info.flavors or {})
    if wrong:
        return wrong
    artifact = pyfunc.get("artifacts", {}).get(serving.KERAS_ARTIFACT, {}).get("path")
    if not artifact:
        return f"it holds no Keras network (artifact {serving.KERAS_ARTIFACT})"
    try:
        _inside_model(info.model_uri, str(artifact))
    except ModelError as err:
        return str(err).split(": ", 1)[1]
    metadata = info.metadata or {}
    missing = [key for key in (serving.IMAGE_SIZE, serving.CLASSES) if key not in metadata]
    return f"its metadata has no {', '.join(missing)}" if missing else None


def load_profile(model_uri: str, flavors: dict) -> Profile | None:
    """The reference profile stored inside a served model (``steps.monitoring.profile``); None for a
    version logged without one. A profile that cannot be read raises ``ValueError`` saying why."""
    artifacts = flavors.get("python_function", {}).get("artifacts", {})
    if PROFILE_ARTIFACT not in artifacts:
        return None
    path = model_artifact(model_uri, PROFILE_ARTIFACT, "has no reference profile", flavors)
    return Profile.from_json(path.read_text())
