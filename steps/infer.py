"""Entry point ``infer``: predict defect or good for images with the production model.

Parameters (an empty value keeps ``conf/``): ``input`` (an image file, a directory searched
recursively, or a glob), ``model_uri`` (default ``models:/Production_Reg@prod``; only a version or
alias of the configured registry, or a ``runs:/`` model of the configured store), ``output`` (the
CSV to write: not a directory, in a writable place; checked before any work), ``experiment``.

Writes the CSV at ``output``: one row per input image with ``path``, ``predicted_class``,
``defect_probability``, ``decision_threshold`` (the model's own cut-off, tuned on validation by
train; 0.5 for a model without one) and ``error`` (empty, or why the image could not be read: the
decoder's reason, or a symlink leading out of the input directory, which is never followed; such a
row has no prediction and the rest of the batch still runs). Nothing else is written on disk. In
experiment ``infer/<experiment>`` one run with tags ``model_uri`` and ``model_version``, metrics
``n_images``, ``n_defect``, ``n_errors``, and the CSV as an artifact. Prints a one-line summary.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from collections import defaultdict
from pathlib import Path

import mlflow
import numpy as np

from steps import cli, contract
from steps.config import Config
from steps.data import ImageError, decode_gray, is_image
from steps.scoring import model_cutoff
from steps.tracking import PipelineError, alias_version, load_keras, log_config, stage_run

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
        raise PipelineError(
            f"parameter input: no images found at {spec!r}; expected an image file, a directory or a glob"
        )
    return files


def check_output(output: Path) -> None:
    """Refuse, before any work, an output that is a directory or cannot be written."""
    if output.is_dir():
        raise PipelineError(
            f"parameter output: {output} is a directory; expected a file path, e.g. {output}/predictions.csv"
        )
    existing = next(p for p in [output.parent.absolute(), *output.parent.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PipelineError(f"parameter output: cannot create {output}: {existing} is not a writable directory")


def outside_input(path: Path, root: Path | None) -> str | None:
    """Why a file found under the input directory is not read: a link that leads out of it.

    A folder handed to infer decides what is scored, not where infer reads from: a symlink in
    it pointing elsewhere on the machine is reported, never followed.
    """
    if root is None or path.resolve().is_relative_to(root.resolve()):
        return None
    return f"a symlink to {path.resolve()}, outside the input directory {root}: not read"


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
        return load_keras(model_uri), metadata, version
    except mlflow.exceptions.MlflowException as err:
        raise PipelineError(f"cannot load {model_uri}: {err.message}") from None


def predict_files(
    model, files: list[Path], classes: list[str], batch_size: int, cutoff: float = 0.5, root: Path | None = None
) -> list[dict[str, str]]:
    """One row per file, defect when its probability >= ``cutoff``; images of one size are batched together.

    A file that cannot be read gets a row with the reason in ``error`` and no prediction; the rest
    of the batch still runs. ``root``: the input directory, out of which no symlink is followed.
    """
    rows: dict[Path, dict[str, str]] = {}
    by_shape: dict[tuple[int, ...], list[tuple[Path, np.ndarray]]] = defaultdict(list)
    for path in files:
        refused = outside_input(path, root)
        try:
            if refused:
                raise ImageError(refused)
            image = decode_gray(path)
        except ImageError as err:
            rows[path] = dict.fromkeys(COLUMNS, "") | {"path": str(path), "error": str(err)}
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
    output = Path(config.infer.output)
    check_output(output)
    root = Path(config.infer_input) if Path(config.infer_input).is_dir() else None
    model, metadata, version = load_production_model(config.infer_model_uri)
    classes = list(metadata["classes"])  # [good, defect], as the model was trained
    cutoff = model_cutoff(metadata)

    with stage_run(contract.STAGE_INFER, config.experiment) as run:
        log_config(config)
        mlflow.set_tags({contract.TAG_MODEL_URI: config.infer_model_uri, contract.TAG_MODEL_VERSION: version or ""})
        logger.info("scoring %d images with %s (version %s)", len(files), config.infer_model_uri, version)
        rows = predict_files(model, files, classes, config.infer.batch_size, cutoff, root)
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
