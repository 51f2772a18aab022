"""Entry point ``prepare``: make sure the data directory holds a train and a test split.

Fills the project's empty ``data/`` with ELPV first (``steps.datasets.elpv.ensure_data``, which ``train``
and ``evaluate`` call themselves, so running ``prepare`` first is optional). Run as a stage it
logs, in its run: the manifest of each split as a dataset input (with its digest), the tag
``data_digest`` and the metrics ``n_train`` and ``n_test``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

from steps.core import cli, contract, parameters
from steps.core.config import Config
from steps.datasets.data import SPLITS, manifest, scan_split
from steps.datasets.elpv import ensure_data
from steps.mlflow_io.records import log_config, log_dataset
from steps.mlflow_io.runs import name_run, stage_run

logger = logging.getLogger(__name__)


def prepare(config: Config) -> Path:
    """Ensure the data exists and record it: the manifest as the run's dataset input."""
    data_dir = ensure_data(config)
    with stage_run(contract.STAGE_PREPARE, config.experiment):
        name_run(f"prepare {data_dir.name}")
        log_config(config)
        for split in SPLITS:
            frame = manifest(scan_split(data_dir, split, config.data.classes), split, data_dir)
            digest = log_dataset(frame, split, data_dir, context="training" if split == "train" else "testing")
            if split == "train":
                mlflow.set_tag(contract.TAG_DATA_DIGEST, digest)
            mlflow.log_metric(contract.split_count_metric(split), len(frame))
    return data_dir


OVERRIDES = parameters.overrides("prepare")

if __name__ == "__main__":
    cli.main(prepare, __doc__.split("\n\n")[0], OVERRIDES)
