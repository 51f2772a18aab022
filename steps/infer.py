"""Entry point ``infer``: predict defect or good for images with the production model.

Writes one row per input image (``steps.inference.outputs``: path, class, probability, cut-off,
error), in path order, written aside and renamed into place when complete. An image that cannot be
read gets its reason in its row and the rest are scored; the stage then exits 1 after writing
everything, unless ``allow_errors``. Both engines score with the registered model's own code
(``steps/served/serving.py``): the local engine (``steps.inference.local``) runs this repository's
copy of it on the version's Keras network, loaded in safe mode, so it never executes code from the
registry; Spark workers (``steps.inference.spark``) load the registered model as MLflow does.
With the local engine the batch is checked for drift against the version's reference profile
(``steps.monitoring``; ``-P drift``): the verdict is the run's tag ``drift``, and with ``drift=fail`` an
alert exits 6 after everything is written.
Parameters: ``MLproject``. What the run holds: docs/mlflow.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow

from steps.core import cli, contract, parameters
from steps.core.config import Config
from steps.core.errors import PARTIAL, PipelineError
from steps.inference.local import (
    CHUNK,
    check_output,
    load_production_model,
    log_gradcam,
    log_review,
    outside_input,
    resolve_inputs,
    score_local,
)
from steps.inference.outputs import Writer
from steps.inference.spark import check_spark, score_spark, spark_rows
from steps.mlflow_io.records import log_config
from steps.mlflow_io.runs import name_run, stage_run
from steps.monitoring.watch import enforce, judge, watcher
from steps.network import accelerator

logger = logging.getLogger(__name__)


class ImagesFailed(PipelineError):
    """Every row was written, but some images could not be read (exit 1 unless allow_errors)."""

    failure = PARTIAL


def infer(config: Config) -> str:
    """Predict, write the output, log the run; return the infer run's ID."""
    ic = config.infer
    spec = config.infer_input
    if ic.engine == "spark":
        check_spark()
    remote = ic.engine == "spark" and "://" in spec  # a cluster path only Spark can list
    files, root = (None, None) if remote else resolve_inputs(spec)
    output = Path(ic.output)
    check_output(output)
    model, uri, version = load_production_model(config.infer_model_uri, ic.batch_size, ic.runtime)
    logger.info("%s", accelerator.describe())  # imports TensorFlow: after a missing model has been said
    # The Spark workers' copy of the model; no per-call pixel cap: each task is bounded by its chunk.
    model_config = {"max_request_pixels": 0, "runtime": ic.runtime}
    max_bytes = ic.max_file_mb * 2**20
    good, defect = model.classes
    collector, profile, why_not = watcher(model, uri, ic.engine) if ic.drift != "off" else (None, None, "")

    with stage_run(contract.STAGE_INFER, config.experiment) as run:
        name_run(f"infer with {uri}")
        log_config(config)
        mlflow.set_tags(
            {
                contract.TAG_MODEL_URI: config.infer_model_uri,
                contract.TAG_MODEL_VERSION: version or "",
                contract.TAG_INFER_ENGINE: ic.engine,
                contract.TAG_INFER_RUNTIME: ic.runtime,
            }
        )
        n = "?" if files is None else len(files)
        logger.info(
            "scoring %s images with %s (version %s), engine %s, runtime %s",
            n, config.infer_model_uri, version, ic.engine, ic.runtime,
        )  # fmt: skip
        rows: Iterable[dict[str, Any]]
        if files is None or root is None:
            rows = score_spark(uri, None, spec, ic.spark_master, CHUNK, model_config)
        elif ic.engine == "spark":
            refused = {p: reason for p in files if (reason := outside_input(p, root))}
            rows = spark_rows(uri, files, refused, spec, ic.spark_master, CHUNK, model_config)
        else:
            rows = score_local(model, files, root, max_bytes, observe=collector.add if collector else None)
        writer = Writer(output, defect, ic.review_top)
        writer.write(rows, total=None if files is None else len(files))
        report = judge(collector, profile, why_not) if ic.drift != "off" else None
        mlflow.log_metrics(
            {
                contract.METRIC_N_IMAGES: writer.n_images,
                contract.METRIC_N_SCORED: writer.n_scored,
                contract.METRIC_N_DEFECT: writer.n_defect,
                contract.METRIC_N_ERRORS: writer.n_errors,
            }
        )
        mlflow.log_artifact(str(output))
        mlflow.set_tags({contract.TAG_OUTPUT: str(output.resolve()), contract.TAG_OUTPUT_SHA256: writer.sha256})
        if ic.gradcam_top:
            log_gradcam(model, writer.defects, ic.gradcam_top, root, uri, max_bytes)
        if writer.nearest:
            n_review = log_review(model, writer.nearest, root, uri, max_bytes, ic.review_dir, run.info.run_id)
            mlflow.log_metric(contract.METRIC_N_REVIEW, n_review)

    n_errors = writer.n_errors
    print(
        f"{writer.n_images} images, {writer.n_scored} scored with {config.infer_model_uri} (version {version}): "
        f"{writer.n_defect} {defect}, {writer.n_scored - writer.n_defect} {good}; {n_errors} unreadable -> {output}"
    )
    if n_errors:
        logger.warning("%d images could not be read; see the error column of %s", n_errors, output)
        if not ic.allow_errors:
            raise ImagesFailed(
                f"{n_errors} of {writer.n_images} images could not be read; every row is in {output} (see its "
                "error column) and in the run's artifacts; pass -P allow_errors=true to exit 0 anyway"
            )
    if report is not None:
        enforce(report, ic.drift, f"every row is in {output}")
    return run.info.run_id


OVERRIDES = parameters.overrides("infer")

if __name__ == "__main__":
    cli.main(infer, "Predict defect or good for images with the production model.", OVERRIDES)
