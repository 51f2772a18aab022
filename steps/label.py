"""Entry point ``label``: add reviewed images to the training data, all or nothing.

``-P review=`` a filled-in ``review.csv`` of infer's review queue (or its folder), or a folder with one
folder per class. Every image is checked against the data first (``steps.datasets.intake``): a copy of
an image already there, of a test image, or a near-copy of one refuses the whole review, in one line
per problem. The next ``main`` sees the new training data by its digest and trains again; evaluate
then compares the new version with the champion as always. Parameters: ``MLproject``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

from steps.core import cli, contract, parameters
from steps.core.config import Config
from steps.datasets import intake
from steps.datasets.data import manifest, scan_split
from steps.datasets.elpv import ensure_data
from steps.mlflow_io.records import log_config, log_dataset
from steps.mlflow_io.runs import name_run, stage_run

logger = logging.getLogger(__name__)


def label(config: Config, review: str) -> list[dict[str, str]]:
    """Add the labelled images of ``review`` to ``<data_dir>/train``; return what was added."""
    data_dir = ensure_data(config)
    classes = config.data.classes
    source = Path(review)
    items = intake.read_review(source, classes)
    planned = intake.plan(items, data_dir, classes)  # every check before any change
    with stage_run(contract.STAGE_LABEL, config.experiment):
        name_run(f"label {source.name}: {len(planned)} images")
        log_config(config)
        records = intake.apply(planned, data_dir, str(source), classes[1])
        mlflow.log_table({k: [r[k] for r in records] for k in intake.REVIEWED_COLUMNS}, contract.LABELLED_ARTIFACT)
        counts = {cls: sum(r["class"] == cls for r in records) for cls in classes}
        mlflow.log_metrics({contract.METRIC_N_LABELLED: len(records)})
        digest = log_dataset(
            manifest(scan_split(data_dir, "train", classes), "train", data_dir), "train", data_dir, context="training"
        )
        mlflow.set_tag(contract.TAG_DATA_DIGEST, digest)
    added = ", ".join(f"{n} {cls}" for cls, n in counts.items())
    print(f"added {len(records)} reviewed images to {data_dir}/train ({added}); training data digest {digest}")
    return records


OVERRIDES = parameters.overrides("label")

if __name__ == "__main__":
    cli.main(label, "Add reviewed images to the training data.", OVERRIDES, own=parameters.own("label"))
