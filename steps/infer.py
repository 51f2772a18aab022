"""Entry point ``infer``: predict defect or good for images with the production model.

Parameters (an empty value keeps ``conf/``): ``input`` (an image file, a directory searched
recursively, or a glob), ``model_uri`` (default ``models:/Production_Reg@prod``), ``output`` (the
CSV to write), ``experiment``.

Writes the CSV at ``output``: one row per input image with ``path``, ``predicted_class``,
``defect_probability``, ``decision_threshold`` (the model's own cut-off, tuned on validation by
train; 0.5 for a model without one) and ``error`` (empty, or why the image could not be read; such
a row has no prediction and the rest of the batch still runs). In experiment ``infer/<experiment>`` one run
with tags ``model_uri`` and ``model_version``, metrics ``n_images``, ``n_defect``, ``n_errors``,
and the CSV as an artifact. Prints a one-line summary.
"""

from __future__ import annotations

import csv
import glob
import logging
from collections import defaultdict
from pathlib import Path

import mlflow
import numpy as np

from steps import cli, contract
from steps.config import Config
from steps.data import decode_gray, is_image
from steps.scoring import model_cutoff
from steps.tracking import PipelineError, alias_version, log_config, stage_run

logger = logging.getLogger(__name__)

COLUMNS = ("path", "predicted_class", "defect_probability", "decision_threshold", "error")


def resolve_inputs(spec: str) -> list[Path]:
    """An image file, a directory (recursive) or a glob, as a sorted list of image files."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if is_image(p))
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if is_image(Path(p)))
    if not files:
        raise PipelineError(f"infer: no images found at {spec!r} (an image file, a directory or a glob)")
    return files


def load_production_model(model_uri: str):
    """The Keras model, its metadata and its registered version (None for a runs:/ URI)."""
    version = None
    if model_uri.startswith("models:/") and "@" in model_uri:
        name, alias = model_uri.removeprefix("models:/").split("@", 1)
        version = alias_version(name, alias)
        if version is None:
            raise PipelineError(
                f"no model at {model_uri}: no version of {name!r} has the alias {alias!r} yet; run "
                "`mlflow run . -e main` (or evaluate a run that passes the threshold) first"
            )
        model_uri = f"models:/{name}/{version}"  # pin the version we report, even if the alias moves
    try:
        metadata = mlflow.models.get_model_info(model_uri).metadata
        return mlflow.keras.load_model(model_uri), metadata, version
    except mlflow.exceptions.MlflowException as err:
        raise PipelineError(f"cannot load {model_uri}: {err.message}") from None


def predict_files(
    model, files: list[Path], classes: list[str], batch_size: int, cutoff: float = 0.5
) -> list[dict[str, str]]:
    """One row per file, defect when its probability >= ``cutoff``; images of one size are batched together."""
    rows: dict[Path, dict[str, str]] = {}
    by_shape: dict[tuple[int, ...], list[tuple[Path, np.ndarray]]] = defaultdict(list)
    for path in files:
        try:
            image = decode_gray(path)
        except Exception as err:  # noqa: BLE001 - one bad file must not stop the batch
            rows[path] = {
                "path": str(path),
                "predicted_class": "",
                "defect_probability": "",
                "decision_threshold": "",
                "error": f"{type(err).__name__}: {err}",
            }
            continue
        by_shape[image.shape].append((path, image))
    for group in by_shape.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            x = np.stack([image for _, image in chunk]).astype(np.float32)
            prob = model.predict(x, verbose=0).reshape(-1)
            for (path, _), p in zip(chunk, prob, strict=True):
                rows[path] = {
                    "path": str(path),
                    "predicted_class": classes[int(p >= cutoff)],
                    "defect_probability": f"{p:.6f}",
                    "decision_threshold": f"{cutoff:.6f}",
                    "error": "",
                }
    return [rows[path] for path in files]


def infer(config: Config) -> str:
    """Predict, write the CSV, log the run; return the infer run's ID."""
    files = resolve_inputs(config.infer_input)
    model, metadata, version = load_production_model(config.infer_model_uri)
    classes = list(metadata["classes"])  # [good, defect], as the model was trained
    cutoff = model_cutoff(metadata)
    output = Path(config.infer.output)

    with stage_run(contract.STAGE_INFER, config.experiment) as run:
        log_config(config)
        mlflow.set_tags({contract.TAG_MODEL_URI: config.infer_model_uri, contract.TAG_MODEL_VERSION: version or ""})
        logger.info("scoring %d images with %s (version %s)", len(files), config.infer_model_uri, version)
        rows = predict_files(model, files, classes, config.infer.batch_size, cutoff)
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        n_errors = sum(1 for r in rows if r["error"])
        n_defect = sum(1 for r in rows if r["predicted_class"] == classes[1])
        mlflow.log_metrics(
            {
                contract.METRIC_N_IMAGES: len(rows),
                contract.METRIC_N_DEFECT: n_defect,
                contract.METRIC_N_ERRORS: n_errors,
            }
        )
        mlflow.log_artifact(str(output))

    print(
        f"{len(rows)} images scored with {config.infer_model_uri} (version {version}): "
        f"{n_defect} {classes[1]}, {len(rows) - n_defect - n_errors} {classes[0]}, {n_errors} unreadable -> {output}"
    )
    if n_errors:
        logger.warning("%d images could not be read; see the error column of %s", n_errors, output)
    return run.info.run_id


OVERRIDES = {
    "input": "infer.input",
    "model_uri": "infer.model_uri",
    "output": "infer.output",
    "experiment": "experiment",
}

if __name__ == "__main__":
    cli.main(infer, "Predict defect or good for images with the production model.", OVERRIDES)
